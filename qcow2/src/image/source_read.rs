//! Which bytes of which source a read of an extent takes: the hook for readers that fetch a
//! chain's data ahead of [`Image::read_extent`] (a restore from object storage fetches these
//! ranges in large parallel parts, then reads the extents from what arrived).

use super::{Image, Layer};
use crate::error::{Error, Result};
use crate::map::{Extent, ExtentKind};

/// The bytes of one source (by the name [`Storage`](crate::Storage) opened it by: an image
/// file, a raw backing file, an external data file) that [`Image::read_extent`] reads for one
/// extent. `end` may lie past the source's end where the image reads zeros there; a fetch
/// clamps it to the source's length, as the reader does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRead<'a> {
    /// The source's name.
    pub source: &'a str,
    /// First byte read.
    pub start: u64,
    /// Just past the last byte read.
    pub end: u64,
}

impl Image {
    /// The source range [`read_extent`](Self::read_extent) reads for the whole of `extent`
    /// (as [`for_each_extent`](Self::for_each_extent) produced it, or a cluster-aligned piece
    /// of it), `None` for an extent that reads as zeros.
    ///
    /// Data is read at its host offset; an image opened with a cluster check reads every
    /// cluster the extent touches whole (qcow2.rst, "Cluster mapping": a standard cluster is
    /// contiguous from the host offset its descriptor gives), so the range is widened to those
    /// clusters. A compressed cluster is read from its host offset for the length its
    /// descriptor bounds, within the file.
    pub fn source_read(&self, extent: &Extent) -> Result<Option<SourceRead<'_>>> {
        let no_layer = |depth| Error::InvalidArgument(format!("no image at depth {depth}"));
        match extent.kind {
            ExtentKind::Zero { .. } | ExtentKind::Unallocated | ExtentKind::Beyond { .. } => {
                Ok(None)
            }
            ExtentKind::Data { depth, host_offset } => {
                match self.layers.get(depth).ok_or_else(|| no_layer(depth))? {
                    Layer::Raw { name, .. } => Ok(Some(SourceRead {
                        source: name,
                        start: host_offset.get(),
                        end: host_offset.get().saturating_add(extent.length),
                    })),
                    Layer::Qcow2(q) => {
                        let source = q.data_file_name().unwrap_or(&q.name);
                        let (mut start, mut end) = (extent.start.get(), extent.end().get());
                        if self.check.is_some() {
                            let cluster = q.header.cluster_size();
                            start -= start % cluster;
                            end = end.div_ceil(cluster).saturating_mul(cluster).min(q.size());
                            end = end.max(extent.end().get());
                        }
                        let host_start = host_offset
                            .get()
                            .checked_sub(extent.start.get() - start)
                            .ok_or_else(|| {
                                crate::error::corrupt(
                                    &q.name,
                                    "data cluster before the file's start",
                                    host_offset.get(),
                                )
                            })?;
                        Ok(Some(SourceRead {
                            source,
                            start: host_start,
                            end: host_start.saturating_add(end - start),
                        }))
                    }
                }
            }
            ExtentKind::Compressed {
                depth,
                host_offset,
                compressed_len,
            } => match self.layers.get(depth).ok_or_else(|| no_layer(depth))? {
                Layer::Qcow2(q) => Ok(Some(SourceRead {
                    source: &q.name,
                    start: host_offset.get(),
                    end: host_offset
                        .get()
                        .saturating_add(compressed_len)
                        .min(q.file_len()),
                })),
                Layer::Raw { .. } => Err(no_layer(depth)),
            },
        }
    }

    /// Checks, as a read of `extent` would, that it may read as zeros (a no-op for an image
    /// opened without a cluster check, and for data extents).
    pub fn check_zero_extent(&self, extent: &Extent) -> Result<()> {
        if extent.kind.is_zero() {
            self.check_zeros(extent.kind, extent.start.get(), extent.length)?;
        }
        Ok(())
    }
}
