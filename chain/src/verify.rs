//! Verify: check an image's structure and every stored cluster against its checksum, without
//! restoring anything.

use strata_qcow2::{ExtentKind, Image};

use crate::checksum::ClusterChecksums;

/// One problem found in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Guest offset of the damaged cluster (or where the structure could not be read).
    pub guest_offset: u64,
    /// What is wrong.
    pub problem: String,
}

/// Verifies the clusters stored in the top image of `image` against `checksums`.
///
/// Structure is checked by walking every L1 and L2 entry (through the reader's validation);
/// each stored cluster is read (decompressed where compressed) and its CRC-32 compared.
/// Clusters stored but not listed, and listed but not stored, are damage too.
pub fn verify(image: &Image, checksums: &ClusterChecksums) -> Vec<Damage> {
    let cluster = image.cluster_size();
    let mut damage = Vec::new();
    if checksums.cluster_size != cluster {
        damage.push(Damage {
            guest_offset: 0,
            problem: format!(
                "checksums cover {} byte clusters, the image has {cluster}",
                checksums.cluster_size
            ),
        });
        return damage;
    }
    let stored = match stored_clusters(image) {
        Ok(stored) => stored,
        Err(e) => {
            damage.push(Damage {
                guest_offset: error_offset(&e),
                problem: format!("image structure: {e}"),
            });
            return damage;
        }
    };
    let expected = checksums.entries();
    let (mut i, mut j) = (0, 0);
    let mut buf = vec![0u8; cluster as usize];
    while i < stored.len() || j < expected.len() {
        let have = stored.get(i).copied();
        let want = expected.get(j).map(|&(index, _)| index);
        match (have, want) {
            (Some(h), Some(w)) if h == w => {
                let offset = h * cluster;
                let len = cluster.min(image.virtual_size() - offset) as usize;
                match image.read_at(&mut buf[..len], offset) {
                    Ok(()) => {
                        let crc = crc32fast::hash(&buf[..len]);
                        if crc != expected[j].1 {
                            damage.push(Damage {
                                guest_offset: offset,
                                problem: format!(
                                    "checksum mismatch: stored {:08x}, data {crc:08x}",
                                    expected[j].1
                                ),
                            });
                        }
                    }
                    Err(e) => damage.push(Damage {
                        guest_offset: offset,
                        problem: format!("unreadable: {e}"),
                    }),
                }
                i += 1;
                j += 1;
            }
            (Some(h), w) if w.is_none_or(|w| h < w) => {
                damage.push(Damage {
                    guest_offset: h * cluster,
                    problem: "cluster stored but not in the checksum list".into(),
                });
                i += 1;
            }
            (_, Some(w)) => {
                damage.push(Damage {
                    guest_offset: w * cluster,
                    problem: "cluster in the checksum list is not stored".into(),
                });
                j += 1;
            }
            _ => break,
        }
    }
    damage
}

fn error_offset(e: &strata_qcow2::Error) -> u64 {
    match e {
        strata_qcow2::Error::OutOfRange { offset, .. } => *offset,
        _ => 0,
    }
}

/// The clusters stored in the top image of `image`'s chain, ascending.
fn stored_clusters(image: &Image) -> Result<Vec<u64>, strata_qcow2::Error> {
    let cluster = image.cluster_size();
    let mut stored: Vec<u64> = Vec::new();
    image.for_each_extent(0, image.virtual_size(), |extent| {
        if matches!(
            extent.kind,
            ExtentKind::Data { depth: 0, .. } | ExtentKind::Compressed { depth: 0, .. }
        ) {
            for index in extent.range().clusters(cluster) {
                if stored.last() != Some(&index) {
                    stored.push(index);
                }
            }
        }
        Ok(())
    })?;
    Ok(stored)
}

/// Computes the checksum list of the clusters stored in the top image of `image`'s chain, as
/// a backup or merge records it while writing: for an image whose list was lost (a fold that
/// stopped half-way), not as a check, since it trusts what is stored.
pub fn stored_checksums(image: &Image) -> crate::Result<ClusterChecksums> {
    let cluster = image.cluster_size();
    let mut checksums = ClusterChecksums::new(cluster);
    let mut buf = vec![0u8; cluster as usize];
    for index in stored_clusters(image)? {
        let offset = index * cluster;
        let len = cluster.min(image.virtual_size() - offset) as usize;
        image.read_at(&mut buf[..len], offset)?;
        checksums.push(index, &buf[..len]);
    }
    Ok(checksums)
}
