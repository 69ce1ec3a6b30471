//! Merge for retention: fold an overlay into its parent as a new image.
//!
//! The new image holds every cluster that the overlay or its parent decides (data, or zero
//! flags) as the pair reads it, and names the parent's own backing file, so it stands for the
//! overlay's backup point with one image fewer in the chain.

use strata_qcow2::pipeline::Pipeline;
use strata_qcow2::{
    ClusterCompressor, ExtentKind, GuestRange, Image, ImageSink, WriteSummary, Writer,
    WriterOptions, compress_clusters, is_zero,
};

use crate::checksum::ClusterChecksums;
use crate::error::{Error, Result};

/// Bytes read at a time.
const CHUNK: u64 = 4 << 20;
/// Threads reading (and compressing) the pair: the chain's reads come from the page cache or
/// object storage, and compression is the costly part.
const READERS: usize = 3;

/// Writes the merge of the top two images of `chain` into `sink`.
///
/// `options.backing_file` must name the parent's backing file (or be `None` when the parent is
/// the base, and the result is a new base image). Returns the checksums of the stored clusters.
/// The pair is read (and, with `options.compression`, compressed) on the reader threads of a
/// [`Pipeline`], and written in order on this one.
pub fn merge<S: ImageSink>(
    chain: &Image,
    sink: S,
    options: &WriterOptions,
) -> Result<(S, WriteSummary, ClusterChecksums)> {
    let size = chain.virtual_size();
    // Clusters are compressed on the reader threads: the writer only names the method.
    let (writer_options, compression) = options.compress_on_readers();
    let mut writer = Writer::new(sink, &writer_options, size)?;
    let cluster = writer.cluster_size();
    let chunk = CHUNK.next_multiple_of(cluster);
    let overlay = options.backing_file.is_some();
    let mut checksums = ClusterChecksums::new(cluster);
    Pipeline::new(READERS, chunk as usize).run(
        |tasks| {
            // Cluster runs decided by depth 0 or 1, merged, ascending, cut into chunks.
            let mut run: Option<GuestRange> = None;
            let mut submit = |run: GuestRange| run.pieces(chunk).all(|piece| tasks.submit(piece));
            let walked = chain.for_each_extent(0, size, |extent| {
                if extent.kind.depth().is_none_or(|d| d > 1) {
                    return Ok(());
                }
                let range = extent.range().to_clusters(cluster, size);
                match run.as_mut() {
                    Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                    _ => {
                        if let Some(done) = run.replace(range) {
                            if !submit(done) {
                                return Err(strata_qcow2::Error::InvalidArgument(STOPPED.into()));
                            }
                        }
                    }
                }
                Ok(())
            });
            match walked {
                Err(strata_qcow2::Error::InvalidArgument(why)) if why == STOPPED => return Ok(()),
                walked => walked?,
            }
            if let Some(done) = run {
                let _ = submit(done);
            }
            Ok::<(), Error>(())
        },
        || {
            Ok(compression
                .map(|(method, level)| ClusterCompressor::new(method, level, cluster))
                .transpose()?)
        },
        |compressor, range: GuestRange, buf| {
            buf.resize(range.len() as usize);
            let (bytes, packed) = buf.split_mut();
            chain.read_at(bytes, range.start.get())?;
            let compressed = match compressor.as_mut() {
                Some(compressor) => compress_clusters(compressor, bytes, cluster, packed, |_| true),
                None => Vec::new(),
            };
            Ok((range, compressed))
        },
        |(range, compressed), buf| {
            let bytes = buf.bytes();
            let first = range.start.get() / cluster;
            for (i, data) in bytes.chunks(cluster as usize).enumerate() {
                if !is_zero(data) {
                    checksums.push(first + i as u64, data)?;
                }
            }
            writer.write_clusters(range.start.get(), bytes, buf.packed(), &compressed, overlay)?;
            Ok(())
        },
    )?;
    let (sink, summary) = writer.finish()?;
    Ok((sink, summary, checksums))
}

/// Ends the walk of the chain's map when the pipeline has stopped.
const STOPPED: &str = "merge stopped";

/// Whether the top image of `chain` stores or zeroes anything (an empty overlay can simply be
/// dropped instead of merged).
pub fn top_is_empty(chain: &Image) -> Result<bool> {
    let mut empty = true;
    chain.for_each_extent(0, chain.virtual_size(), |extent| {
        if matches!(
            extent.kind,
            ExtentKind::Data { depth: 0, .. }
                | ExtentKind::Compressed { depth: 0, .. }
                | ExtentKind::Zero { depth: 0 }
        ) {
            empty = false;
        }
        Ok(())
    })?;
    Ok(empty)
}
