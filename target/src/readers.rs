//! Readers' leases: what a reader reads stays while it reads.
//!
//! A restore or an NBD export of a backup reads the objects of its chain for as long as it
//! runs, hours for a large volume. Meanwhile `prune` may fold the chain's oldest backups
//! (superseding objects the reader still reads) and `gc` may remove what a fold superseded
//! once the grace period is over. So a reader records itself in `readers/<token>.json` and
//! proves it is alive as a writer does ([`crate::liveness`]: an `flock` held on the record on
//! a folder, the record renewed every third of a lease on an object store), and says which
//! backups it reads once it has opened their chain. While any reader of a volume is alive:
//! - `gc` keeps every object a fold superseded, however old (it removes them on a later run);
//! - [`Target::delete_backup`] refuses a backup a reader reads (or any, before the reader has
//!   said which it reads), with [`Error::BeingRead`].
//!
//! A killed reader's record is judged dead as a killed writer's is, and `gc` removes it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::error::{Error, Result};
use crate::liveness::{Liveness, MAX_LEASE, WriterLease, WriterRecord};
use crate::name::{BackupId, VolumeName};
use crate::target::{Inner, Target};

/// How long a reader's record on a folder counts as alive while its lock is free: the moment
/// between its creation and its `flock`, with room for the file system's timestamps.
const FRESH: Duration = Duration::from_secs(10);

/// A live reader's record, held for as long as it reads ([`Target::begin_read`]). Dropped, it
/// stops proving the reader alive and removes its record (best effort: `gc` removes a record
/// left behind).
#[derive(Debug)]
pub struct ReadLease {
    target: Target,
    lease: Option<Arc<WriterLease>>,
}

impl Target {
    /// Records a reader of `volume` and starts proving it alive: hold the returned lease while
    /// the chain is read, and call [`ReadLease::reading`] once it is known.
    pub fn begin_read(&self, volume: &VolumeName) -> Result<ReadLease> {
        let volume = volume.clone();
        let token = format!(
            "reader-{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let lease = self.block("record a reader", move |inner| async move {
            let path = inner.layout.reader(&volume, &token);
            let record = WriterRecord::new(&inner, &token, &volume, Some(Vec::new()));
            WriterLease::hold(&inner, path.clone(), record)
                .await?
                .ok_or_else(|| Error::Corrupt {
                    what: "reader record",
                    path: path.to_string(),
                    reason: "a record of this random token exists already".into(),
                })
        })?;
        Ok(ReadLease {
            target: self.clone(),
            lease: Some(Arc::new(lease)),
        })
    }
}

impl Target {
    /// [`begin_read`](Self::begin_read), or `None` where the reader cannot be recorded
    /// (credentials or a mount that only read): said through the target's notices, and the
    /// chain is read unrecorded, as before readers were recorded.
    pub fn try_begin_read(&self, volume: &VolumeName) -> Option<ReadLease> {
        match self.begin_read(volume) {
            Ok(lease) => Some(lease),
            Err(e) => {
                self.inner.options.notices.tell(&format!(
                    "reading volume {volume} unrecorded ({e}): gc may remove what a fold \
                     supersedes meanwhile"
                ));
                None
            }
        }
    }
}

impl ReadLease {
    /// Says which backups the reader reads (its chain's): from then on only their deletion is
    /// refused.
    pub fn reading(&self, backups: &[BackupId]) -> Result<()> {
        let Some(lease) = self.lease.clone() else {
            return Ok(());
        };
        let backups = backups.to_vec();
        self.target
            .block("record what a reader reads", move |inner| async move {
                lease.set_reading(&inner, backups).await
            })
    }
}

impl Drop for ReadLease {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let _ = self
                .target
                .block("remove a reader's record", move |inner| async move {
                    lease.release(&inner).await
                });
        }
    }
}

impl Inner {
    /// The live readers of `volume`, each with the backups it reads (empty: not known yet).
    /// A reader still within its lease on an object store counts as alive; on a folder, one
    /// holding its record's lock, and any record younger than [`FRESH`] whatever its lock says
    /// (a reader locks its record just after creating it). Records of dead readers are
    /// removed.
    pub(crate) async fn live_readers(&self, volume: &VolumeName) -> Result<Vec<Vec<BackupId>>> {
        self.live_readers_removing(volume, &mut Vec::new()).await
    }

    /// [`live_readers`](Self::live_readers), adding to `removed` the keys of the dead
    /// readers' records it removed (for [`crate::GcReport`]).
    pub(crate) async fn live_readers_removing(
        &self,
        volume: &VolumeName,
        removed: &mut Vec<String>,
    ) -> Result<Vec<Vec<BackupId>>> {
        let mut live = Vec::new();
        let mut clock = None;
        let fresh = chrono::Duration::from_std(FRESH).unwrap_or(chrono::Duration::MAX);
        for meta in self
            .list(&self.layout.volume_dir(volume, "readers"))
            .await?
        {
            let now = self.store_now_once(volume, &mut clock).await?;
            let fresh = self.local_root.is_some() && meta.last_modified + fresh > Utc::now();
            match self.liveness_at(&meta.location, now).await {
                Ok((Liveness::Dead, _)) if !fresh => {
                    self.delete(&meta.location).await?;
                    removed.push(meta.location.to_string());
                }
                Ok((Liveness::Dead, _)) => live.push(Vec::new()),
                Ok((_, record)) => {
                    live.push(record.and_then(|record| record.reading).unwrap_or_default())
                }
                // Not a record (damaged, or put there by hand): judged by its age alone, by
                // the store's clock, against the longest lease a record may ask for, so that
                // it cannot hold gc and deletes off for ever.
                Err(Error::Corrupt { .. }) => {
                    let stale = chrono::Duration::from_std(MAX_LEASE * 2)
                        .is_ok_and(|two| meta.last_modified + two < now.unwrap_or_else(Utc::now));
                    match stale {
                        true => {
                            self.delete(&meta.location).await?;
                            removed.push(meta.location.to_string());
                        }
                        false => live.push(Vec::new()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(live)
    }
}
