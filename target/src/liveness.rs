//! Writer liveness: how a backup writer proves it is alive, and how a later writer recognises a
//! dead one and takes over the child slot it left behind.
//!
//! Before it claims anything, every writer records itself in `writers/<token>.json` (the
//! random token its claim and child slot carry) and keeps proving it is alive until it
//! commits or gives up:
//!
//! - **Folder and NFS targets**: the writer holds an exclusive `flock` on its record for as
//!   long as it runs. The kernel drops the lock when the process dies, however it dies
//!   (SIGKILL, an OOM kill, the end of the pod); on NFS the lock lives on the server and is
//!   dropped when the client's state expires. A record whose lock can be taken belongs to a
//!   dead writer, so a later writer takes over at once. (NFS mounts with `nolock` keep locks
//!   local to each client and are not supported.)
//! - **Object stores**: the writer rewrites its record every third of its lease
//!   ([`TargetOptions::lease`](crate::TargetOptions::lease), 30 s by default), so a record that
//!   has not changed for a whole lease belongs to a dead or cut-off writer. A later writer
//!   judges that by watching the record's e-tag, so the clocks of writer, store and reader
//!   need not agree. A record already older than two leases and a second (Last-Modified has
//!   one-second resolution on S3) counts as lapsed at once, both times by the store's clock:
//!   the judge's "now" is the Last-Modified of an object it has just written itself (its own
//!   writer record, or a probe in `clock/`), never its own clock.
//!
//! A writer refuses to commit unless it renewed its lease within the last half lease, and a
//! later writer takes over only after a full lease without a renewal, so a live writer is
//! never superseded unless it stalls for more than half a lease between that check and its
//! commit.
//!
//! Taking over a dead writer's slot on parent `P` starts with the create-only record
//! `takeovers/<P>/<dead token>.json`: one writer wins it, so two writers can never both take
//! over the same slot (create-only puts are the one conditional write every object_store
//! backend offers, the local filesystem included). The winner removes the dead writer's slot
//! only if it still holds exactly the bytes it judged dead, then creates its own slot
//! create-only, which a fresh writer may still win first.

use std::fs::File;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::{Reservation, from_json, to_json};
use crate::name::{BackupId, VolumeName};
use crate::target::{Created, Inner};

/// The longest lease a writer record is believed to ask for.
pub(crate) const MAX_LEASE: Duration = Duration::from_secs(600);

/// The record a live writer keeps (`writers/<token>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WriterRecord {
    writer: String,
    volume: VolumeName,
    /// The backup a writer writes; none in a reader's record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backup: Option<BackupId>,
    /// A reader's record only: the backups of the chain it reads, empty until it has opened
    /// the chain (then it counts as reading every backup of the volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reading: Option<Vec<BackupId>>,
    /// The lease, in milliseconds, on object stores; folder writers hold a lock instead.
    lease_ms: u64,
    /// How often the record was renewed, so that every renewal changes its bytes.
    renewals: u64,
    renewed: DateTime<Utc>,
}

impl WriterRecord {
    /// The record of holder `token` of `volume`, under the target's lease; `reading` for a
    /// reader.
    pub(crate) fn new(
        inner: &Inner,
        token: &str,
        volume: &VolumeName,
        reading: Option<Vec<BackupId>>,
    ) -> Self {
        WriterRecord {
            writer: token.to_owned(),
            volume: volume.clone(),
            backup: None,
            reading,
            lease_ms: u64::try_from(inner.options.lease.as_millis()).unwrap_or(u64::MAX),
            renewals: 0,
            renewed: Utc::now(),
        }
    }
}

/// What a later writer makes of the writer named by a reservation.
#[derive(Debug)]
pub(crate) enum Liveness {
    /// It holds its lock, or renewed its lease recently.
    Alive,
    /// Its lock is free, its record is gone, or its lease lapsed long ago.
    Dead,
    /// On an object store: its record is recent; it is dead if the record does not change for a
    /// whole lease (the holder's own).
    Watch {
        /// What the record looked like.
        seen: ObjectMeta,
        /// The holder's lease.
        lease: Duration,
    },
}

/// A live writer's proof of life, held by its upload until it commits or gives up.
#[derive(Debug)]
pub(crate) struct WriterLease {
    path: Path,
    /// Folder targets: the file whose `flock` proves the writer alive.
    lock: Option<File>,
    /// Object stores: the task that renews the record.
    renewer: Option<tokio::task::AbortHandle>,
    /// Until when the lease is surely still ours (half a lease after the last renewal began).
    valid_until: Arc<Mutex<Instant>>,
    record: Arc<Mutex<WriterRecord>>,
}

impl WriterLease {
    /// Records the writer of `reservation` and starts proving it alive.
    pub(crate) async fn acquire(
        inner: &Arc<Inner>,
        volume: &VolumeName,
        reservation: &Reservation,
    ) -> Result<Self> {
        let path = inner.layout.writer(volume, &reservation.writer);
        let record = WriterRecord::new(inner, &reservation.writer, volume, None);
        let record = WriterRecord {
            backup: Some(reservation.backup.clone()),
            ..record
        };
        Self::hold(inner, path, record)
            .await?
            .ok_or_else(|| Error::BackupExists {
                volume: volume.to_string(),
                id: reservation.backup.to_string(),
            })
    }

    /// Writes `record` at `path` (create-only: `None` when one is there already) and starts
    /// proving its holder alive: a writer's, or a reader's ([`crate::ReadLease`]).
    pub(crate) async fn hold(
        inner: &Arc<Inner>,
        path: Path,
        record: WriterRecord,
    ) -> Result<Option<Self>> {
        let lease = inner.options.lease;
        let started = Instant::now();
        if let Created::Exists(_) = inner.put_create(&path, to_json(&record).into()).await? {
            return Ok(None);
        }
        let valid_until = Arc::new(Mutex::new(started + lease / 2));
        let record = Arc::new(Mutex::new(record));
        let (lock, renewer) = match &inner.local_root {
            Some(root) => {
                let file_path = crate::url::local_path(root, &path);
                // Writable: a reader's record is rewritten through this locked handle
                // (`set_reading`); a put would replace the file, and the lock with it.
                let file = File::options()
                    .read(true)
                    .write(true)
                    .open(&file_path)
                    .map_err(|err| Error::io("open", file_path.display(), err))?;
                rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                    .map_err(|err| Error::io("lock", file_path.display(), err.into()))?;
                (Some(file), None)
            }
            None => {
                let task = renew(
                    Arc::downgrade(inner),
                    path.clone(),
                    record.clone(),
                    valid_until.clone(),
                );
                (
                    None,
                    Some(inner.runtime.handle().spawn(task).abort_handle()),
                )
            }
        };
        Ok(Some(Self {
            path,
            lock,
            renewer,
            valid_until,
            record,
        }))
    }

    /// Replaces the record's list of backups read, and writes it now.
    pub(crate) async fn set_reading(&self, inner: &Inner, reading: Vec<BackupId>) -> Result<()> {
        if let Ok(mut record) = self.record.lock() {
            record.reading = Some(reading);
        }
        let Some(file) = &self.lock else {
            return renew_once(inner, &self.path, &self.record, &self.valid_until).await;
        };
        // On a folder the record is rewritten in place, through the handle that holds its lock
        // (a reader of it meanwhile may see it torn: it then counts as reading everything).
        let bytes = to_json(&*self.record.lock().map_err(|_| poisoned(&self.path))?);
        let written = file
            .set_len(0)
            .and_then(|()| std::os::unix::fs::FileExt::write_all_at(file, &bytes, 0));
        written.map_err(|err| Error::io("write", self.path.as_ref(), err))
    }

    /// Makes sure the lease is still ours for at least half a lease: renews it now unless the
    /// last renewal is recent enough. Fails when the store cannot be reached.
    pub(crate) async fn confirm(&self, inner: &Inner) -> Result<()> {
        if self.renewer.is_none() {
            return Ok(());
        }
        let fresh = self
            .valid_until
            .lock()
            .map(|until| Instant::now() < *until)
            .unwrap_or(false);
        if !fresh {
            renew_once(inner, &self.path, &self.record, &self.valid_until).await?;
        }
        Ok(())
    }

    /// Stops proving the writer alive and removes its record (after a commit or an abandon).
    pub(crate) async fn release(&self, inner: &Inner) -> Result<()> {
        if let Some(renewer) = &self.renewer {
            renewer.abort();
        }
        inner.delete(&self.path).await
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        if let Some(renewer) = &self.renewer {
            renewer.abort();
        }
    }
}

async fn renew(
    inner: Weak<Inner>,
    path: Path,
    record: Arc<Mutex<WriterRecord>>,
    valid_until: Arc<Mutex<Instant>>,
) {
    loop {
        let Some(lease) = inner.upgrade().map(|inner| inner.options.lease) else {
            return;
        };
        tokio::time::sleep(lease / 3).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // A failed renewal is retried at the next tick; `confirm` refuses the commit if the
        // lease is not renewed in time.
        let _ = renew_once(&inner, &path, &record, &valid_until).await;
    }
}

async fn renew_once(
    inner: &Inner,
    path: &Path,
    record: &Mutex<WriterRecord>,
    valid_until: &Mutex<Instant>,
) -> Result<()> {
    let started = Instant::now();
    let bytes: Bytes = {
        let mut record = record.lock().map_err(|_| poisoned(path))?;
        record.renewals += 1;
        record.renewed = Utc::now();
        to_json(&*record).into()
    };
    inner.put(path, bytes).await?;
    let mut until = valid_until.lock().map_err(|_| poisoned(path))?;
    *until = (*until).max(started + inner.options.lease / 2);
    Ok(())
}

/// The error for an overlay whose parent backup is not (or no longer) committed.
pub(crate) fn parent_gone(volume: &VolumeName, parent: &BackupId) -> Error {
    Error::NotFound {
        what: "parent backup",
        name: format!("{volume}/{parent}"),
    }
}

fn poisoned(path: &Path) -> Error {
    Error::Upload {
        path: path.to_string(),
        reason: "the lease renewal panicked".into(),
    }
}

impl Inner {
    /// The store's clock, on an object store: the Last-Modified of a probe written now (and
    /// removed again; `gc` removes one a killed process left). `None` on a folder, whose
    /// writers are judged by their locks.
    pub(crate) async fn store_now(&self, volume: &VolumeName) -> Result<Option<DateTime<Utc>>> {
        if self.local_root.is_some() {
            return Ok(None);
        }
        let probe = self
            .layout
            .clock_probe(volume, &format!("{:016x}", rand::random::<u64>()));
        self.put(&probe, Bytes::new()).await?;
        let meta = self
            .options
            .retry
            .run(|| self.store.head(&probe))
            .await
            .map_err(|err| Error::store("head", &probe, err));
        self.delete(&probe).await?;
        Ok(Some(meta?.last_modified))
    }

    /// [`store_now`](Self::store_now), read once per `clock` (`None` until first asked).
    pub(crate) async fn store_now_once(
        &self,
        volume: &VolumeName,
        clock: &mut Option<Option<DateTime<Utc>>>,
    ) -> Result<Option<DateTime<Utc>>> {
        if let Some(now) = *clock {
            return Ok(now);
        }
        let now = self.store_now(volume).await?;
        *clock = Some(now);
        Ok(now)
    }

    /// Whether the writer `token` of `volume` is alive (see the module docs). `now` is the
    /// store's time (see [`store_now`](Self::store_now)); without it a recent-looking record is
    /// only ever watched.
    pub(crate) async fn liveness(
        &self,
        volume: &VolumeName,
        token: &str,
        now: Option<DateTime<Utc>>,
    ) -> Result<Liveness> {
        if token.is_empty()
            || token.len() > 64
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::Corrupt {
                what: "reservation",
                path: self.layout.volume(volume).to_string(),
                reason: format!("writer token {token:?} is not a plain token"),
            });
        }
        self.liveness_at(&self.layout.writer(volume, token), now)
            .await
            .map(|(liveness, _)| liveness)
    }

    /// [`liveness`](Self::liveness) of the holder of the record at `path` (a writer's or a
    /// reader's), with the record where it was read (object stores only).
    pub(crate) async fn liveness_at(
        &self,
        path: &Path,
        now: Option<DateTime<Utc>>,
    ) -> Result<(Liveness, Option<WriterRecord>)> {
        if let Some(root) = &self.local_root {
            let file_path = crate::url::local_path(root, path);
            // Opened for writing where allowed: on NFS, `flock` is a POSIX lock over the
            // whole file, and an exclusive one needs a descriptor open for writing (EBADF on a
            // read-only one). Read-only credentials fall back to a read-only descriptor.
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&file_path)
                .or_else(|err| match err.kind() {
                    std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem => File::open(&file_path),
                    _ => Err(err),
                });
            let file = match opened {
                Ok(file) => file,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    return Ok((Liveness::Dead, None));
                }
                Err(err) => return Err(Error::io("open", file_path.display(), err)),
            };
            return match rustix::fs::flock(
                &file,
                rustix::fs::FlockOperation::NonBlockingLockExclusive,
            ) {
                Ok(()) => Ok((Liveness::Dead, None)),
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    // Its holder's: what it says (a reader's chain) is read while it is held.
                    let record = std::fs::read(&file_path)
                        .ok()
                        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
                    Ok((Liveness::Alive, record))
                }
                Err(err) => Err(Error::io("lock", file_path.display(), err.into())),
            };
        }
        let meta = match self.options.retry.run(|| self.store.head(path)).await {
            Ok(meta) => meta,
            Err(object_store::Error::NotFound { .. }) => return Ok((Liveness::Dead, None)),
            Err(err) => return Err(Error::store("head", path, err)),
        };
        let record: WriterRecord = match self.get_bytes(path).await {
            Ok(bytes) => from_json("writer record", path.as_ref(), &bytes)?,
            Err(Error::NotFound { .. }) => return Ok((Liveness::Dead, None)),
            Err(err) => return Err(err),
        };
        // The holder's own lease counts, bounded so that a hostile record cannot stall us.
        let lease = Duration::from_millis(record.lease_ms).min(MAX_LEASE);
        // Two leases, plus a second for stores whose Last-Modified has one-second resolution.
        let lapsed = chrono::Duration::from_std(lease * 2 + Duration::from_secs(1))
            .is_ok_and(|two_leases| now.is_some_and(|now| meta.last_modified + two_leases < now));
        Ok(if lapsed {
            (Liveness::Dead, Some(record))
        } else {
            (Liveness::Watch { seen: meta, lease }, Some(record))
        })
    }

    /// Watches the record of writer `token` for a whole lease: `true` when it did not change
    /// (the writer is dead), `false` as soon as it does (it renewed its lease).
    pub(crate) async fn lease_lapses(
        &self,
        volume: &VolumeName,
        token: &str,
        seen: &ObjectMeta,
        lease: Duration,
    ) -> Result<bool> {
        let path = self.layout.writer(volume, token);
        let deadline = Instant::now() + lease;
        let poll = (lease / 10).clamp(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            if Instant::now() >= deadline {
                return Ok(true);
            }
            tokio::time::sleep(poll.min(deadline - Instant::now())).await;
            match self.options.retry.run(|| self.store.head(&path)).await {
                Ok(meta)
                    if meta.e_tag == seen.e_tag && meta.last_modified == seen.last_modified => {}
                // Renewed, or removed at a commit or abandon: either way not a dead writer's.
                Ok(_) | Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(err) => return Err(Error::store("head", &path, err)),
            }
        }
    }

    /// Takes the child slot of `parent` for `ours`, taking over a slot left by a dead writer.
    /// `notice` hears of a wait for a lease to lapse.
    pub(crate) async fn take_child_slot(
        &self,
        volume: &VolumeName,
        parent: &BackupId,
        ours: &Reservation,
    ) -> Result<()> {
        let slot = self.layout.child_slot(volume, parent);
        let bytes: Bytes = to_json(ours).into();
        // The store's time, read once a holder must be judged (the first put usually wins).
        let mut now: Option<Option<DateTime<Utc>>> = None;
        // Each round either wins the slot or removes a dead writer's; a live one ends it.
        for _ in 0..8 {
            let held = match self.put_create(&slot, bytes.clone()).await? {
                Created::New => return Ok(()),
                Created::Exists(held) => held,
            };
            let holder: Reservation = from_json("child slot", slot.as_ref(), &held)?;
            if &holder.backup == parent {
                // A deleter's tombstone (see `delete_backup`): the parent is going away.
                return Err(match self.is_committed(volume, parent).await? {
                    true => Error::BeingDeleted {
                        volume: volume.to_string(),
                        id: parent.to_string(),
                    },
                    false => parent_gone(volume, parent),
                });
            }
            let not_head = || Error::ParentNotHead {
                volume: volume.to_string(),
                parent: parent.to_string(),
                child: holder.backup.to_string(),
            };
            if self.is_committed(volume, &holder.backup).await? {
                return Err(not_head());
            }
            let now = match now {
                Some(now) => now,
                None => *now.insert(self.own_record_time(volume, ours).await),
            };
            match self.liveness(volume, &holder.writer, now).await? {
                Liveness::Alive => return Err(not_head()),
                Liveness::Dead => {}
                Liveness::Watch { seen, lease } => {
                    self.options.notices.tell(&format!(
                        "backup {} of volume {volume} extending {parent} may belong to a dead \
                         writer; waiting up to {}s for its lease to lapse",
                        holder.backup,
                        lease.as_secs_f64().ceil()
                    ));
                    if !self
                        .lease_lapses(volume, &holder.writer, &seen, lease)
                        .await?
                    {
                        return Err(not_head());
                    }
                }
            }
            // A backup committed while we looked is a live child after all.
            if self.is_committed(volume, &holder.backup).await? {
                return Err(not_head());
            }
            let takeover = self.layout.takeover(volume, parent, &holder.writer);
            if let Created::Exists(record) = self.put_create(&takeover, bytes.clone()).await? {
                // Another writer is taking this slot over; see what it holds next round. One
                // that died between its record and the slot's removal (killed, a failed
                // request) would hold every later writer off until gc's grace: its record is
                // removed once its own writer is judged dead, and the slot taken over anew.
                let taker: Option<Reservation> =
                    from_json("takeover record", takeover.as_ref(), &record).ok();
                let dead = match &taker {
                    Some(taker) => match self.liveness(volume, &taker.writer, now).await? {
                        Liveness::Alive => false,
                        Liveness::Dead => true,
                        Liveness::Watch { seen, lease } => {
                            self.lease_lapses(volume, &taker.writer, &seen, lease)
                                .await?
                        }
                    },
                    // Not a record a writer wrote: nobody is taking over through it.
                    None => true,
                };
                if dead {
                    self.delete(&takeover).await?;
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
            crate::failpoint::hit("takeover-recorded");
            match self.get_bytes(&slot).await {
                Ok(now) if now == held => {
                    self.delete(&slot).await?;
                    self.options.notices.tell(&format!(
                        "took over from the dead writer of backup {} of volume {volume} \
                         (never committed); extending {parent}",
                        holder.backup
                    ));
                }
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        Err(Error::Upload {
            path: slot.to_string(),
            reason: "the child slot kept changing hands".into(),
        })
    }

    /// The store's time by the Last-Modified of `ours`'s writer record, written just before
    /// its claim (a lower bound, so a holder is judged lapsed later rather than sooner); `None`
    /// on a folder, or when the record cannot be read.
    async fn own_record_time(
        &self,
        volume: &VolumeName,
        ours: &Reservation,
    ) -> Option<DateTime<Utc>> {
        if self.local_root.is_some() {
            return None;
        }
        let own = self.layout.writer(volume, &ours.writer);
        let meta = self.options.retry.run(|| self.store.head(&own)).await;
        meta.ok().map(|meta| meta.last_modified)
    }

    /// Whether backup `id` of `volume` has a manifest.
    pub(crate) async fn is_committed(&self, volume: &VolumeName, id: &BackupId) -> Result<bool> {
        match self.manifest(volume, id).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(err) => Err(err),
        }
    }
}
