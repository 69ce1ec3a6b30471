//! The commit protocol where a review broke it: a commit whose answers are all lost, `gc` and
//! a delete racing a writer, writers whose clocks disagree with the store's, a disk that fills
//! at the header, staged uploads a killed writer leaves on a folder, and stored records too
//! large or unreadable. Each test fails without the fix it names.

mod common;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use strata_qcow2::ImageSink;
use strata_target::{
    BackupId, BackupManifest, BackupSpec, BackupUpload, Error, Target, TargetOptions, VolumeName,
};

type Hook = Box<dyn FnOnce() + Send>;

/// `InMemory` behind a store whose clock runs `skew` behind the client's (every Last-Modified
/// it reports is `skew` earlier), that can run a hook once (after it lists, or after it
/// reads, a key ending in a given text), and that can lose the answers to manifest
/// puts it stores.
struct Skewed {
    inner: Arc<InMemory>,
    skew: chrono::Duration,
    after_list: Mutex<Option<(String, Hook)>>,
    after_get: Mutex<Option<(String, Hook)>>,
    lost_manifest_answers: AtomicUsize,
    /// Cut off: every put fails, as for a writer whose network (or process) is gone.
    cut: std::sync::atomic::AtomicBool,
    /// Keys holding the text, reported older by the duration (listed and read).
    aged: Mutex<Option<(String, chrono::Duration)>>,
}

impl fmt::Debug for Skewed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Skewed")
    }
}

impl fmt::Display for Skewed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Skewed")
    }
}

impl Skewed {
    fn new(inner: Arc<InMemory>, skew: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            skew: chrono::Duration::from_std(skew).unwrap_or_default(),
            after_list: Mutex::new(None),
            after_get: Mutex::new(None),
            lost_manifest_answers: AtomicUsize::new(0),
            cut: std::sync::atomic::AtomicBool::new(false),
            aged: Mutex::new(None),
        })
    }

    /// How much older than it is the store reports `key`.
    fn age_of(&self, key: &str) -> chrono::Duration {
        match &*self.aged.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((text, age)) if key.contains(text.as_str()) => *age,
            _ => chrono::Duration::zero(),
        }
    }

    fn take_hook(slot: &Mutex<Option<(String, Hook)>>, key: &str) -> Option<Hook> {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some((suffix, _)) if key.ends_with(suffix.as_str()) => slot.take().map(|(_, h)| h),
            _ => None,
        }
    }
}

#[async_trait]
impl ObjectStore for Skewed {
    async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> Result<PutResult> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(object_store::Error::Generic {
                store: "Skewed",
                source: "cut off".into(),
            });
        }
        let manifest = l.as_ref().contains("/backups/");
        if manifest
            && self
                .lost_manifest_answers
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            // Stored, but the answer never arrives.
            let _ = self.inner.put_opts(l, p, o).await;
            return Err(object_store::Error::Generic {
                store: "Skewed",
                source: "connection reset".into(),
            });
        }
        self.inner.put_opts(l, p, o).await
    }

    async fn put_multipart_opts(
        &self,
        l: &Path,
        o: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(l, o).await
    }

    async fn get_opts(&self, l: &Path, o: GetOptions) -> Result<GetResult> {
        let mut got = self.inner.get_opts(l, o).await?;
        got.meta.last_modified -= self.skew + self.age_of(l.as_ref());
        if let Some(hook) = Self::take_hook(&self.after_get, l.as_ref()) {
            tokio::task::block_in_place(hook);
        }
        Ok(got)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let key = prefix.map(|p| p.to_string()).unwrap_or_default();
        let hook = Self::take_hook(&self.after_list, &key);
        let (inner, prefix, skew) = (self.inner.clone(), prefix.cloned(), self.skew);
        let aged = self.aged.lock().unwrap_or_else(|e| e.into_inner()).clone();
        futures::stream::once(async move {
            let mut items: Vec<ObjectMeta> = inner.list(prefix.as_ref()).try_collect().await?;
            for meta in &mut items {
                meta.last_modified -= skew;
                if let Some((text, age)) = &aged
                    && meta.location.as_ref().contains(text.as_str())
                {
                    meta.last_modified -= *age;
                }
            }
            if let Some(hook) = hook {
                tokio::task::block_in_place(hook);
            }
            Ok::<_, object_store::Error>(futures::stream::iter(items.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, o: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, o).await
    }
}

#[async_trait]
impl MultipartStore for Skewed {
    async fn create_multipart(&self, path: &Path) -> Result<MultipartId> {
        self.inner.create_multipart(path).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        idx: usize,
        data: PutPayload,
    ) -> Result<PartId> {
        self.inner.put_part(path, id, idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> Result<PutResult> {
        self.inner.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> Result<()> {
        self.inner.abort_multipart(path, id).await
    }
}

fn options() -> TargetOptions {
    let mut options = TargetOptions::default();
    options.lease = Duration::from_secs(1);
    options
}

fn spec(parent: Option<BackupId>) -> BackupSpec {
    BackupSpec {
        id: None,
        parent,
        virtual_size: 1 << 20,
        cluster_size: 65536,
    }
}

fn write_image(upload: &mut BackupUpload) {
    let mut sink = upload.image_sink().expect("sink");
    let header = vec![7u8; sink.min_header_len().max(512) as usize];
    sink.append(&[1, 2, 3]).expect("append");
    sink.finish(&header).expect("finish");
}

fn commit(target: &Target, volume: &VolumeName, parent: Option<BackupId>) -> BackupManifest {
    let mut upload = target.begin_backup(volume, spec(parent)).expect("begin");
    write_image(&mut upload);
    upload.commit().expect("commit")
}

/// A writer of an overlay on `parent` that stops for good once it has begun (it is cut off
/// from the store and never cleans up), as a killed one does.
fn stopped_writer(memory: &Arc<InMemory>, parent: &BackupId) {
    let store = Skewed::new(memory.clone(), Duration::ZERO);
    let writer = Target::from_store(store.clone(), "", options()).expect("target");
    let upload = writer
        .begin_backup(&volume(), spec(Some(parent.clone())))
        .expect("begin");
    store.cut.store(true, Ordering::SeqCst);
    std::mem::forget(upload);
}

/// A target holding a base backup of `volume()` whose overlay's writer stopped more than two
/// leases and a second ago.
fn base_with_a_long_stopped_writer() -> (Arc<InMemory>, Target, VolumeName, BackupManifest) {
    let memory = Arc::new(InMemory::new());
    let target = Target::from_store(memory.clone(), "", options()).expect("target");
    let v = volume();
    let base = commit(&target, &v, None);
    stopped_writer(&memory, &base.id);
    std::thread::sleep(Duration::from_millis(3300)); // two leases and a second
    (memory, target, v, base)
}

fn volume() -> VolumeName {
    VolumeName::new("data").expect("volume name")
}

/// Runs `future` to completion from a plain thread or from within a runtime (a hook).
fn run<T: Send + 'static>(future: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(future)
    })
    .join()
    .expect("store thread")
}

fn put(store: &Arc<InMemory>, key: &str, bytes: Vec<u8>) {
    let (store, key) = (store.clone(), Path::from(key));
    run(async move { store.put(&key, PutPayload::from(bytes)).await }).expect("put");
}

fn delete(store: &Arc<InMemory>, key: &str) {
    let (store, key) = (store.clone(), Path::from(key));
    run(async move { store.delete(&key).await }).expect("delete");
}

fn exists(store: &Arc<InMemory>, key: &str) -> bool {
    let (store, key) = (store.clone(), Path::from(key));
    run(async move { store.head(&key).await }).is_ok()
}

fn listed(store: &Arc<InMemory>, prefix: &str) -> Vec<ObjectMeta> {
    let (store, prefix) = (store.clone(), Path::from(prefix));
    run(async move { store.list(Some(&prefix)).try_collect::<Vec<_>>().await }).expect("list")
}

#[test]
fn a_commit_whose_answers_are_all_lost_is_read_back_and_committed() {
    let memory = Arc::new(InMemory::new());
    let store = Skewed::new(memory, Duration::ZERO);
    let target = Target::from_store(store.clone(), "", options()).expect("target");
    let v = volume();
    let mut upload = target.begin_backup(&v, spec(None)).expect("begin");
    write_image(&mut upload);
    // Every try of the manifest put is stored and its answer lost (the default policy tries 4
    // times); the store answers again afterwards.
    store.lost_manifest_answers.store(4, Ordering::SeqCst);
    let committed = upload.commit().expect("the stored manifest is read back");
    assert_eq!(store.lost_manifest_answers.load(Ordering::SeqCst), 0);
    let listed = target.backups(&v).expect("list");
    assert_eq!(listed, vec![committed.clone()]);
    target
        .verify_image(&v, &committed.id)
        .expect("the committed backup's image is there");
}

#[test]
fn gc_racing_a_commit_keeps_the_committed_backup_and_its_slot() {
    let memory = Arc::new(InMemory::new());
    let writer = Target::from_store(memory.clone(), "", options()).expect("target");
    let v = volume();
    let base = commit(&writer, &v, None);
    let mut upload = writer
        .begin_backup(&v, spec(Some(base.id.clone())))
        .expect("begin");
    write_image(&mut upload);
    let (listed_tx, listed_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let store = Skewed::new(memory, Duration::ZERO);
    *store.after_list.lock().expect("hook") = Some((
        "volumes/data".into(),
        Box::new(move || {
            listed_tx.send(()).expect("listed");
            go_rx.recv().expect("go");
        }),
    ));
    let collector = Target::from_store(store, "", options()).expect("target");
    let gv = v.clone();
    let gc = std::thread::spawn(move || collector.gc_volume(&gv, Duration::ZERO));
    listed_rx.recv().expect("gc listed the volume");
    let child = upload.commit().expect("commit while gc runs");
    go_tx.send(()).expect("go");
    let report = gc.join().expect("gc thread").expect("gc");
    assert!(
        report
            .removed
            .iter()
            .all(|key| !key.contains(child.id.as_str())),
        "gc removed the committed backup's objects: {:?}",
        report.removed
    );
    writer.verify_image(&v, &child.id).expect("image kept");
    match writer.begin_backup(&v, spec(Some(base.id.clone()))) {
        Err(Error::ParentNotHead { child: by, .. }) => assert_eq!(by, child.id.to_string()),
        other => panic!(
            "a second overlay on the base: {:?}",
            other.map(|u| u.id().clone())
        ),
    }
}

#[test]
fn a_client_whose_clock_runs_ahead_never_takes_over_a_live_writer() {
    let memory = Arc::new(InMemory::new());
    let a = Target::from_store(memory.clone(), "", options()).expect("target");
    // B's clock is 10 s ahead of the store's: what it reads was written 10 s "ago".
    let b = Target::from_store(Skewed::new(memory, Duration::from_secs(10)), "", options())
        .expect("target");
    let v = volume();
    let base = commit(&a, &v, None);
    let mut alive = a
        .begin_backup(&v, spec(Some(base.id.clone())))
        .expect("begin");
    std::thread::sleep(Duration::from_millis(700)); // A renews every 333 ms meanwhile
    let second = b.begin_backup(&v, spec(Some(base.id.clone())));
    assert!(
        matches!(second, Err(Error::ParentNotHead { .. })),
        "B took over a live writer: {:?}",
        second.map(|u| u.id().clone())
    );
    write_image(&mut alive);
    alive.commit().expect("the live writer commits");
}

#[test]
fn a_writer_that_stopped_long_ago_is_still_taken_over_at_once_by_the_stores_clock() {
    let (_, target, v, base) = base_with_a_long_stopped_writer();
    let started = std::time::Instant::now();
    let next = commit(&target, &v, Some(base.id.clone()));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "waited {:?} for a writer whose record lapsed long ago",
        started.elapsed()
    );
    assert_eq!(next.parent, Some(base.id));
}

#[test]
fn a_child_written_by_a_slow_clock_is_still_the_latest() {
    let memory = Arc::new(InMemory::new());
    let target = Target::from_store(memory.clone(), "", options()).expect("target");
    let v = volume();
    let base = commit(&target, &v, None);
    let child = commit(&target, &v, Some(base.id.clone()));
    // As the child's writer would have written it, its clock a minute behind the base's.
    let mut doc = child.clone();
    doc.created = base.created - chrono::Duration::seconds(60);
    put(
        &memory,
        &format!("volumes/data/backups/{}.json", child.id),
        serde_json::to_vec(&doc).expect("json"),
    );
    let listed: Vec<BackupId> = target
        .backups(&v)
        .expect("list")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, vec![base.id.clone(), child.id.clone()]);
    let latest = target.latest(&v).expect("latest").expect("some");
    assert_eq!(latest.id, child.id);
    let next = commit(&target, &v, Some(latest.id.clone()));
    assert_eq!(next.parent, Some(child.id));
}

/// A writer that has read `head`'s manifest, with `meanwhile` run on the store right after
/// that read (before it takes the child slot): what `begin_backup` of an overlay on `head` gives.
fn begin_while(
    memory: &Arc<InMemory>,
    head: &BackupManifest,
    meanwhile: impl FnOnce() + Send + 'static,
) -> std::result::Result<BackupUpload, Error> {
    let store = Skewed::new(memory.clone(), Duration::ZERO);
    *store.after_get.lock().expect("hook") =
        Some((format!("backups/{}.json", head.id), Box::new(meanwhile)));
    let writer = Target::from_store(store, "", options()).expect("target");
    writer.begin_backup(&volume(), spec(Some(head.id.clone())))
}

#[test]
fn an_overlay_on_a_parent_being_deleted_is_refused() {
    let memory = Arc::new(InMemory::new());
    let v = volume();
    let target = Target::from_store(memory.clone(), "", options()).expect("target");
    let base = commit(&target, &v, None);
    let head = commit(&target, &v, Some(base.id.clone()));
    let slot = format!("volumes/data/children/{}.json", head.id);
    let manifest = format!("volumes/data/backups/{}.json", head.id);
    let tombstone = serde_json::to_vec(&serde_json::json!({
        "backup": head.id.to_string(),
        "parent": null,
        "writer": "delete-00000000000000aa",
        "created": "2026-01-01T00:00:00Z",
    }))
    .expect("json");

    // A deleter puts its tombstone in the head's child slot (and is killed or still runs).
    let (m, t, s) = (memory.clone(), tombstone.clone(), slot.clone());
    match begin_while(&memory, &head, move || put(&m, &s, t)) {
        Err(Error::BeingDeleted { id, .. }) => assert_eq!(id, head.id.to_string()),
        other => panic!(
            "an overlay on a backup being deleted: {:?}",
            other.map(|u| u.id().clone())
        ),
    }

    // The deleter also removed the manifest, then was killed: its tombstone stays.
    let (m, s, d) = (memory.clone(), slot.clone(), manifest.clone());
    match begin_while(&memory, &head, move || {
        put(&m, &s, tombstone);
        delete(&m, &d);
    }) {
        Err(Error::NotFound { what, .. }) => assert_eq!(what, "parent backup"),
        other => panic!(
            "an overlay on a deleted backup: {:?}",
            other.map(|u| u.id().clone())
        ),
    }

    // A whole delete ran meanwhile (slot released again): the writer's slot is given back.
    put(&memory, &manifest, serde_json::to_vec(&head).expect("json"));
    delete(&memory, &slot);
    let (m, d) = (memory.clone(), manifest.clone());
    match begin_while(&memory, &head, move || delete(&m, &d)) {
        Err(Error::NotFound { what, .. }) => assert_eq!(what, "parent backup"),
        other => panic!(
            "an overlay on a deleted backup: {:?}",
            other.map(|u| u.id().clone())
        ),
    }
    assert!(!exists(&memory, &slot), "the refused writer kept the slot");
    let listed: Vec<BackupId> = target
        .backups(&v)
        .expect("list")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, vec![base.id]);
}

#[test]
fn a_backup_whose_header_meets_a_full_disk_leaves_no_partial_image() {
    let Some(disk) = common::Tmpfs::mount("8m") else {
        return;
    };
    let repo = disk.path().join("repo");
    let target = Target::open(repo.to_str().expect("utf-8")).expect("open");
    let v = volume();
    let mut upload = target.begin_backup(&v, spec(None)).expect("begin");
    let mut sink = upload.image_sink().expect("sink");
    let header_len = sink.min_header_len() as usize; // 2 MiB, reserved sparse
    // Fill the disk, then give back 1.5 MiB: the 1 MiB body fits, the 2 MiB header does not.
    let filler = std::fs::File::create(disk.path().join("filler")).expect("filler");
    let chunk = vec![0x5au8; 1 << 20];
    let mut len = 0u64;
    while std::os::unix::fs::FileExt::write_all_at(&filler, &chunk, len).is_ok() {
        len += chunk.len() as u64;
    }
    filler.set_len(len - (3 << 19)).expect("truncate");
    sink.append(&vec![0x33u8; 1 << 20]).expect("the body fits");
    let finished = sink.finish(&vec![0x44u8; header_len]);
    let err = finished.expect_err("the header cannot fit");
    drop(sink);
    drop(upload);
    let images = repo.join("volumes/data/images");
    let left: Vec<_> = std::fs::read_dir(&images)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "after {err}: left in {}: {left:?}",
        images.display()
    );
}

#[test]
fn gc_removes_a_killed_writers_staged_uploads_on_a_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    let target = Target::open(repo.to_str().expect("utf-8")).expect("open");
    let v = volume();
    commit(&target, &v, None);
    // What writers killed mid-upload leave: a side file's multipart staging, a put's staging.
    let files = repo.join("volumes/data/files/20260101T000000Z-deadbeef");
    std::fs::create_dir_all(&files).expect("mkdir");
    let side = files.join("digests#1");
    std::fs::write(&side, vec![1u8; 3 << 20]).expect("write");
    let record = repo.join("volumes/data/writers/0123456789abcdef.json#2");
    std::fs::write(&record, b"{").expect("write");
    // A killed fold's side file, staged one folder deeper (`files/<id>/<token>/<name>`).
    let fold_files = files.join("fold-0123456789abcdef");
    std::fs::create_dir_all(&fold_files).expect("mkdir");
    let fold_side = fold_files.join("checksums#1");
    std::fs::write(&fold_side, b"part").expect("write");
    std::thread::sleep(Duration::from_millis(20));
    let report = target.gc(Duration::ZERO).expect("gc");
    assert!(
        !fold_side.exists(),
        "left {} (removed {:?})",
        fold_side.display(),
        report.removed
    );
    assert!(
        !side.exists(),
        "left {} (removed {:?})",
        side.display(),
        report.removed
    );
    assert!(!record.exists(), "left {}", record.display());
    // A live writer's staged side file is kept, however old.
    let mut live = target.begin_backup(&v, spec(None)).expect("begin");
    let staged = repo
        .join("volumes/data/files")
        .join(live.id().as_str())
        .join("digests#1");
    std::fs::create_dir_all(staged.parent().expect("parent")).expect("mkdir");
    std::fs::write(&staged, b"part").expect("write");
    std::thread::sleep(Duration::from_millis(20));
    target.gc(Duration::ZERO).expect("gc");
    assert!(staged.exists(), "gc removed a live writer's staged upload");
    write_image(&mut live);
    live.commit().expect("commit");
}

#[test]
fn gc_leaves_no_clock_probe_behind_on_an_object_store() {
    // A killed writer's claim, old enough for gc to judge its writer (by the store's clock).
    let (memory, target, _, _) = base_with_a_long_stopped_writer();
    let report = target.gc(Duration::ZERO).expect("gc");
    assert!(
        report.removed.iter().any(|key| key.contains("/claims/")),
        "the dead writer's claim stayed: {:?}",
        report.removed
    );
    let probes = listed(&memory, "volumes/data/clock");
    assert!(probes.is_empty(), "probes left: {probes:?}");
}

#[test]
fn a_record_too_large_to_be_a_manifest_is_refused_by_its_size() {
    let memory = Arc::new(InMemory::new());
    let target = Target::from_store(memory.clone(), "", options()).expect("target");
    let v = volume();
    commit(&target, &v, None);
    put(
        &memory,
        "volumes/data/backups/20260101T000000Z-00000000.json",
        vec![b' '; 2 << 20],
    );
    let err = target
        .backups(&v)
        .expect_err("a 2 MiB manifest")
        .to_string();
    assert!(
        err.contains("2097152 bytes, more than the 1048576 expected"),
        "{err}"
    );
}

#[test]
fn an_unreadable_child_slot_is_named_and_gc_still_collects_the_other_volumes() {
    let memory = Arc::new(InMemory::new());
    let target = Target::from_store(memory.clone(), "", options()).expect("target");
    let (a, b) = (
        VolumeName::new("a").expect("name"),
        VolumeName::new("b").expect("name"),
    );
    let base = commit(&target, &a, None);
    commit(&target, &b, None);
    put(
        &memory,
        &format!("volumes/a/children/{}.json", base.id),
        Vec::new(),
    );
    // Volume b has a dead writer's leftovers (listed after a).
    put(
        &memory,
        "volumes/b/images/20260101T000000Z-00000000.qcow2",
        vec![0; 16],
    );
    let next = target
        .begin_backup(&a, spec(Some(base.id.clone())))
        .map(|u| u.id().clone())
        .expect_err("a corrupt slot")
        .to_string();
    assert!(
        next.contains(&format!("volumes/a/children/{}.json", base.id)),
        "{next}"
    );
    let gc = target
        .gc(Duration::ZERO)
        .expect_err("volume a fails")
        .to_string();
    assert!(gc.contains("child slot"), "{gc}");
    let left = listed(&memory, "volumes/b/images");
    assert_eq!(left.len(), 1, "volume b was not collected: {left:?}");
}

/// A reader record that does not parse (damaged, or put there by hand) counts as a live reader
/// until it is two of the longest leases (20 minutes) old by the store's clock: then gc
/// removes it, and says so in its report.
#[test]
fn an_unreadable_reader_record_holds_off_until_twenty_minutes_old_then_goes() {
    let memory = Arc::new(InMemory::new());
    let v = volume();
    let key = "volumes/data/readers/reader-0123456789abcdef.json";
    put(&memory, key, b"not a record".to_vec());
    for (minutes, kept) in [(19, true), (21, false)] {
        let store = Skewed::new(memory.clone(), Duration::ZERO);
        *store.aged.lock().expect("aged") =
            Some(("/readers/".into(), chrono::Duration::minutes(minutes)));
        let target = Target::from_store(store, "", options()).expect("target");
        let report = target.gc_volume(&v, Duration::ZERO).expect("gc");
        assert_eq!(exists(&memory, key), kept, "{minutes} minutes old");
        assert_eq!(
            report.removed.iter().any(|removed| removed == key),
            !kept,
            "{minutes} minutes old: {report:?}"
        );
    }
}
