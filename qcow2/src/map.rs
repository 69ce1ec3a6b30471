//! The block-status map of a resolved chain: for each guest range, where its bytes come from.

use crate::offset::{GuestOffset, GuestRange, HostOffset};

/// Where the bytes of a guest range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored data in the image at `depth` (0 is the top), starting at `host_offset` in that
    /// image's file (or in its external data file; for a raw image, the raw file).
    Data {
        /// Chain depth of the image holding the data.
        depth: usize,
        /// File offset of the extent's first byte.
        host_offset: HostOffset,
    },
    /// Part of a compressed cluster in the image at `depth`.
    Compressed {
        /// Chain depth of the image holding the cluster.
        depth: usize,
        /// File offset of the compressed stream.
        host_offset: HostOffset,
        /// Upper bound of the compressed stream's length.
        compressed_len: u64,
    },
    /// Reads as zeros because the image at `depth` says so (a zero cluster or subcluster).
    Zero {
        /// Chain depth of the image with the zero flag.
        depth: usize,
    },
    /// Allocated nowhere in the chain: reads as zeros.
    Unallocated,
    /// Past the end of the image at `depth`, which is shorter than the chain (a volume that
    /// grew): reads as zeros, decided by that image's size, whatever the images below it hold
    /// (qcow2.rst, "Header": `size` is the virtual disk size; QEMU reads a backing file's
    /// missing tail as zeros). Images above `depth` allocate nothing here.
    Beyond {
        /// Chain depth of the image whose end it is past.
        depth: usize,
    },
}

impl ExtentKind {
    /// Whether the range reads as zeros without reading any data.
    pub fn is_zero(self) -> bool {
        matches!(
            self,
            Self::Zero { .. } | Self::Unallocated | Self::Beyond { .. }
        )
    }

    /// The chain depth that decides this range, if any image does.
    pub fn depth(self) -> Option<usize> {
        match self {
            Self::Data { depth, .. }
            | Self::Compressed { depth, .. }
            | Self::Zero { depth }
            | Self::Beyond { depth } => Some(depth),
            Self::Unallocated => None,
        }
    }
}

/// A guest range and where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub start: GuestOffset,
    /// Length in bytes.
    pub length: u64,
    /// Where the bytes come from.
    pub kind: ExtentKind,
}

impl Extent {
    /// The guest offset just past the extent.
    pub fn end(&self) -> GuestOffset {
        self.start + self.length
    }

    /// The guest bytes it covers.
    pub fn range(&self) -> GuestRange {
        GuestRange::at(self.start, self.length)
    }

    /// The part of the extent from `at` (inside it) for `len` bytes: a data extent's host
    /// offset moves along; a compressed one still names its whole cluster.
    pub fn slice(&self, at: GuestOffset, len: u64) -> Extent {
        let kind = match self.kind {
            ExtentKind::Data { depth, host_offset } => ExtentKind::Data {
                depth,
                host_offset: host_offset + at.distance_from(self.start),
            },
            other => other,
        };
        Extent {
            start: at,
            length: len,
            kind,
        }
    }

    /// Appends `next` to `self` if it continues it; returns whether it did.
    pub(crate) fn try_merge(&mut self, next: &Extent) -> bool {
        if self.end() != next.start {
            return false;
        }
        let merges = match (self.kind, next.kind) {
            (
                ExtentKind::Data {
                    depth: a,
                    host_offset: ha,
                },
                ExtentKind::Data {
                    depth: b,
                    host_offset: hb,
                },
            ) => a == b && ha + self.length == hb,
            (ExtentKind::Zero { depth: a }, ExtentKind::Zero { depth: b }) => a == b,
            (ExtentKind::Unallocated, ExtentKind::Unallocated) => true,
            (ExtentKind::Beyond { depth: a }, ExtentKind::Beyond { depth: b }) => a == b,
            _ => false,
        };
        if merges {
            self.length += next.length;
        }
        merges
    }
}
