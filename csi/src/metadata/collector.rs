//! Checking and coalescing the block metadata a service streams.
//!
//! The API's rules (KEP-3314, `GetMetadataAllocatedResponse` and `GetMetadataDeltaResponse` in
//! `schema.proto`): every message has the same `block_metadata_type` (FIXED_LENGTH or
//! VARIABLE_LENGTH) and `volume_capacity_bytes`; tuples have a non-negative offset and a positive
//! size, FIXED_LENGTH tuples all have one size; tuples are strictly increasing and do not overlap,
//! across messages too; a message holds at most `max_results` tuples when the client set it. A
//! stream resumed at `starting_offset` S only holds tuples ending after S, and its first tuple may
//! start before S. Every rule is checked, plus one the API implies: no tuple ends past the volume.
//!
//! Memory stays bounded whatever the service sends: adjacent ranges merge as they arrive, and
//! when more than `max_ranges` remain the collector rounds every range out to a coarser
//! granularity (4 KiB, then doubling) and merges again. The result then covers more than
//! changed, never less, which costs the backup some extra reads and keeps it correct.

use strata_chain::ByteRange;

use super::proto::{BlockMetadata, BlockMetadataType};

/// The first granularity ranges are rounded to when there are too many.
const FIRST_GRANULARITY: u64 = 4096;

/// How a service's reply breaks the SnapshotMetadata API's rules.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// `block_metadata_type` is UNKNOWN or a value the API does not define.
    #[error("block metadata type {0} is neither FIXED_LENGTH nor VARIABLE_LENGTH")]
    UnknownType(i32),
    /// `block_metadata_type` differs from an earlier message's.
    #[error("block metadata type changed from {was:?} to {now:?}")]
    TypeChanged {
        /// The type of the earlier messages.
        was: BlockMetadataType,
        /// The type of this message.
        now: BlockMetadataType,
    },
    /// `volume_capacity_bytes` is not positive.
    #[error("volume capacity {0} is not positive")]
    InvalidCapacity(i64),
    /// `volume_capacity_bytes` differs from an earlier message's.
    #[error("volume capacity changed from {was} to {now} bytes")]
    CapacityChanged {
        /// The capacity of the earlier messages.
        was: u64,
        /// The capacity of this message.
        now: u64,
    },
    /// A message holds more tuples than the client's `max_results`.
    #[error("{count} tuples in one message, more than the {limit} asked for")]
    TooManyTuples {
        /// Tuples in the message.
        count: usize,
        /// `max_results` of the request.
        limit: i32,
    },
    /// A tuple with a negative offset or a size that is not positive.
    #[error("tuple offset {offset} size {size}: negative offset or non-positive size")]
    InvalidTuple {
        /// `byte_offset`.
        offset: i64,
        /// `size_bytes`.
        size: i64,
    },
    /// A tuple ending past the volume.
    #[error("range {offset:#x}+{size:#x} ends past the volume capacity {capacity:#x}")]
    PastCapacity {
        /// `byte_offset`.
        offset: u64,
        /// `size_bytes`.
        size: u64,
        /// `volume_capacity_bytes`.
        capacity: u64,
    },
    /// A FIXED_LENGTH tuple whose size differs from the first one's.
    #[error("FIXED_LENGTH tuple of {size} bytes after tuples of {expected} bytes")]
    SizeVaries {
        /// The size of the first tuple.
        expected: u64,
        /// This tuple's size.
        size: u64,
    },
    /// A tuple overlapping or preceding what was already received.
    #[error(
        "range {offset:#x}+{size:#x} does not follow the data received up to {previous_end:#x}"
    )]
    OutOfOrder {
        /// `byte_offset`.
        offset: u64,
        /// `size_bytes`.
        size: u64,
        /// End of the previous tuple (or the requested starting offset).
        previous_end: u64,
    },
}

/// The union of the ranges received so far, checked and coalesced.
#[derive(Debug)]
pub(crate) struct Collector {
    max_ranges: usize,
    max_results: i32,
    /// End of the last tuple received: where a resumed stream starts.
    cursor: u64,
    /// The next tuple is the first of a stream, which may start before `cursor`.
    stream_start: bool,
    kind: Option<BlockMetadataType>,
    capacity: Option<u64>,
    fixed_size: Option<u64>,
    ranges: Vec<ByteRange>,
    granularity: u64,
}

/// What the collector gathered.
#[derive(Debug)]
pub(crate) struct Collected {
    pub ranges: Vec<ByteRange>,
    pub kind: Option<BlockMetadataType>,
    pub capacity: Option<u64>,
    pub granularity: u64,
}

impl Collector {
    /// A collector for a stream starting at `starting_offset`, keeping at most `max_ranges`
    /// ranges (at least one), for requests with `max_results` (0 for the service's choice).
    pub fn new(starting_offset: u64, max_ranges: usize, max_results: i32) -> Self {
        Collector {
            max_ranges: max_ranges.max(1),
            max_results,
            cursor: starting_offset,
            stream_start: true,
            kind: None,
            capacity: None,
            fixed_size: None,
            ranges: Vec::new(),
            granularity: 1,
        }
    }

    /// The offset right after the last byte received: the `starting_offset` to resume at.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// A new stream begins (at [`Self::cursor`]).
    pub fn restart(&mut self) {
        self.stream_start = true;
    }

    /// Takes one message's fields.
    pub fn accept(
        &mut self,
        kind: i32,
        capacity: i64,
        tuples: &[BlockMetadata],
    ) -> Result<(), Violation> {
        let kind = match BlockMetadataType::try_from(kind) {
            Ok(BlockMetadataType::Unknown) | Err(_) => return Err(Violation::UnknownType(kind)),
            Ok(kind) => kind,
        };
        match self.kind {
            Some(was) if was != kind => return Err(Violation::TypeChanged { was, now: kind }),
            _ => self.kind = Some(kind),
        }
        let capacity = u64::try_from(capacity)
            .ok()
            .filter(|&c| c > 0)
            .ok_or(Violation::InvalidCapacity(capacity))?;
        match self.capacity {
            Some(was) if was != capacity => {
                return Err(Violation::CapacityChanged { was, now: capacity });
            }
            _ => self.capacity = Some(capacity),
        }
        if let Ok(limit) = usize::try_from(self.max_results)
            && limit > 0
            && tuples.len() > limit
        {
            return Err(Violation::TooManyTuples {
                count: tuples.len(),
                limit: self.max_results,
            });
        }
        tuples
            .iter()
            .try_for_each(|tuple| self.accept_tuple(kind, capacity, tuple))
    }

    fn accept_tuple(
        &mut self,
        kind: BlockMetadataType,
        capacity: u64,
        tuple: &BlockMetadata,
    ) -> Result<(), Violation> {
        let invalid = Violation::InvalidTuple {
            offset: tuple.byte_offset,
            size: tuple.size_bytes,
        };
        let offset = u64::try_from(tuple.byte_offset).map_err(|_| invalid.clone())?;
        let size = u64::try_from(tuple.size_bytes)
            .ok()
            .filter(|&s| s > 0)
            .ok_or(invalid)?;
        let end = offset
            .checked_add(size)
            .filter(|&end| end <= capacity)
            .ok_or(Violation::PastCapacity {
                offset,
                size,
                capacity,
            })?;
        if kind == BlockMetadataType::FixedLength {
            match self.fixed_size {
                Some(expected) if expected != size => {
                    return Err(Violation::SizeVaries { expected, size });
                }
                _ => self.fixed_size = Some(size),
            }
        }
        if end <= self.cursor || (offset < self.cursor && !self.stream_start) {
            return Err(Violation::OutOfOrder {
                offset,
                size,
                previous_end: self.cursor,
            });
        }
        let start = offset.max(self.cursor);
        self.stream_start = false;
        self.cursor = end;
        self.push(start, end, capacity);
        Ok(())
    }

    /// Adds `[start, end)`, rounded out to the granularity and merged with the last range.
    fn push(&mut self, start: u64, end: u64, capacity: u64) {
        self.push_merged(
            ByteRange {
                offset: start,
                length: end - start,
            },
            capacity,
        );
        if self.ranges.len() > self.max_ranges {
            self.coarsen(capacity);
        }
    }

    /// Doubles the granularity until at most half of `max_ranges` ranges remain, so that
    /// coarsening happens O(log capacity) times at most.
    fn coarsen(&mut self, capacity: u64) {
        let target = (self.max_ranges / 2).max(1);
        while self.ranges.len() > target {
            self.granularity = self.granularity.saturating_mul(2).max(FIRST_GRANULARITY);
            let ranges = std::mem::take(&mut self.ranges);
            for range in ranges {
                self.push_merged(range, capacity);
            }
        }
    }

    /// Appends `range` rounded out to the granularity (never past `capacity`), merging it into
    /// the last range when they touch.
    fn push_merged(&mut self, range: ByteRange, capacity: u64) {
        let g = self.granularity;
        let start = range.offset / g * g;
        let end = (range.offset + range.length)
            .div_ceil(g)
            .saturating_mul(g)
            .min(capacity);
        match self.ranges.last_mut() {
            Some(last) if last.offset + last.length >= start => {
                last.length = end.max(last.offset + last.length) - last.offset;
            }
            _ => self.ranges.push(ByteRange {
                offset: start,
                length: end - start,
            }),
        }
    }

    /// The ranges and what the service said about them.
    pub fn finish(self) -> Collected {
        Collected {
            ranges: self.ranges,
            kind: self.kind,
            capacity: self.capacity,
            granularity: self.granularity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXED: i32 = BlockMetadataType::FixedLength as i32;
    const VARIABLE: i32 = BlockMetadataType::VariableLength as i32;
    const MIB: i64 = 1 << 20;

    fn tuples(pairs: &[(i64, i64)]) -> Vec<BlockMetadata> {
        pairs
            .iter()
            .map(|&(byte_offset, size_bytes)| BlockMetadata {
                byte_offset,
                size_bytes,
            })
            .collect()
    }

    fn ranges(pairs: &[(u64, u64)]) -> Vec<ByteRange> {
        pairs
            .iter()
            .map(|&(offset, length)| ByteRange { offset, length })
            .collect()
    }

    #[test]
    fn adjacent_tuples_merge_across_messages() {
        let mut c = Collector::new(0, 16, 0);
        c.accept(
            FIXED,
            MIB,
            &tuples(&[(0, 4096), (4096, 4096), (16384, 4096)]),
        )
        .unwrap();
        c.accept(FIXED, MIB, &tuples(&[(20480, 4096), (MIB - 4096, 4096)]))
            .unwrap();
        assert_eq!(c.cursor(), 1 << 20);
        let done = c.finish();
        assert_eq!(
            done.ranges,
            ranges(&[(0, 8192), (16384, 8192), ((1 << 20) - 4096, 4096)])
        );
        assert_eq!(done.kind, Some(BlockMetadataType::FixedLength));
        assert_eq!(done.capacity, Some(1 << 20));
        assert_eq!(done.granularity, 1);
    }

    #[test]
    fn a_resumed_stream_may_restart_inside_the_last_extent() {
        let mut c = Collector::new(0, 16, 0);
        c.accept(VARIABLE, MIB, &tuples(&[(0, 1000), (5000, 3000)]))
            .unwrap();
        c.restart();
        // The service re-sends an extent that straddles the resume point 8000.
        c.accept(VARIABLE, MIB, &tuples(&[(6000, 4000), (20000, 1)]))
            .unwrap();
        assert_eq!(
            c.finish().ranges,
            ranges(&[(0, 1000), (5000, 5000), (20000, 1)])
        );
    }

    #[test]
    fn hostile_tuples_are_named() {
        type Case = (i32, i64, Vec<(i64, i64)>, Violation);
        let cases: [Case; 8] = [
            (0, MIB, vec![], Violation::UnknownType(0)),
            (7, MIB, vec![], Violation::UnknownType(7)),
            (FIXED, -1, vec![], Violation::InvalidCapacity(-1)),
            (
                VARIABLE,
                MIB,
                vec![(-1, 10)],
                Violation::InvalidTuple {
                    offset: -1,
                    size: 10,
                },
            ),
            (
                VARIABLE,
                MIB,
                vec![(10, 0)],
                Violation::InvalidTuple {
                    offset: 10,
                    size: 0,
                },
            ),
            (
                VARIABLE,
                MIB,
                vec![(MIB - 1, 2)],
                Violation::PastCapacity {
                    offset: (1 << 20) - 1,
                    size: 2,
                    capacity: 1 << 20,
                },
            ),
            (
                VARIABLE,
                i64::MAX,
                vec![(i64::MAX, i64::MAX)],
                Violation::PastCapacity {
                    offset: i64::MAX as u64,
                    size: i64::MAX as u64,
                    capacity: i64::MAX as u64,
                },
            ),
            (
                FIXED,
                MIB,
                vec![(0, 4096), (8192, 8192)],
                Violation::SizeVaries {
                    expected: 4096,
                    size: 8192,
                },
            ),
        ];
        for (kind, capacity, pairs, expected) in cases {
            let mut c = Collector::new(0, 16, 0);
            assert_eq!(
                c.accept(kind, capacity, &tuples(&pairs)),
                Err(expected.clone()),
                "{expected}"
            );
        }
    }

    #[test]
    fn order_type_capacity_and_count_rules_hold_across_messages() {
        let mut c = Collector::new(0, 16, 2);
        c.accept(VARIABLE, MIB, &tuples(&[(100, 100)])).unwrap();
        assert_eq!(
            c.accept(VARIABLE, MIB, &tuples(&[(150, 100)])),
            Err(Violation::OutOfOrder {
                offset: 150,
                size: 100,
                previous_end: 200
            })
        );
        assert_eq!(
            c.accept(FIXED, MIB, &[]),
            Err(Violation::TypeChanged {
                was: BlockMetadataType::VariableLength,
                now: BlockMetadataType::FixedLength
            })
        );
        assert_eq!(
            c.accept(VARIABLE, 2 * MIB, &[]),
            Err(Violation::CapacityChanged {
                was: 1 << 20,
                now: 2 << 20
            })
        );
        assert_eq!(
            c.accept(VARIABLE, MIB, &tuples(&[(300, 1), (400, 1), (500, 1)])),
            Err(Violation::TooManyTuples { count: 3, limit: 2 })
        );
        // After a resume, a tuple ending at or before the resume point is a replay.
        c.restart();
        assert_eq!(
            c.accept(VARIABLE, MIB, &tuples(&[(100, 100)])),
            Err(Violation::OutOfOrder {
                offset: 100,
                size: 100,
                previous_end: 200
            })
        );
    }

    #[test]
    fn too_many_ranges_coarsen_to_a_superset() {
        let mut c = Collector::new(0, 8, 0);
        // 64 one-byte ranges, every 1000 bytes: more than 8 cannot stay exact.
        let pairs: Vec<(i64, i64)> = (0..64).map(|i| (i * 1000, 1)).collect();
        c.accept(VARIABLE, MIB, &tuples(&pairs)).unwrap();
        let done = c.finish();
        assert!(done.ranges.len() <= 8, "{} ranges", done.ranges.len());
        assert!(done.granularity >= 4096 && done.granularity.is_power_of_two());
        for (offset, _) in pairs {
            let offset = offset as u64;
            assert!(
                done.ranges
                    .iter()
                    .any(|r| r.offset <= offset && offset < r.offset + r.length),
                "{offset} not covered"
            );
        }
        for r in &done.ranges {
            assert_eq!(r.offset % done.granularity, 0);
            assert!(r.offset + r.length <= 1 << 20);
        }
        for pair in done.ranges.windows(2) {
            assert!(pair[0].offset + pair[0].length < pair[1].offset);
        }
    }

    /// Merged union of sorted, disjoint ranges.
    fn merged(pairs: &[(u64, u64)]) -> Vec<ByteRange> {
        let mut out: Vec<ByteRange> = Vec::new();
        for &(offset, length) in pairs {
            match out.last_mut() {
                Some(last) if last.offset + last.length == offset => last.length += length,
                _ => out.push(ByteRange { offset, length }),
            }
        }
        out
    }

    proptest::proptest! {
        /// However the service splits its stream into messages and wherever it breaks, resuming
        /// at the cursor as the API prescribes yields exactly the tuples' union.
        #[test]
        fn resumed_streams_yield_the_exact_union(
            gaps_and_sizes in proptest::collection::vec((0u64..3, 1u64..5), 0..60),
            per_message in 1usize..5,
            breaks in proptest::collection::vec(0usize..4, 0..6),
        ) {
            let mut tuples = Vec::new();
            let mut at = 0u64;
            for (gap, size) in gaps_and_sizes {
                at += gap * 512;
                tuples.push((at, size * 512));
                at += size * 512;
            }
            let capacity = (at + 4096) as i64;
            let mut c = Collector::new(0, 1 << 10, 0);
            let mut breaks = breaks.into_iter();
            loop {
                c.restart();
                let start = c.cursor();
                let rest: Vec<BlockMetadata> = tuples
                    .iter()
                    .filter(|&&(o, s)| o + s > start)
                    .map(|&(o, s)| BlockMetadata { byte_offset: o as i64, size_bytes: s as i64 })
                    .collect();
                let messages: Vec<&[BlockMetadata]> = rest.chunks(per_message).collect();
                let cut = breaks.next();
                let sent = cut.map_or(messages.len(), |n| n.min(messages.len()));
                for m in &messages[..sent] {
                    c.accept(VARIABLE, capacity, m).unwrap();
                }
                if cut.is_none() {
                    break;
                }
            }
            proptest::prop_assert_eq!(c.finish().ranges, merged(&tuples));
        }
    }
}
