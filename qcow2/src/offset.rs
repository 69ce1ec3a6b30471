//! Offsets that must not be mixed up: a byte of the virtual disk ([`GuestOffset`]) and a byte
//! of an image file ([`HostOffset`]), and the one range type of guest bytes, [`GuestRange`].
//!
//! QCOW2 maps guest offsets to host offsets through its L1/L2 tables (docs/interop/qcow2.rst,
//! "Cluster mapping"); everything that reads or writes ranges of a volume (the pipeline,
//! convert, hydrate, backup, merge) speaks in these types.

use std::fmt;
use std::ops::{Add, AddAssign};

/// A byte offset in the virtual disk (what the guest sees).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset in an image file (or its external data file, or a raw file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

macro_rules! offset_ops {
    ($name:ident) => {
        impl $name {
            /// The offset as a number of bytes.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// The bytes from `earlier` up to this offset (zero when `earlier` lies past it).
            pub const fn distance_from(self, earlier: Self) -> u64 {
                self.0.saturating_sub(earlier.0)
            }
        }

        impl Add<u64> for $name {
            type Output = Self;

            fn add(self, bytes: u64) -> Self {
                Self(self.0 + bytes)
            }
        }

        impl AddAssign<u64> for $name {
            fn add_assign(&mut self, bytes: u64) {
                self.0 += bytes;
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

offset_ops!(GuestOffset);
offset_ops!(HostOffset);

/// A half-open range of guest bytes, `start..end`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct GuestRange {
    /// The first byte.
    pub start: GuestOffset,
    /// Just past the last byte (`end >= start`).
    pub end: GuestOffset,
}

impl GuestRange {
    /// `start..end` in bytes; an `end` before `start` makes an empty range at `start`.
    pub const fn new(start: u64, end: u64) -> Self {
        let end = if end < start { start } else { end };
        Self {
            start: GuestOffset(start),
            end: GuestOffset(end),
        }
    }

    /// `len` bytes from `start`.
    pub const fn at(start: GuestOffset, len: u64) -> Self {
        Self {
            start,
            end: GuestOffset(start.0 + len),
        }
    }

    /// Its length in bytes.
    pub const fn len(&self) -> u64 {
        self.end.0 - self.start.0
    }

    /// Whether it holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.end.0 <= self.start.0
    }

    /// The bytes both ranges hold, if any.
    pub fn intersect(&self, other: &Self) -> Option<Self> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(Self { start, end })
    }

    /// The range widened to whole `cluster`-byte clusters, the end capped at `limit`.
    pub fn to_clusters(&self, cluster: u64, limit: u64) -> Self {
        let start = self.start.0 - self.start.0 % cluster;
        Self::new(start, self.end.0.next_multiple_of(cluster).min(limit))
    }

    /// The indices of the `cluster`-byte clusters it touches.
    pub const fn clusters(&self, cluster: u64) -> std::ops::Range<u64> {
        self.start.0 / cluster..self.end.0.div_ceil(cluster)
    }

    /// The range cut into pieces of at most `max` bytes (`max > 0`), in order.
    pub fn pieces(&self, max: u64) -> impl Iterator<Item = GuestRange> + use<> {
        let (end, max) = (self.end.0, max.max(1));
        let mut at = self.start.0;
        std::iter::from_fn(move || {
            (at < end).then(|| {
                let piece = Self::new(at, end.min(at.saturating_add(max)));
                at = piece.end.0;
                piece
            })
        })
    }

    /// Where `offset` lies within the range, as an index into a buffer holding it.
    pub fn index_of(&self, offset: GuestOffset) -> usize {
        offset.distance_from(self.start) as usize
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_widen_to_clusters_and_cut_into_pieces() {
        let range = GuestRange::new(100, 9000);
        assert_eq!(range.to_clusters(4096, 8192), GuestRange::new(0, 8192));
        assert_eq!(range.to_clusters(4096, 1 << 20), GuestRange::new(0, 12288));
        let pieces: Vec<_> = range.pieces(4000).collect();
        assert_eq!(
            pieces,
            [
                GuestRange::new(100, 4100),
                GuestRange::new(4100, 8100),
                GuestRange::new(8100, 9000)
            ]
        );
        assert_eq!(GuestRange::new(5, 3).len(), 0);
        assert_eq!(range.clusters(4096), 0..3);
        assert_eq!(GuestRange::new(4096, 8192).clusters(4096), 1..2);
        assert_eq!(
            range.intersect(&GuestRange::new(8000, 20000)),
            Some(GuestRange::new(8000, 9000))
        );
        assert_eq!(range.intersect(&GuestRange::new(9000, 9001)), None);
        assert_eq!(format!("{range}"), "0x64..0x2328");
    }
}
