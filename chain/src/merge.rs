//! Merge for retention: fold an overlay into its parent as a new image.
//!
//! The new image holds every cluster that the overlay or its parent decides (data, or zero
//! flags) as the pair reads it, and names the parent's own backing file, so it stands for the
//! overlay's backup point with one image fewer in the chain.

use strata_qcow2::{ExtentKind, Image, ImageSink, WriteSummary, Writer, WriterOptions};

use crate::checksum::ClusterChecksums;
use crate::error::Result;

/// Bytes read at a time.
const CHUNK: u64 = 4 << 20;

/// Writes the merge of the top two images of `chain` into `sink`.
///
/// `options.backing_file` must name the parent's backing file (or be `None` when the parent is
/// the base, and the result is a new base image). Returns the checksums of the stored clusters.
pub fn merge<S: ImageSink>(
    chain: &Image,
    sink: S,
    options: &WriterOptions,
) -> Result<(S, WriteSummary, ClusterChecksums)> {
    let size = chain.virtual_size();
    let mut writer = Writer::new(sink, options, size)?;
    let cluster = writer.cluster_size();
    let overlay = options.backing_file.is_some();
    // Cluster runs decided by depth 0 or 1, merged, ascending.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    chain.for_each_extent(0, size, |extent| {
        if extent.kind.depth().is_some_and(|d| d <= 1) {
            let (a, b) = (extent.start / cluster, extent.end().div_ceil(cluster));
            match runs.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => runs.push((a, b)),
            }
        }
        Ok(())
    })?;
    let mut checksums = ClusterChecksums::new(cluster);
    let mut buf = vec![0u8; CHUNK.next_multiple_of(cluster) as usize];
    for (a, b) in runs {
        let mut offset = a * cluster;
        let end = (b * cluster).min(size);
        while offset < end {
            let len = (end - offset).min(buf.len() as u64) as usize;
            let part = &mut buf[..len];
            chain.read_at(part, offset)?;
            for (i, data) in part.chunks(cluster as usize).enumerate() {
                if !strata_qcow2::is_zero(data) {
                    checksums.push(offset / cluster + i as u64, data)?;
                }
            }
            if overlay {
                writer.write_data_over_backing(offset, part)?;
            } else {
                writer.write_data(offset, part)?;
            }
            offset += len as u64;
        }
    }
    let (sink, summary) = writer.finish()?;
    Ok((sink, summary, checksums))
}

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
