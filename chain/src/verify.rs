//! Verify: check an image's structure and every stored cluster against its checksum, without
//! restoring anything.

use strata_qcow2::{ExtentKind, Image};

use crate::checksum::ClusterChecksums;

/// One problem found in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Guest offset of the damaged cluster, or where the structure could not be read; `None`
    /// for a problem of no one place (a checksum list that does not fit the image).
    pub guest_offset: Option<u64>,
    /// What is wrong.
    pub problem: String,
}

/// Damage reported for one image at most; past it, one more entry counts the rest (a
/// hostile or wholly corrupt image must not make the report grow with the volume).
pub const MAX_DAMAGE: usize = 10_000;

/// Verifies the clusters stored in the top image of `image` against `checksums`.
///
/// At most [`MAX_DAMAGE`] problems are listed, then one saying how many more were found.
///
/// Structure is checked by walking every L1 and L2 entry (through the reader's validation);
/// each stored cluster is read (decompressed where compressed) and its CRC-32 compared.
/// Clusters stored but not listed, and listed but not stored, are damage too.
pub fn verify(image: &Image, checksums: &ClusterChecksums) -> Vec<Damage> {
    let cluster = image.cluster_size();
    let mut damage = Vec::new();
    if checksums.cluster_size != cluster {
        damage.push(Damage {
            guest_offset: None,
            problem: format!(
                "checksums cover {} byte clusters, the image has {cluster}",
                checksums.cluster_size
            ),
        });
        return damage;
    }
    let mut report = Report {
        listed: damage,
        more: 0,
    };
    let mut expected = checksums.cursor();
    let mut buf = vec![0u8; cluster as usize];
    let mut check = |index: Option<u64>, report: &mut Report| -> crate::Result<()> {
        // Entries listed below `index` (all of them at the end) are not stored.
        while let Some(want) = expected.peek()? {
            if index.is_some_and(|have| want > have) {
                break;
            }
            let Some((want, crc)) = expected.next()? else {
                break;
            };
            let crc = u32::from_be_bytes(crc);
            if Some(want) != index {
                report.add(Damage {
                    guest_offset: Some(want * cluster),
                    problem: "cluster in the checksum list is not stored".into(),
                });
                continue;
            }
            let offset = want * cluster;
            let len = cluster.min(image.virtual_size() - offset) as usize;
            match image.read_at(&mut buf[..len], offset) {
                Ok(()) => {
                    let read = crc32fast::hash(&buf[..len]);
                    if read != crc {
                        report.add(Damage {
                            guest_offset: Some(offset),
                            problem: format!(
                                "checksum mismatch: stored {crc:08x}, data {read:08x}"
                            ),
                        });
                    }
                }
                Err(e) => report.add(Damage {
                    guest_offset: Some(offset),
                    problem: format!("unreadable: {e}"),
                }),
            }
            return Ok(());
        }
        if let Some(have) = index {
            report.add(Damage {
                guest_offset: Some(have * cluster),
                problem: "cluster stored but not in the checksum list".into(),
            });
        }
        Ok(())
    };
    let mut list_error = None;
    let walked = for_each_stored(image, |index| {
        check(Some(index), &mut report).map_err(|e| {
            list_error = Some(e);
            stopped()
        })
    });
    let problem = match (walked, list_error) {
        (_, Some(e)) => Some((None, format!("checksum list: {e}"))),
        (Err(e), None) => Some((error_offset(&e), format!("image structure: {e}"))),
        (Ok(()), None) => check(None, &mut report)
            .err()
            .map(|e| (None, format!("checksum list: {e}"))),
    };
    if let Some((guest_offset, problem)) = problem {
        report.add(Damage {
            guest_offset,
            problem,
        });
    }
    report.finish()
}

/// Damage found so far: the first [`MAX_DAMAGE`] listed, the rest counted.
struct Report {
    listed: Vec<Damage>,
    more: u64,
}

impl Report {
    fn add(&mut self, damage: Damage) {
        if self.listed.len() < MAX_DAMAGE {
            self.listed.push(damage);
        } else {
            self.more += 1;
        }
    }

    fn finish(mut self) -> Vec<Damage> {
        if self.more > 0 {
            self.listed.push(Damage {
                guest_offset: None,
                problem: format!("{} more problems not listed", self.more),
            });
        }
        self.listed
    }
}

fn error_offset(e: &strata_qcow2::Error) -> Option<u64> {
    match e {
        strata_qcow2::Error::OutOfRange { offset, .. } => Some(*offset),
        _ => None,
    }
}

/// Calls `f` with every cluster stored in the top image of `image`'s chain, ascending.
fn for_each_stored(
    image: &Image,
    mut f: impl FnMut(u64) -> Result<(), strata_qcow2::Error>,
) -> Result<(), strata_qcow2::Error> {
    let cluster = image.cluster_size();
    let mut last: Option<u64> = None;
    image.for_each_extent(0, image.virtual_size(), |extent| {
        if matches!(
            extent.kind,
            ExtentKind::Data { depth: 0, .. } | ExtentKind::Compressed { depth: 0, .. }
        ) {
            for index in extent.range().clusters(cluster) {
                if last.is_none_or(|last| last < index) {
                    last = Some(index);
                    f(index)?;
                }
            }
        }
        Ok(())
    })
}

/// Computes the checksum list of the clusters stored in the top image of `image`'s chain, as
/// a backup or merge records it while writing: for an image whose list was lost (a fold that
/// stopped half-way), not as a check, since it trusts what is stored.
pub fn stored_checksums(image: &Image) -> crate::Result<ClusterChecksums> {
    let cluster = image.cluster_size();
    let mut checksums = ClusterChecksums::new(cluster);
    let mut buf = vec![0u8; cluster as usize];
    let mut failed = None;
    for_each_stored(image, |index| {
        let offset = index * cluster;
        let len = cluster.min(image.virtual_size() - offset) as usize;
        image.read_at(&mut buf[..len], offset)?;
        checksums.push(index, &buf[..len]).map_err(|e| {
            failed = Some(e);
            stopped()
        })
    })
    .map_err(|e| failed.take().unwrap_or(e.into()))?;
    Ok(checksums)
}

/// Stops a walk of the extents whose callback failed with an error of this crate (kept aside).
fn stopped() -> strata_qcow2::Error {
    strata_qcow2::Error::Io {
        image: String::new(),
        action: "stopped".into(),
        source: std::io::Error::other("stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_qcow2::{FileSink, WriterOptions};

    #[test]
    fn a_wholly_unlisted_image_lists_a_bounded_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.qcow2");
        let mut options = WriterOptions::default();
        options.cluster_size = 512;
        let clusters = MAX_DAMAGE as u64 + 5;
        let mut writer =
            strata_qcow2::Writer::new(FileSink::create(&path).unwrap(), &options, clusters * 512)
                .unwrap();
        writer
            .write_data(0, &vec![1u8; clusters as usize * 512])
            .unwrap();
        writer.finish().unwrap();
        let image = Image::open(&path).unwrap();
        let damage = verify(&image, &ClusterChecksums::new(512));
        assert_eq!(damage.len(), MAX_DAMAGE + 1);
        assert_eq!(
            damage[0].problem,
            "cluster stored but not in the checksum list"
        );
        assert_eq!(damage[MAX_DAMAGE].problem, "5 more problems not listed");
    }
}
