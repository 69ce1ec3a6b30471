//! Changed ranges handed in from outside (changed-block tracking such as the CSI
//! SnapshotMetadata API's `GetMetadataDelta`), as offset and length pairs.

use serde::Deserialize;

use crate::error::{Result, malformed};

/// A byte range of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ByteRange {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// Parses `[{"offset": N, "length": N}, ...]` (the shape of CSI block metadata).
pub fn parse_changed_ranges(json: &[u8]) -> Result<Vec<ByteRange>> {
    serde_json::from_slice(json).map_err(|e| malformed("changed ranges", e.to_string()))
}

/// Turns byte ranges into sorted, merged, non-empty cluster index ranges `[first, end)` within
/// a volume of `clusters` clusters; refuses ranges past the end.
pub(crate) fn to_clusters(
    ranges: &[ByteRange],
    cluster_size: u64,
    virtual_size: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for r in ranges {
        let end = r
            .offset
            .checked_add(r.length)
            .filter(|&e| e <= virtual_size)
            .ok_or_else(|| {
                malformed(
                    "changed ranges",
                    format!(
                        "range {:#x}+{:#x} ends past the volume ({virtual_size} bytes)",
                        r.offset, r.length
                    ),
                )
            })?;
        if r.length > 0 {
            out.push((r.offset / cluster_size, end.div_ceil(cluster_size)));
        }
    }
    out.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
    for (a, b) in out {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_merged_cluster_runs() {
        let ranges = parse_changed_ranges(
            br#"[{"offset": 70000, "length": 10}, {"offset": 0, "length": 65536},
                 {"offset": 65536, "length": 1}, {"offset": 500000, "length": 0}]"#,
        )
        .expect("valid json");
        assert_eq!(
            to_clusters(&ranges, 65536, 1 << 20).ok(),
            Some(vec![(0, 2)])
        );
        let past = [ByteRange {
            offset: 1 << 20,
            length: 1,
        }];
        assert!(to_clusters(&past, 65536, 1 << 20).is_err());
    }
}
