//! Restores from object storage by a fetch plan: parallel range GETs of large coalesced parts,
//! never one per cluster; byte-identical chains on moto; a damaged or short part fails the
//! restore on one line, names what failed and leaves no file; one failed GET stops the rest.

#[allow(dead_code)]
#[path = "../target/tests/common/faulty.rs"]
mod faulty;
#[path = "../qcow2/tests/common/loop_device.rs"]
mod loop_device;
#[path = "../target/tests/common/moto.rs"]
mod moto;
mod strata_bin;

use std::fmt;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, ListResult, MultipartId, MultipartUpload,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, Result,
};
use strata::target::{BackupManifest, Target, TargetOptions, VolumeName};

const CLUSTER: u64 = 64 << 10;

/// What a `Counting` store does to the ranged GETs of image data (those longer than
/// `METADATA_GET`).
#[derive(Debug, Default, Clone)]
struct Faults {
    /// Data GETs numbered from 1 that fail for good.
    fail_data_get: Option<usize>,
    /// Data GETs from this one on return one byte short.
    short_from: Option<usize>,
    /// Each data GET takes this long first.
    delay: Duration,
    /// Every request (GETs, HEADs and LISTs of any object) takes this long first: a store
    /// across a network.
    latency: Duration,
}

/// Metadata reads of the restores here: the header (an image's first cluster, 64 KiB) and
/// blocks of 32 KiB, at most two of them (an L2 table) at once. The fetch plan's parts here are
/// longer (all but the compressed clusters' parts, which count as metadata). The image's tables
/// lie at its end, which no data part reaches: the GET of its last bytes when a chain is opened
/// ahead is metadata too.
const METADATA_GET: u64 = 32 << 10;

fn is_data(range: &Range<u64>, object_len: u64) -> bool {
    range.end - range.start > 2 * METADATA_GET && range.end < object_len
}

/// Counts the GETs of image objects (their ranges) and the most in flight at once, and
/// injects `Faults` into the data GETs.
#[derive(Debug)]
struct Counting<S> {
    inner: S,
    gets: Mutex<Vec<Range<u64>>>,
    /// Those of `gets` that are data parts.
    data_ranges: Mutex<Vec<Range<u64>>>,
    data_gets: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    faults: Mutex<Faults>,
    /// When each request started and ended, and what it asked for.
    timeline: Arc<Mutex<Vec<(Instant, Instant, String)>>>,
}

impl<S> Counting<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            gets: Mutex::default(),
            data_ranges: Mutex::default(),
            data_gets: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            faults: Mutex::default(),
            timeline: Arc::default(),
        }
    }

    /// The longest chain of requests each started only after the one before it had ended:
    /// the round trips the requests since the last `reset` cost one after another.
    /// Also returns the requests, each with its place in that chain.
    fn round_trips(&self) -> (usize, String) {
        let mut timeline = self.timeline.lock().unwrap().clone();
        timeline.sort_by_key(|&(start, _, _)| start);
        let mut depth = vec![0; timeline.len()];
        let mut listing = String::new();
        for i in 0..timeline.len() {
            depth[i] = 1
                + (0..i)
                    .filter(|&j| timeline[j].1 <= timeline[i].0)
                    .map(|j| depth[j])
                    .max()
                    .unwrap_or(0);
            listing += &format!("\n  {:2} {}", depth[i], timeline[i].2);
        }
        (depth.into_iter().max().unwrap_or(0), listing)
    }

    fn reset(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
        self.gets.lock().unwrap().clear();
        self.data_ranges.lock().unwrap().clear();
        self.data_gets.store(0, Ordering::SeqCst);
        self.most_in_flight.store(0, Ordering::SeqCst);
        self.timeline.lock().unwrap().clear();
    }

    /// Requests of every kind since the last `reset`.
    fn requests(&self) -> usize {
        self.timeline.lock().unwrap().len()
    }

    fn image_gets(&self) -> Vec<Range<u64>> {
        self.gets.lock().unwrap().clone()
    }

    fn data_gets(&self) -> Vec<Range<u64>> {
        let gets = self.image_gets();
        let data = self.data_ranges.lock().unwrap();
        gets.into_iter().filter(|r| data.contains(r)).collect()
    }
}

impl<S: fmt::Display> fmt::Display for Counting<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait]
impl<S: ObjectStore + MultipartStore> ObjectStore for Counting<S> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let start = Instant::now();
        let latency = self.faults.lock().unwrap().latency;
        tokio::time::sleep(latency).await;
        let what = match &options.range {
            Some(range) => format!("GET {location} {range}"),
            None if options.head => format!("HEAD {location}"),
            None => format!("GET {location}"),
        };
        let result = self.get_counted(location, options).await;
        self.timeline
            .lock()
            .unwrap()
            .push((start, Instant::now(), what));
        result
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let what = format!("LIST {}", prefix.map(Path::as_ref).unwrap_or_default());
        let (listing, timeline) = (self.inner.list(prefix), Arc::clone(&self.timeline));
        let latency = self.faults.lock().unwrap().latency;
        futures::stream::once(async move {
            let start = Instant::now();
            tokio::time::sleep(latency).await;
            let items: Vec<_> = listing.collect().await;
            timeline.lock().unwrap().push((start, Instant::now(), what));
            futures::stream::iter(items)
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

impl<S: ObjectStore + MultipartStore> Counting<S> {
    /// A GET as the store does it: counted, and with the faults of data GETs.
    async fn get_counted(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let range = match &options.range {
            Some(GetRange::Bounded(range)) => Some(range.clone()),
            _ => None,
        };
        let image = location.as_ref().contains("/images/");
        let Some(range) = range.filter(|_| image) else {
            return self.inner.get_opts(location, options).await;
        };
        let object_len = self.inner.head(location).await?.size;
        let data = is_data(&range, object_len);
        self.gets.lock().unwrap().push(range.clone());
        if data {
            self.data_ranges.lock().unwrap().push(range.clone());
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let faults = self.faults.lock().unwrap().clone();
        let result = async {
            if !data {
                return self.inner.get_opts(location, options).await;
            }
            let n = self.data_gets.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(faults.delay).await;
            if faults.fail_data_get == Some(n) {
                return Err(object_store::Error::NotImplemented {
                    operation: "injected failure of a data GET".into(),
                    implementer: "Counting".into(),
                });
            }
            let result = self.inner.get_opts(location, options).await?;
            if faults.short_from.is_none_or(|from| n < from) {
                return Ok(result);
            }
            faulty::one_byte_short(result).await
        }
        .await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

#[async_trait]
impl<S: ObjectStore + MultipartStore> MultipartStore for Counting<S> {
    async fn create_multipart(&self, path: &Path) -> Result<MultipartId> {
        self.inner.create_multipart(path).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> Result<PartId> {
        self.inner.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> Result<object_store::PutResult> {
        self.inner.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> Result<()> {
        self.inner.abort_multipart(path, id).await
    }
}

/// Parts of 256 KiB (4 clusters), 3 at once, gaps up to 2 clusters merged; metadata read in
/// 32 KiB blocks so the counts tell them apart.
fn options() -> TargetOptions {
    let mut options = TargetOptions::default();
    options.fetch_part_size = 256 << 10;
    options.fetch_concurrency = 3;
    options.fetch_gap = 2 * CLUSTER as usize;
    options.read_block_size = METADATA_GET as usize;
    options.max_request = 2 << 20;
    options.max_readahead = METADATA_GET as usize;
    options.read_cache_blocks = 64;
    options.part_size = 5 << 20;
    options.lease = Duration::from_secs(2);
    options
}

/// Deterministic bytes that do not compress.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    strata_bin::noise(len, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A 4 MiB volume backed up three times: a base of random clusters, compressible text and
/// holes; an overlay rewriting scattered runs; another rewriting one run and zeroing one.
/// Returns the manifests and the volume's content at each point.
fn three_points(target: &Target, volume: &VolumeName) -> Vec<(BackupManifest, Vec<u8>)> {
    let file = tempfile::NamedTempFile::new().unwrap();
    let f = file.as_file();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&noise(1, 1 << 20), 0).unwrap();
    let text: Vec<u8> = b"strata restores in parallel parts. "
        .iter()
        .copied()
        .cycle()
        .take(512 << 10)
        .collect();
    f.write_all_at(&text, 1 << 20).unwrap();
    f.write_all_at(&noise(2, 1 << 20), 2 << 20).unwrap();
    let edits: [&[(u64, u64, u64)]; 3] = [
        &[],
        &[
            (3 * CLUSTER, 2 * CLUSTER, 3),
            (9 * CLUSTER, 3 * CLUSTER, 4),
            (40 * CLUSTER, 2 * CLUSTER, 5),
        ],
        &[(20 * CLUSTER, 2 * CLUSTER, 6), (4 << 20 >> 1, 0, 0)],
    ];
    let mut points = Vec::new();
    for (i, point) in edits.iter().enumerate() {
        for &(offset, len, seed) in *point {
            f.write_all_at(&noise(seed, len as usize), offset).unwrap();
        }
        if i == 2 {
            f.write_all_at(&vec![0; 2 * CLUSTER as usize], 2 << 20)
                .unwrap();
        }
        let manifest =
            strata::backup_volume(target, volume, f, &Default::default(), &mut |_| {}).unwrap();
        points.push((manifest, std::fs::read(file.path()).unwrap()));
    }
    points
}

fn s3_target(prefix: &str) -> Option<(Arc<Counting<object_store::aws::AmazonS3>>, Target)> {
    if !moto::available() {
        return None;
    }
    let server = moto::server();
    let mut builder = object_store::aws::AmazonS3Builder::new().with_bucket_name(&server.bucket);
    for (key, value) in server.config() {
        builder = builder.with_config(key.parse().unwrap(), value);
    }
    let s3 = builder.build().unwrap();
    let store = Arc::new(Counting::new(s3));
    let prefix = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let target = Target::from_store(Arc::clone(&store), &prefix, options()).unwrap();
    Some((store, target))
}

fn memory_target() -> (Arc<Counting<object_store::memory::InMemory>>, Target) {
    let store = Arc::new(Counting::new(object_store::memory::InMemory::new()));
    let target = Target::from_store(Arc::clone(&store), "repo", options()).unwrap();
    (store, target)
}

fn restore_into(
    target: &Target,
    volume: &VolumeName,
    manifest: &BackupManifest,
    dest: &FsPath,
) -> strata::Result<()> {
    strata::restore_volume(target, volume, Some(&manifest.id), dest, &mut |_| {}).map(|_| ())
}

#[test]
fn a_chain_restores_byte_identical_from_moto_in_parallel_coalesced_parts() {
    let Some((store, target)) = s3_target("s3-restore-chain") else {
        return;
    };
    let volume = VolumeName::new("v").unwrap();
    let points = three_points(&target, &volume);
    let dir = tempfile::tempdir().unwrap();
    for (manifest, expected) in &points {
        store.reset(Faults::default());
        let dest = dir.path().join(format!("{}.raw", manifest.id));
        restore_into(&target, &volume, manifest, &dest).unwrap();
        assert!(
            std::fs::read(&dest).unwrap() == *expected,
            "point {}",
            manifest.id
        );
        // Stored data bytes of the chain, over the part size: at least the parts needed.
        let data = store.data_gets();
        let fetched: u64 = data.iter().map(|r| r.end - r.start).sum();
        let all = store.image_gets();
        let clusters = expected
            .chunks(CLUSTER as usize)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count();
        // Every point holds at least 38 data clusters (some compressed); far fewer GETs.
        assert!(clusters >= 38, "{clusters}");
        // Parts of up to 4 clusters; a few metadata reads per image (two for the header, L1
        // and L2 tables, the compressed clusters' part).
        assert!(data.len() >= 2, "{data:?}");
        assert!(
            data.len() * 3 <= clusters,
            "{data:?} for {clusters} data clusters"
        );
        let layers = points
            .iter()
            .position(|(m, _)| m.id == manifest.id)
            .unwrap()
            + 1;
        assert!(
            all.len() - data.len() <= 6 * layers,
            "{} metadata GETs: {all:?}",
            all.len() - data.len()
        );
        // Coalesced: parts of more than one cluster, none over the part size.
        assert!(
            data.iter().any(|r| r.end - r.start > 2 * CLUSTER),
            "{data:?}"
        );
        assert!(
            data.iter().all(|r| r.end - r.start <= 256 << 10),
            "{data:?}"
        );
        // Only what is needed: less than the images' size (holes and metadata are skipped).
        assert!(fetched <= 4 << 20, "{fetched}");
        assert!(
            store.most_in_flight.load(Ordering::SeqCst) >= 2,
            "GETs never overlapped"
        );
    }
}

/// Flips one bit of the byte that image `object` of `volume` stores for guest offset `guest`
/// (a data cluster of that image itself), in the store's copy.
fn flip_stored_byte(
    store: &Counting<object_store::memory::InMemory>,
    volume: &str,
    object: &str,
    guest: u64,
) {
    let key = Path::from(format!("repo/volumes/{volume}/images/{object}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut bytes = rt
        .block_on(async { store.inner.get(&key).await?.bytes().await })
        .unwrap()
        .to_vec();
    let scratch = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(scratch.path(), &bytes).unwrap();
    // The image alone: the byte must be one it stores, not one of its backing files.
    let image = strata::qcow2::Image::open_with_options(
        scratch.path(),
        &strata::qcow2::OpenOptions {
            follow_backing: false,
            ..Default::default()
        },
    )
    .unwrap();
    let extent = image.map(guest, 1).unwrap()[0];
    let strata::qcow2::ExtentKind::Data { host_offset, .. } = extent.kind else {
        panic!("guest {guest:#x} is {extent:?}");
    };
    bytes[host_offset.get() as usize] ^= 0x40;
    rt.block_on(store.inner.put(&key, bytes.into())).unwrap();
}

#[test]
fn a_flipped_byte_mid_part_fails_the_restore_naming_the_backup_and_offset_and_leaves_no_file() {
    let (store, target) = memory_target();
    let volume = VolumeName::new("v").unwrap();
    let points = three_points(&target, &volume);
    let (base, _) = &points[0];
    // Flip a byte of guest cluster 34 (random data, never rewritten), inside a part.
    let guest = 34 * CLUSTER + 1000;
    flip_stored_byte(&store, "v", &base.image.object, guest);
    let (top, _) = &points[2];
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out.raw");
    let err = restore_into(&target, &volume, top, &dest).unwrap_err();
    let text = strata::chain_text(&err);
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains(&format!(
            "backup v/{}: cluster at guest offset {:#x}",
            base.id,
            34 * CLUSTER
        )),
        "{text}"
    );
    assert!(!dest.exists() && !dir.path().join("out.raw.partial").exists());
}

#[test]
fn a_short_part_fails_the_restore_naming_the_object_and_range_and_leaves_no_file() {
    let (store, target) = memory_target();
    let volume = VolumeName::new("v").unwrap();
    let points = three_points(&target, &volume);
    let (base, _) = &points[0];
    store.reset(Faults {
        short_from: Some(2),
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out.raw");
    let err = restore_into(&target, &volume, base, &dest).unwrap_err();
    let text = strata::chain_text(&err);
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains(&format!("images/{}", base.image.object)),
        "{text}"
    );
    assert!(
        text.contains("(bytes 0x") && text.contains("short read"),
        "{text}"
    );
    assert!(!dest.exists() && !dir.path().join("out.raw.partial").exists());
}

#[test]
fn one_failed_get_stops_the_others() {
    let (store, target) = memory_target();
    let volume = VolumeName::new("v").unwrap();
    let points = three_points(&target, &volume);
    let (base, _) = &points[0];
    store.reset(Faults::default());
    let dir = tempfile::tempdir().unwrap();
    restore_into(&target, &volume, base, &dir.path().join("whole.raw")).unwrap();
    let parts = store.data_gets().len();
    assert!(parts >= 8, "{parts} parts");
    store.reset(Faults {
        fail_data_get: Some(2),
        delay: Duration::from_millis(200),
        ..Faults::default()
    });
    let dest = dir.path().join("out.raw");
    let started = std::time::Instant::now();
    let err = restore_into(&target, &volume, base, &dest).unwrap_err();
    let text = strata::chain_text(&err);
    assert!(text.contains("injected failure of a data GET"), "{text}");
    // The failure arrives after one delay; GETs after it are never started and those in
    // flight are dropped, not awaited.
    assert!(
        started.elapsed() < Duration::from_millis(200 * parts as u64 / 3),
        "{:?}",
        started.elapsed()
    );
    let issued = store.data_gets().len();
    assert!(issued <= 2 + 3, "{issued} of {parts} data GETs issued");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        store.data_gets().len(),
        issued,
        "GETs went on after the failure"
    );
    assert!(!dest.exists() && !dir.path().join("out.raw.partial").exists());
}

/// Opening a chain from object storage costs a few round trips whatever its depth: the
/// manifests are read together (from the listing, or in batches below a given backup), the
/// checksum lists and the images' HEADs, headers and tables all at once, before the first data
/// GET. Opened one image at a time, as before, each image cost four or five round trips one
/// after another (a manifest, a HEAD, the header, the L1 and L2 tables): for these 12
/// backups, more than 50; at 20 ms each, one second before any data moves.
#[test]
fn a_deep_chain_opens_in_a_few_round_trips_not_several_per_image() {
    // Metadata blocks of 32 KiB, and the default 1 MiB (whose metadata readers use 64 KiB
    // blocks, which opening ahead once counted as 1 MiB ones: one image at a time).
    for block in [METADATA_GET as usize, 1 << 20] {
        let store = Arc::new(Counting::new(object_store::memory::InMemory::new()));
        // All of the chain's data parts at once, so the data costs one round trip after the
        // open.
        let mut options = options();
        options.fetch_concurrency = 16;
        options.read_block_size = block;
        let target = Target::from_store(Arc::clone(&store), "repo", options).unwrap();
        let volume = VolumeName::new("deep").unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        let f = file.as_file();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&noise(40, 1 << 20), 0).unwrap();
        let mut manifests = Vec::new();
        for layer in 0..12u64 {
            if layer > 0 {
                f.write_all_at(&noise(40 + layer, CLUSTER as usize), layer * CLUSTER)
                    .unwrap();
            }
            manifests.push(
                strata::backup_volume(&target, &volume, f, &Default::default(), &mut |_| {})
                    .unwrap(),
            );
        }
        let expected = std::fs::read(file.path()).unwrap();
        let top = manifests.last().unwrap().id.clone();
        let dir = tempfile::tempdir().unwrap();
        for (case, id) in [("the latest", None), ("a given backup", Some(&top))] {
            store.reset(Faults {
                latency: Duration::from_millis(20),
                ..Faults::default()
            });
            let dest = dir.path().join(format!("{}.raw", id.is_some()));
            strata::restore_volume(&target, &volume, id, &dest, &mut |_| {}).unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), expected, "{case}");
            let (trips, requests) = store.round_trips();
            assert!(
                trips <= 6,
                "restoring {case} of a 12-deep chain ({block}-byte blocks) took {trips} round \
                 trips one after another:{requests}"
            );
        }
    }
}

/// A chain of `depth` backups of a 2 MiB volume in `target`, each overlay rewriting one
/// cluster; each point's manifest and bytes.
fn deep_chain(target: &Target, volume: &VolumeName, depth: u64) -> Vec<(BackupManifest, Vec<u8>)> {
    let file = tempfile::NamedTempFile::new().unwrap();
    let f = file.as_file();
    f.set_len(2 << 20).unwrap();
    f.write_all_at(&noise(70, 2 << 20), 0).unwrap();
    let mut points = Vec::new();
    for layer in 0..depth {
        if layer > 0 {
            let at = (layer * 5 % 32) * CLUSTER;
            f.write_all_at(&noise(70 + layer, CLUSTER as usize), at)
                .unwrap();
        }
        let manifest =
            strata::backup_volume(target, volume, f, &Default::default(), &mut |_| {}).unwrap();
        points.push((manifest, std::fs::read(file.path()).unwrap()));
    }
    points
}

/// A chain's readers share one cache budget: a 24-deep chain restores exactly, every point,
/// while the cache never holds more than its budget (and one block). Each image's reader
/// fetches its header and tables ahead; with a cache per reader, a 64-deep restore from moto
/// held about 290 MiB where one image needs about 40. The same restores with a roomy budget
/// show what the readers would hold without it.
#[test]
fn a_deep_chain_restores_within_the_read_cache_budget() {
    const BUDGET: usize = 1 << 20;
    let peak = |budget: usize| {
        let store = Arc::new(Counting::new(object_store::memory::InMemory::new()));
        let mut options = options();
        options.read_cache_budget = budget;
        let target = Target::from_store(store, "repo", options).unwrap();
        let volume = VolumeName::new("deep").unwrap();
        let points = deep_chain(&target, &volume, 24);
        let dir = tempfile::tempdir().unwrap();
        for (i, (manifest, expected)) in points.iter().enumerate().filter(|(i, _)| i % 8 == 7) {
            let dest = dir.path().join(format!("{i}.raw"));
            strata::restore_volume(&target, &volume, Some(&manifest.id), &dest, &mut |_| {})
                .unwrap();
            assert!(
                std::fs::read(&dest).unwrap() == *expected,
                "point {i}, budget {budget}"
            );
        }
        target.read_cache_peak()
    };
    let bounded = peak(BUDGET);
    assert!(
        bounded <= BUDGET + METADATA_GET as usize,
        "the cache held {bounded} bytes at once, over its budget of {BUDGET}"
    );
    let roomy = peak(64 << 20);
    assert!(
        roomy > 4 * BUDGET,
        "without the budget the readers held only {roomy} bytes: the chain does not test it"
    );
}

/// Verifying every backup of a volume costs requests in proportion to its backups: each chain
/// is checked once, from the newest backup that holds it, and each backup's clusters are read
/// from its own image. Before, every backup opened its whole chain twice (a 64-deep chain on
/// moto took 15,300 requests and 97 s, now about 1,000 and 5 s). A damaged image is still
/// reported as its own backup's damage, and only there.
#[test]
fn verifying_a_deep_chain_costs_requests_in_proportion_to_its_backups() {
    const DEPTH: u64 = 16;
    let (store, target) = memory_target();
    let volume = VolumeName::new("deep").unwrap();
    let points = deep_chain(&target, &volume, DEPTH);
    store.reset(Faults::default());
    let reports = strata::verify(&target, Some(&volume), None).unwrap();
    let requests = store.requests();
    assert_eq!(reports.len(), DEPTH as usize);
    for report in &reports {
        assert!(
            report.damage.is_empty(),
            "{}: {:?}",
            report.id,
            report.damage
        );
    }
    // 227 here; 259 when each backup's manifest was read again for its image and its
    // checksums, and 1,522 when each backup opened its whole chain.
    assert!(
        requests <= 15 * DEPTH as usize,
        "verifying {DEPTH} backups took {requests} requests"
    );

    // One byte of the cluster the middle backup stored flipped: that backup's cluster, and
    // at each backup above it (which do not restore) the damage under it; none below.
    let layer = DEPTH / 2;
    let damaged = &points[layer as usize].0;
    let guest = (layer * 5 % 32) * CLUSTER + 100;
    flip_stored_byte(&store, "deep", &damaged.image.object, guest);
    let reports = strata::verify(&target, Some(&volume), None).unwrap();
    let above: Vec<_> = points[layer as usize + 1..]
        .iter()
        .map(|(m, _)| m.id.clone())
        .collect();
    for report in &reports {
        if report.id == damaged.id {
            let text: Vec<_> = report.damage.iter().map(|d| d.problem.as_str()).collect();
            assert!(
                text.iter().any(|p| p.starts_with("image object:"))
                    && text.iter().any(|p| p.starts_with("checksum mismatch")),
                "{text:?}"
            );
        } else if above.contains(&report.id) {
            let text: Vec<_> = report.damage.iter().map(|d| d.problem.as_str()).collect();
            assert_eq!(
                text,
                [format!(
                    "chain: backup deep/{} under it is damaged",
                    damaged.id
                )],
                "{}",
                report.id
            );
        } else {
            assert!(
                report.damage.is_empty(),
                "{}: {:?}",
                report.id,
                report.damage
            );
        }
    }
}

/// Onto a block device that may hold old bytes, a restore from object storage goes by the same
/// fetch plan as onto a file: every point of a chain with holes, zeroed ranges, compressed and
/// random clusters reads back exactly, over a device filled with 0xee first, its zero ranges
/// zeroed by `fallocate` (not written) and its data written whole; with `target_is_zero` the
/// zero ranges are left alone. Before, such a device was hydrated in guest order through the
/// readers' read-ahead, which was a third slower from s3s-fs.
#[test]
fn a_block_device_restores_from_object_storage_by_the_fetch_plan() {
    let (store, target) = memory_target();
    let volume = VolumeName::new("dev").unwrap();
    let points = three_points(&target, &volume);
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("device.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let Some(device) = loop_device::Loop::attach(&backing) else {
        return;
    };
    let dev = std::path::PathBuf::from(&device.device);
    // Filled through the device itself, whose page cache would not see writes to the file.
    let file = std::fs::File::options().write(true).open(&dev).unwrap();
    let garbage = vec![0xee_u8; 4 << 20];
    for (manifest, expected) in &points {
        file.write_all_at(&garbage, 0).unwrap();
        file.sync_all().unwrap();
        store.reset(Faults::default());
        let (_, stats) =
            strata::restore_volume(&target, &volume, Some(&manifest.id), &dev, &mut |_| {})
                .unwrap();
        let restored = std::fs::read(&dev).unwrap();
        assert!(restored == *expected, "point {}", manifest.id);
        // By the plan: parts of at most the part size (guest-order hydration reads runs of
        // up to `max_request` through the cache, or streams).
        let data = store.data_gets();
        assert!(
            !data.is_empty() && data.iter().all(|r| r.end - r.start <= 256 << 10),
            "{data:?}"
        );
        let zero_bytes = expected
            .chunks(CLUSTER as usize)
            .filter(|c| c.iter().all(|&b| b == 0))
            .count() as u64
            * CLUSTER;
        assert!(
            stats.zeroed_bytes >= zero_bytes && stats.zeroed_bytes > 0,
            "{stats:?}: {zero_bytes} bytes of zero clusters"
        );
        assert_eq!(
            stats.zeroed_bytes + stats.written_bytes,
            4 << 20,
            "{stats:?}"
        );
    }
    // A device known to read zeros: its zero ranges are neither zeroed nor written.
    let (manifest, _) = &points[2];
    let mut options = strata::qcow2::HydrateOptions::default();
    options.target_is_zero = true;
    file.write_all_at(&garbage, 0).unwrap();
    file.sync_all().unwrap();
    let (_, stats) = strata::restore_volume_with(
        &target,
        &volume,
        Some(&manifest.id),
        &dev,
        &options,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(stats.zeroed_bytes, 0, "{stats:?}");
    let restored = std::fs::read(&dev).unwrap();
    let first_hole = points[2]
        .1
        .chunks(CLUSTER as usize)
        .position(|c| c.iter().all(|&b| b == 0))
        .unwrap();
    assert!(
        restored[first_hole * CLUSTER as usize..][..CLUSTER as usize]
            .iter()
            .all(|&b| b == 0xee),
        "a zero range was written although the device reads zeros"
    );
}

/// The walk of a chain's map asks for every layer's L2 tables of a window at once: restoring a
/// 3-deep chain at 4 KiB clusters (an L2 table per 2 MiB of volume, 1024 of them per image
/// here, twice what opening an image fetches of its end) costs a few round trips, where
/// looking the tables up layer by layer waited for each layer's table blocks in turn.
#[test]
fn a_chain_with_many_tables_restores_in_a_few_round_trips() {
    const SMALL: u64 = 4096;
    const SIZE: u64 = 2 << 30;
    let store = Arc::new(Counting::new(object_store::memory::InMemory::new()));
    let mut options = options();
    options.fetch_concurrency = 16;
    // Room for each image's 4 MiB of tables (the default cache holds 32 MiB an image).
    options.read_cache_blocks = 256;
    let target = Target::from_store(Arc::clone(&store), "repo", options).unwrap();
    let volume = VolumeName::new("tables").unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    let f = file.as_file();
    f.set_len(SIZE).unwrap();
    let backup = strata::BackupOptions {
        cluster_size: Some(SMALL),
        ..Default::default()
    };
    for layer in 0..3u64 {
        // A cluster in every 2 MiB: every image has all 1024 L2 tables.
        for region in 0..SIZE / (2 << 20) {
            let at = region * (2 << 20) + layer * SMALL;
            f.write_all_at(&noise(region * 4 + layer, SMALL as usize), at)
                .unwrap();
        }
        strata::backup_volume(&target, &volume, f, &backup, &mut |_| {}).unwrap();
    }
    store.reset(Faults {
        latency: Duration::from_millis(5),
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("restored.raw");
    strata::restore_volume(&target, &volume, None, &dest, &mut |_| {}).unwrap();
    let restored = std::fs::File::open(&dest).unwrap();
    for region in (0..SIZE / (2 << 20)).step_by(37) {
        for layer in 0..3u64 {
            let mut got = vec![0u8; SMALL as usize];
            let at = region * (2 << 20) + layer * SMALL;
            restored.read_exact_at(&mut got, at).unwrap();
            assert!(got == noise(region * 4 + layer, SMALL as usize), "{at:#x}");
        }
    }
    let (trips, requests) = store.round_trips();
    assert!(
        trips <= 24,
        "restoring a chain of 3 images of 1024 tables each took {trips} round trips one after \
         another:{requests}"
    );
}

/// On S3 (moto), a base image deleted under a chain (an expiry rule, say) is found by the
/// next backup's HEADs: it is a full one saying which backup is wanting, not an incremental
/// that could never restore, and it restores byte-identical.
#[test]
fn a_backup_over_a_deleted_base_image_on_moto_starts_a_new_chain() {
    let Some((store, target)) = s3_target("broken-chain") else {
        return;
    };
    let volume = VolumeName::new("vol").unwrap();
    let points = three_points(&target, &volume);
    let base = &points[0].0;
    let suffix = format!("/volumes/vol/images/{}", base.image.object);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let keys: Vec<Path> = store
            .inner
            .list(None)
            .filter_map(|meta| async move { meta.ok().map(|m| m.location) })
            .filter(|key| std::future::ready(key.as_ref().ends_with(&suffix)))
            .collect()
            .await;
        assert_eq!(keys.len(), 1, "{keys:?}");
        store.inner.delete(&keys[0]).await.unwrap();
    });
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut content = points[2].1.clone();
    content[..4096].fill(0x77);
    std::fs::write(file.path(), &content).unwrap();
    let manifest = strata::backup_volume(
        &target,
        &volume,
        file.as_file(),
        &Default::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(manifest.parent, None);
    let reason = manifest.full_reason.clone().expect("a reason");
    assert!(
        reason.contains(&format!(
            "chain of the latest backup {} is broken",
            points[2].0.id
        )) && reason.contains(&format!("backup vol/{}", base.id)),
        "{reason}"
    );
    let dest = tempfile::tempdir().unwrap();
    let dest = dest.path().join("restored.raw");
    restore_into(&target, &volume, &manifest, &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), content);
}

/// A reader that opened a chain before `prune` folded it keeps reading it on S3 (moto): while
/// its lease lives, `gc` with no grace keeps every object the folds superseded, and the
/// chain's backups cannot be deleted; the whole point still reads as it was. Once the reader
/// is done, the same `gc` removes them. (Without the lease, the reader's GETs of the folded
/// images would find nothing.)
#[test]
fn a_reader_keeps_what_a_fold_supersedes_until_it_is_done() {
    let Some((_, target)) = s3_target("reader-lease") else {
        return;
    };
    let volume = VolumeName::new("vol").unwrap();
    let points = three_points(&target, &volume);
    let (top, expected) = (&points[2].0, &points[2].1);
    let (_, image, lease) = strata::open_backup_leased(&target, &volume, Some(&top.id)).unwrap();
    let lease = lease.expect("a reader recorded on S3");
    let pruned = strata::prune(&target, &volume, 1).unwrap();
    assert_eq!(pruned.removed.len(), 2, "{pruned:?}");
    let kept = target.gc(Duration::ZERO).unwrap();
    assert!(
        !kept.removed.iter().any(|key| key.contains("/images/")),
        "gc removed images a reader reads: {:?}",
        kept.removed
    );
    let err = target.delete_backup(&volume, &top.id).unwrap_err();
    assert!(
        matches!(err, strata::target::Error::BeingRead { .. }),
        "{err}"
    );
    let mut read = vec![0u8; expected.len()];
    image.read_at(&mut read, 0).unwrap();
    assert!(read == *expected, "the point read differs");
    drop(lease);
    let removed = target.gc(Duration::ZERO).unwrap().removed;
    assert!(
        removed.iter().any(|key| key.contains("/images/")),
        "nothing superseded was removed once the reader was done: {removed:?}"
    );
    // The point restores from what the folds left.
    let dest = tempfile::tempdir().unwrap();
    let dest = dest.path().join("restored.raw");
    restore_into(&target, &volume, top, &dest).unwrap();
    assert!(std::fs::read(&dest).unwrap() == *expected);
}
