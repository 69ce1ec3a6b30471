//! Checked reads of a backup chain: each image's checksum list ([`ClusterChecksums`]) as the
//! reader's [`ClusterCheck`], so hydration, an NBD export and a merge of the chain all return
//! only clusters whose CRC-32 matches what the backup recorded.

use strata_qcow2::{CheckFailure, ClusterCheck};

use crate::checksum::ClusterChecksums;

/// The checksum lists of a chain, top first, as a [`ClusterCheck`] for
/// [`strata_qcow2::OpenOptions::cluster_check`].
///
/// A stored cluster must be in its image's list with the CRC-32 of the bytes read; it must not
/// be in the list of an image above it (whose mapping would then have lost it); and a range
/// that reads as zeros must not hold a cluster listed by the image that decides it or by any
/// image above (or, unallocated, by any image). Lookups go through each list's small page cache
/// (the lists are never held whole): a check costs the CRC-32 of the cluster (several GB/s)
/// and a binary search in a cached page per image. A list that cannot be read back fails the
/// check.
#[derive(Debug)]
pub struct ChainChecksums {
    layers: Vec<(String, ClusterChecksums)>,
}

impl ChainChecksums {
    /// The lists of a chain, top first, each with the name errors give its image (for
    /// example `backup VOLUME/ID`).
    pub fn new(layers: Vec<(String, ClusterChecksums)>) -> Self {
        Self { layers }
    }

    /// The list of the image at `depth`.
    pub fn list(&self, depth: usize) -> Option<&ClusterChecksums> {
        self.layers.get(depth).map(|(_, list)| list)
    }

    fn name(&self, depth: usize) -> &str {
        self.layers.get(depth).map_or("", |(name, _)| name.as_str())
    }

    /// The first image above `depth` (or of all, with `None`) listing a cluster in
    /// `guest_offset..guest_offset + len`: its depth and the cluster's guest offset.
    fn listed_above(
        &self,
        depth: Option<usize>,
        guest_offset: u64,
        len: u64,
    ) -> Result<Option<(usize, u64)>, CheckFailure> {
        let limit = depth.unwrap_or(self.layers.len()).min(self.layers.len());
        for (d, (_, list)) in self
            .layers
            .get(..limit)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let size = list.cluster_size.max(1);
            let clusters = guest_offset / size..(guest_offset + len).div_ceil(size);
            let first = list
                .first_in(clusters)
                .map_err(|e| unreadable(d, guest_offset, &e))?;
            if let Some(index) = first {
                return Ok(Some((d, index * size)));
            }
        }
        Ok(None)
    }
}

impl ClusterCheck for ChainChecksums {
    fn stored(&self, depth: usize, guest_offset: u64, data: &[u8]) -> Result<(), CheckFailure> {
        let failure = |depth, problem| CheckFailure {
            depth,
            guest_offset,
            problem,
            unchecked: false,
        };
        let Some((_, list)) = self.layers.get(depth) else {
            return Err(failure(
                depth,
                "is read from an image without a checksum list".into(),
            ));
        };
        let read = crc32fast::hash(data);
        let listed = list
            .get(guest_offset / list.cluster_size.max(1))
            .map_err(|e| unreadable(depth, guest_offset, &e))?;
        match listed {
            None => {
                return Err(failure(
                    depth,
                    format!("is stored but not in its checksum list (read {read:08x})"),
                ));
            }
            Some(stored) if stored != read => {
                return Err(failure(
                    depth,
                    format!("fails its checksum (stored {stored:08x}, read {read:08x})"),
                ));
            }
            Some(_) => {}
        }
        match self.listed_above(Some(depth), guest_offset, data.len() as u64)? {
            Some((above, at)) => Err(CheckFailure {
                unchecked: false,
                depth: above,
                guest_offset: at,
                problem: format!(
                    "is in its checksum list but the chain reads it from {}",
                    self.name(depth)
                ),
            }),
            None => Ok(()),
        }
    }

    fn zeros(&self, depth: Option<usize>, guest_offset: u64, len: u64) -> Result<(), CheckFailure> {
        // The image deciding the range, and every image above it.
        match self.listed_above(depth.map(|d| d + 1), guest_offset, len)? {
            Some((listed, at)) => Err(CheckFailure {
                unchecked: false,
                depth: listed,
                guest_offset: at,
                problem: "is in its checksum list but reads as zeros".into(),
            }),
            None => Ok(()),
        }
    }

    fn image_name(&self, depth: usize) -> Option<String> {
        self.layers.get(depth).map(|(name, _)| name.clone())
    }
}

/// A check that failed because the checksum list of the image at `depth` could not be read:
/// unchecked when reading it back failed (the list waits in a local temporary file, checked
/// when it was downloaded), damage when what it read back is malformed.
fn unreadable(depth: usize, guest_offset: u64, error: &crate::Error) -> CheckFailure {
    let mut problem = format!("cannot be checked: its checksum list does not read back: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        problem.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    CheckFailure {
        depth,
        guest_offset,
        problem,
        unchecked: matches!(error, crate::Error::Io { .. }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: u64 = 65536;

    #[test]
    fn a_list_that_does_not_read_back_is_unchecked_and_a_malformed_one_damage() {
        let local = crate::Error::Io {
            what: "reading the checksum list",
            offset: 0,
            source: std::io::Error::other("EIO from the temporary file"),
        };
        assert!(unreadable(1, 0, &local).unchecked);
        let malformed = crate::Error::Mismatch("an entry out of order".into());
        assert!(!unreadable(1, 0, &malformed).unchecked);
    }

    fn list(clusters: &[(u64, &[u8])]) -> ClusterChecksums {
        let mut list = ClusterChecksums::new(CLUSTER);
        for &(index, data) in clusters {
            list.push(index, data).unwrap();
        }
        list
    }

    /// An overlay storing cluster 1 over a base storing clusters 0 and 1.
    fn chain() -> ChainChecksums {
        ChainChecksums::new(vec![
            ("backup v/top".into(), list(&[(1, b"new")])),
            ("backup v/base".into(), list(&[(0, b"zero"), (1, b"old")])),
        ])
    }

    #[test]
    fn accepts_what_the_lists_say() {
        let check = chain();
        assert_eq!(check.stored(0, CLUSTER, b"new"), Ok(()));
        assert_eq!(check.stored(1, 0, b"zero"), Ok(()));
        assert_eq!(check.zeros(None, 2 * CLUSTER, 10 * CLUSTER), Ok(()));
        // The overlay zeroes cluster 0 over the base: listed below, decided above.
        assert_eq!(check.zeros(Some(0), 0, CLUSTER), Ok(()));
    }

    #[test]
    fn a_changed_byte_fails_with_both_checksums() {
        let failure = chain().stored(0, CLUSTER, b"nex").unwrap_err();
        assert_eq!(failure.depth, 0);
        assert_eq!(failure.guest_offset, CLUSTER);
        assert_eq!(
            failure.problem,
            format!(
                "fails its checksum (stored {:08x}, read {:08x})",
                crc32fast::hash(b"new"),
                crc32fast::hash(b"nex")
            )
        );
    }

    #[test]
    fn a_cluster_the_top_lists_but_reads_from_below_blames_the_top() {
        // The overlay's mapping lost cluster 1, so the base's old data shows through.
        let failure = chain().stored(1, CLUSTER, b"old").unwrap_err();
        assert_eq!((failure.depth, failure.guest_offset), (0, CLUSTER));
        assert_eq!(
            failure.problem,
            "is in its checksum list but the chain reads it from backup v/base"
        );
    }

    #[test]
    fn listed_clusters_reading_as_zeros_fail() {
        let check = chain();
        let failure = check.zeros(None, 0, 4 * CLUSTER).unwrap_err();
        assert_eq!((failure.depth, failure.guest_offset), (0, CLUSTER));
        let failure = check.zeros(Some(1), 0, 100).unwrap_err();
        assert_eq!((failure.depth, failure.guest_offset), (1, 0));
        assert_eq!(
            failure.problem,
            "is in its checksum list but reads as zeros"
        );
    }

    #[test]
    fn unlisted_stored_clusters_fail() {
        let failure = chain().stored(1, 5 * CLUSTER, b"x").unwrap_err();
        assert_eq!((failure.depth, failure.guest_offset), (1, 5 * CLUSTER));
        assert!(
            failure
                .problem
                .starts_with("is stored but not in its checksum list")
        );
        let failure = chain().stored(2, 0, b"x").unwrap_err();
        assert_eq!(
            failure.problem,
            "is read from an image without a checksum list"
        );
    }
}
