//! Opening a target by URL, the repository marker, and reading what is committed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::cache::BlockCache;
use crate::error::{Error, Result};
use crate::layout::{FORMAT_NAME, FORMAT_VERSION, Layout};
use crate::manifest::{BackupManifest, RepositoryMarker, from_json, to_json};
use crate::name::{BackupId, VolumeName};
use crate::options::TargetOptions;
use crate::runtime::IoRuntime;

/// Manifests read at once when a volume's backups are listed or a chain is walked.
const PARALLEL_MANIFESTS: usize = 32;

/// A backup repository on object storage or in a folder.
///
/// Cheap to clone and shareable between threads; every method blocks the calling thread while
/// the target's own runtime does the I/O (see the crate docs for the async rule).
#[derive(Clone, Debug)]
pub struct Target {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) multipart: Option<Arc<dyn MultipartStore>>,
    /// The folder that object keys are relative to, on filesystem targets.
    pub(crate) local_root: Option<PathBuf>,
    pub(crate) layout: Layout,
    pub(crate) options: TargetOptions,
    /// The blocks every reader of the target holds, within `options.read_cache_budget`.
    pub(crate) cache: Arc<BlockCache>,
    pub(crate) url: String,
    // Last, so it shuts down after everything that may hold tasks on it.
    pub(crate) runtime: IoRuntime,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .field("store", &self.store)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Whether a create-only put made the object or found one already there.
pub(crate) enum Created {
    /// Our bytes are stored (possibly by an earlier attempt of ours that looked failed).
    New,
    /// Someone else's object was there; its bytes.
    Exists(Bytes),
}

impl Target {
    /// Opens (and, when empty, initializes) the repository at `url` with default options;
    /// [`TargetOptions::create`] `false` opens only a repository that exists.
    ///
    /// `url` is a folder path or `file://` URL, `memory://` (a fresh in-memory store),
    /// `s3://bucket/prefix` (configured from the `AWS_*` environment variables, such as
    /// `AWS_ENDPOINT`, `AWS_REGION`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`), and with the crate
    /// features `gcs` and `azure`, `gs://bucket/prefix` and `az://container/prefix`.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, TargetOptions::default())
    }

    /// Like [`open`](Self::open), with explicit options.
    pub fn open_with(url: &str, options: TargetOptions) -> Result<Self> {
        let options = options.sanitized();
        let parsed = crate::url::parse(url, &options.store_config, options.create)?;
        let runtime = IoRuntime::new(options.io_threads)?;
        let target = Target {
            inner: Arc::new(Inner {
                store: parsed.store,
                multipart: parsed.multipart,
                local_root: parsed.local_root,
                layout: Layout::new(parsed.prefix),
                cache: Arc::new(BlockCache::new(options.read_cache_budget)),
                options,
                url: url.to_string(),
                runtime,
            }),
        };
        target.init_marker()?;
        Ok(target)
    }

    /// Opens the repository under `prefix` of an existing store (tests wrap stores this way).
    pub fn from_store<S>(store: Arc<S>, prefix: &str, options: TargetOptions) -> Result<Self>
    where
        S: ObjectStore + MultipartStore,
    {
        let options = options.sanitized();
        let prefix = Path::parse(prefix).map_err(|err| Error::InvalidUrl {
            url: prefix.to_string(),
            reason: err.to_string(),
        })?;
        let runtime = IoRuntime::new(options.io_threads)?;
        let url = format!("store:{store}");
        let target = Target {
            inner: Arc::new(Inner {
                store: store.clone(),
                multipart: Some(store),
                local_root: None,
                layout: Layout::new(prefix),
                cache: Arc::new(BlockCache::new(options.read_cache_budget)),
                options,
                url,
                runtime,
            }),
        };
        target.init_marker()?;
        Ok(target)
    }

    /// Writes a small probe object and deletes it again: whether this client may write here
    /// (opening only reads the repository marker once it exists). The probe's name is random,
    /// so checks from several clients never meet; one left by a crash is a few bytes under
    /// `probes/`, which nothing reads.
    pub fn check_writable(&self) -> Result<()> {
        let name = format!("{:016x}.json", rand::random::<u64>());
        self.block("check writable", move |inner| async move {
            let path = inner.layout.probe(&name);
            inner.put(&path, Bytes::from_static(b"{}")).await?;
            inner.delete(&path).await
        })
    }

    /// The URL the target was opened with.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Whether the target is a folder (or NFS mount) rather than an object store.
    pub fn is_folder(&self) -> bool {
        self.inner.local_root.is_some()
    }

    /// The options in force.
    pub fn options(&self) -> &TargetOptions {
        &self.inner.options
    }

    /// Says `line` through the target's notices (`TargetOptions::notices`): what the caller
    /// of an operation on this target should hear though the operation goes on.
    pub fn notice(&self, line: &str) {
        self.inner.options.notices.tell(line);
    }

    /// The most bytes the read cache of all the target's open images held at once since the
    /// target was opened: at most [`TargetOptions::read_cache_budget`] (and one block) however
    /// many images were open. A figure for tuning and tests.
    pub fn read_cache_peak(&self) -> usize {
        self.inner.cache.peak()
    }

    /// The repository's folder on a filesystem target, `None` on object stores.
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.inner.local_root.as_deref()
    }

    /// The local folder holding `volume`'s images on a filesystem target (where
    /// `qemu-img info --backing-chain` works directly), `None` on object stores.
    pub fn local_image_dir(&self, volume: &VolumeName) -> Option<PathBuf> {
        let root = self.inner.local_root.as_ref()?;
        Some(crate::url::local_path(
            root,
            &self.inner.layout.volume_dir(volume, "images"),
        ))
    }

    fn init_marker(&self) -> Result<()> {
        self.block("open repository", |inner| async move {
            let path = inner.layout.marker();
            let marker = RepositoryMarker {
                format: FORMAT_NAME.to_string(),
                version: FORMAT_VERSION,
            };
            let found = match inner.get_bytes(&path).await {
                Ok(bytes) => bytes,
                Err(Error::NotFound { .. }) if !inner.options.create => {
                    return Err(Error::no_repository(&inner.url));
                }
                Err(Error::NotFound { .. }) => {
                    match inner.put_create(&path, to_json(&marker).into()).await {
                        Ok(Created::New) => return Ok(()),
                        Ok(Created::Exists(bytes)) => bytes,
                        // Nothing can be created: the bucket (or container) itself is missing.
                        Err(Error::NotFound { .. }) => {
                            return Err(Error::NotFound {
                                what: "bucket",
                                name: bucket_of(&inner.url),
                            });
                        }
                        Err(err) => return Err(err),
                    }
                }
                Err(err) => return Err(err),
            };
            let found: RepositoryMarker = from_json("repository marker", path.as_ref(), &found)?;
            if found.format != FORMAT_NAME || found.version != FORMAT_VERSION {
                return Err(Error::UnsupportedFormat {
                    found: found.format,
                    version: found.version,
                    supported: FORMAT_VERSION,
                });
            }
            Ok(())
        })
    }

    /// Runs an async operation over the shared state on the target's runtime.
    pub(crate) fn block<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        self.inner.runtime.run(operation, f(self.inner.clone()))
    }

    /// The volumes that have at least one object in the repository.
    pub fn volumes(&self) -> Result<Vec<VolumeName>> {
        self.block("list volumes", |inner| async move {
            let prefix = inner.layout.volumes();
            let listing = inner
                .store
                .list_with_delimiter(Some(&prefix))
                .await
                .map_err(|err| Error::store("list", &prefix, err))?;
            let mut names: Vec<VolumeName> = listing
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().and_then(|name| VolumeName::new(name).ok()))
                .collect();
            names.sort();
            Ok(names)
        })
    }

    /// The committed backups of `volume`, oldest first: by creation time, then id, except that
    /// a backup always comes after its parent (the writers' clocks need not agree, and a child
    /// written by a clock running behind its parent's is still the newer). Backups in
    /// progress, abandoned or interrupted are never listed.
    ///
    /// Fails when any manifest does not read ([`Error::Corrupt`] naming it): what decides
    /// which objects to delete or which backup is the latest must see them all.
    /// [`backups_readable`](Self::backups_readable) lists the others too.
    pub fn backups(&self, volume: &VolumeName) -> Result<Vec<BackupManifest>> {
        let (manifests, mut unreadable) = self.backups_readable(volume)?;
        match unreadable.is_empty() {
            true => Ok(manifests),
            false => Err(unreadable.swap_remove(0).error),
        }
    }

    /// [`backups`](Self::backups) that read, and each manifest that does not (damaged, too
    /// large, not the backup its name says). A manifest deleted between the listing and its
    /// read (a prune running) is left out; a store that cannot be read fails the call.
    pub fn backups_readable(
        &self,
        volume: &VolumeName,
    ) -> Result<(Vec<BackupManifest>, Vec<UnreadableManifest>)> {
        let volume = volume.clone();
        self.block("list backups", |inner| async move {
            let objects = inner
                .list(&inner.layout.volume_dir(&volume, "backups"))
                .await?;
            let (inner, volume) = (&inner, &volume);
            let read: Vec<(BackupId, Result<BackupManifest>)> = futures::stream::iter(objects)
                .filter_map(|meta| {
                    // Only `<id>.json` can be a manifest (backups are read by id): any
                    // other object there is not a backup, and no reader looks at it.
                    let id = meta
                        .location
                        .filename()
                        .and_then(|f| f.strip_suffix(".json"))
                        .and_then(|stem| BackupId::new(stem).ok());
                    std::future::ready(id.map(|id| (id, meta)))
                })
                .map(|(id, meta)| async move {
                    let read = async {
                        let bytes = inner.get_bytes(&meta.location).await?;
                        let manifest: BackupManifest =
                            from_json("backup manifest", meta.location.as_ref(), &bytes)?;
                        // As `Inner::manifest` checks: a manifest is the backup its name
                        // says.
                        let stem = meta
                            .location
                            .filename()
                            .and_then(|f| f.strip_suffix(".json"));
                        if stem != Some(manifest.id.as_str()) || &manifest.volume != volume {
                            return Err(Error::Corrupt {
                                what: "backup manifest",
                                path: meta.location.to_string(),
                                reason: format!("names backup {}/{}", manifest.volume, manifest.id),
                            });
                        }
                        Ok(manifest)
                    };
                    let read = read.await;
                    (id, read)
                })
                .buffer_unordered(PARALLEL_MANIFESTS)
                .collect()
                .await;
            let (mut manifests, mut unreadable) = (Vec::new(), Vec::new());
            for (id, read) in read {
                match read {
                    Ok(manifest) => manifests.push(manifest),
                    Err(error @ Error::Corrupt { .. }) => {
                        unreadable.push(UnreadableManifest {
                            volume: volume.clone(),
                            id,
                            error,
                        });
                    }
                    Err(Error::NotFound { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
            unreadable.sort_by(|a, b| a.id.cmp(&b.id));
            Ok((parents_first(manifests), unreadable))
        })
    }

    /// The manifest of one committed backup.
    pub fn backup(&self, volume: &VolumeName, id: &BackupId) -> Result<BackupManifest> {
        let (volume, id) = (volume.clone(), id.clone());
        self.block("read backup", |inner| async move {
            inner.manifest(&volume, &id).await
        })
    }

    /// Manifests of the backups of `volume` that the chain from `top` down to its base may
    /// name, read 32 at a time: from one listing of the volume's manifest
    /// names, newest first by the creation time an id starts with, each batch starting at the
    /// oldest parent the walk has not reached yet, until the walk reaches a base or the
    /// listing runs out. A chain of 64 daily backups costs a LIST and two or three rounds of
    /// GETs instead of 64 GETs one after another. Only speed depends on the ids' times: the
    /// caller walks the chain itself and reads any parent not found here (and reports any
    /// manifest that fails to read, which is left out here).
    pub fn chain_candidates(
        &self,
        volume: &VolumeName,
        top: &BackupManifest,
    ) -> Result<HashMap<BackupId, BackupManifest>> {
        let mut found = HashMap::new();
        let Some(first_parent) = top.parent.clone() else {
            return Ok(found);
        };
        // An id is `<creation time>-<random>`: backups made in the same second tie.
        fn stamp(id: &BackupId) -> &str {
            id.as_str()
                .split_once('-')
                .map_or(id.as_str(), |(time, _)| time)
        }
        let v = volume.clone();
        let mut older: Vec<BackupId> = self.block("list backups", |inner| async move {
            let objects = inner.list(&inner.layout.volume_dir(&v, "backups")).await?;
            Ok(objects
                .iter()
                .filter_map(|meta| meta.location.filename()?.strip_suffix(".json"))
                .filter_map(|stem| BackupId::new(stem).ok())
                .collect())
        })?;
        older.retain(|id| id != &top.id && stamp(id) <= stamp(&top.id));
        older.sort_unstable_by(|a, b| stamp(b).cmp(stamp(a)).then_with(|| b.cmp(a)));
        let mut wanted = Some(first_parent);
        let mut read = 0;
        while let Some(parent) = wanted.take() {
            // A parent the listing does not hold (missing, or an id whose time sorts after its
            // child's) is left to the caller's walk.
            if !older[read..].contains(&parent) {
                break;
            }
            let Some(from) = older[read..]
                .iter()
                .position(|id| stamp(id) <= stamp(&parent))
                .map(|i| read + i)
            else {
                break;
            };
            let batch: Vec<BackupId> = older[from..]
                .iter()
                .take(PARALLEL_MANIFESTS)
                .cloned()
                .collect();
            read = from + batch.len();
            let v = volume.clone();
            let manifests = self.block("read backups", |inner| async move {
                let (inner, v) = (&inner, &v);
                Ok(futures::stream::iter(batch)
                    .map(|id| async move { inner.manifest(v, &id).await.ok() })
                    .buffer_unordered(PARALLEL_MANIFESTS)
                    .filter_map(std::future::ready)
                    .collect::<Vec<_>>()
                    .await)
            })?;
            found.extend(manifests.into_iter().map(|m| (m.id.clone(), m)));
            // Walk down from the parent through what is read; ask for more where it stops (a
            // parent named twice is a loop: the walk ends there).
            let mut at = parent;
            let mut seen = std::collections::HashSet::new();
            while let Some(next) = found.get(&at).and_then(|m| m.parent.clone()) {
                if !seen.insert(next.clone()) {
                    break;
                }
                at = next;
            }
            // Each batch starts past the last, so this ends.
            if !found.contains_key(&at) && read < older.len() {
                wanted = Some(at);
            }
        }
        Ok(found)
    }

    /// The length (base included) of the chain that ends in committed backup `manifest`,
    /// counted up to one past [`crate::MAX_CHAIN_DEPTH`].
    pub fn chain_length(&self, manifest: &BackupManifest) -> Result<usize> {
        let manifest = manifest.clone();
        self.block("read backup chain", |inner| async move {
            inner.chain_length(&manifest).await
        })
    }

    /// The most recently created committed backup of `volume` (the last of
    /// [`backups`](Self::backups), so never a backup that has a committed child).
    pub fn latest(&self, volume: &VolumeName) -> Result<Option<BackupManifest>> {
        Ok(self.backups(volume)?.pop())
    }

    /// The most recently created backup of `volume` whose manifest reads (the last of
    /// [`backups_readable`](Self::backups_readable)): for choices that stay safe when a
    /// damaged manifest is the real latest (whether changed ranges apply, a notice).
    pub fn latest_readable(&self, volume: &VolumeName) -> Result<Option<BackupManifest>> {
        Ok(self.backups_readable(volume)?.0.pop())
    }

    /// The chain that ends in backup `id`, base first. Fails with [`Error::Corrupt`] when a
    /// parent is missing or the chain loops.
    pub fn chain(&self, volume: &VolumeName, id: &BackupId) -> Result<Vec<BackupManifest>> {
        let mut chain = vec![self.backup(volume, id)?];
        while let Some(parent) = chain.last().and_then(|m| m.parent.clone()) {
            if chain.len() >= crate::MAX_CHAIN_DEPTH || chain.iter().any(|m| m.id == parent) {
                return Err(Error::Corrupt {
                    what: "backup chain",
                    path: self.inner.layout.manifest(volume, id).to_string(),
                    reason: format!(
                        "chain through {parent} loops or exceeds {} backups",
                        crate::MAX_CHAIN_DEPTH
                    ),
                });
            }
            match self.backup(volume, &parent) {
                Ok(manifest) => chain.push(manifest),
                Err(Error::NotFound { .. }) => {
                    return Err(Error::Corrupt {
                        what: "backup chain",
                        path: self.inner.layout.manifest(volume, id).to_string(),
                        reason: format!("parent {parent} is not committed"),
                    });
                }
                Err(err) => return Err(err),
            }
        }
        chain.reverse();
        Ok(chain)
    }
}

/// A backup manifest that is listed but does not read: its bytes are not a manifest, it is
/// larger than a manifest may be, or it names another backup
/// ([`Target::backups_readable`]).
#[derive(Debug)]
pub struct UnreadableManifest {
    /// The volume it is listed under.
    pub volume: VolumeName,
    /// The backup its object's name (`<id>.json`) says it is.
    pub id: BackupId,
    /// What is wrong with it ([`Error::Corrupt`], naming the object).
    pub error: Error,
}

impl Inner {
    /// Reads a record (a manifest, reservation or writer record: JSON of a few KiB), refusing
    /// one of more than [`MAX_RECORD`] bytes before its body is read: what is read back from
    /// shared storage is untrusted, and manifests are read 32 at a time.
    pub(crate) async fn get_bytes(&self, path: &Path) -> Result<Bytes> {
        self.get_bytes_limited(path, MAX_RECORD).await
    }

    /// Reads the object at `path` whole, refusing (by its size, before reading the body) one of
    /// more than `limit` bytes.
    pub(crate) async fn get_bytes_limited(&self, path: &Path, limit: u64) -> Result<Bytes> {
        self.get_limited("stored object", path, limit)
            .await
            .map(|(bytes, _)| bytes)
    }

    /// The object at `path` with its metadata, refused as corrupt `what` when it is larger than
    /// `limit` bytes, before its body is read.
    pub(crate) async fn get_limited(
        &self,
        what: &'static str,
        path: &Path,
        limit: u64,
    ) -> Result<(Bytes, ObjectMeta)> {
        let read = self
            .options
            .retry
            .run(|| async {
                let got = self.store.get(path).await?;
                match got.meta.size > limit {
                    true => Ok(Err(got.meta.size)),
                    false => {
                        let meta = got.meta.clone();
                        got.bytes().await.map(|bytes| Ok((bytes, meta)))
                    }
                }
            })
            .await
            .map_err(|err| Error::store("get", path, err))?;
        read.map_err(|size| Error::Corrupt {
            what,
            path: path.to_string(),
            reason: format!("{size} bytes, more than the {limit} expected"),
        })
    }

    pub(crate) async fn put(&self, path: &Path, bytes: Bytes) -> Result<()> {
        let payload = PutPayload::from(bytes);
        self.options
            .retry
            .run(|| self.store.put(path, payload.clone()))
            .await
            .map_err(|err| Error::store("put", path, err))?;
        Ok(())
    }

    /// A create-only put that tells its own earlier (retried) attempt from someone else's object.
    pub(crate) async fn put_create(&self, path: &Path, bytes: Bytes) -> Result<Created> {
        let payload = PutPayload::from(bytes.clone());
        let result = self
            .options
            .retry
            .run(|| {
                self.store
                    .put_opts(path, payload.clone(), PutOptions::from(PutMode::Create))
            })
            .await;
        match result {
            Ok(_) => Ok(Created::New),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.get_bytes(path).await?;
                if existing == bytes {
                    Ok(Created::New)
                } else {
                    Ok(Created::Exists(existing))
                }
            }
            Err(err) => Err(Error::store("create", path, err)),
        }
    }

    pub(crate) async fn delete(&self, path: &Path) -> Result<()> {
        match self.options.retry.run(|| self.store.delete(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(Error::store("delete", path, err)),
        }
    }

    pub(crate) async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>> {
        self.options
            .retry
            .run(|| self.store.list(Some(prefix)).try_collect::<Vec<_>>())
            .await
            .map_err(|err| Error::store("list", prefix, err))
    }

    pub(crate) async fn manifest(
        &self,
        volume: &VolumeName,
        id: &BackupId,
    ) -> Result<BackupManifest> {
        Ok(self.manifest_and_bytes(volume, id).await?.0)
    }

    /// [`Inner::manifest`] with the bytes stored, to put back as they were.
    pub(crate) async fn manifest_and_bytes(
        &self,
        volume: &VolumeName,
        id: &BackupId,
    ) -> Result<(BackupManifest, Bytes)> {
        let path = self.layout.manifest(volume, id);
        let bytes = match self.get_bytes(&path).await {
            Err(Error::NotFound { .. }) => {
                return Err(Error::NotFound {
                    what: "backup",
                    name: format!("{volume}/{id}"),
                });
            }
            other => other?,
        };
        let manifest: BackupManifest = from_json("backup manifest", path.as_ref(), &bytes)?;
        if &manifest.id != id || &manifest.volume != volume {
            return Err(Error::Corrupt {
                what: "backup manifest",
                path: path.to_string(),
                reason: format!("names backup {}/{}", manifest.volume, manifest.id),
            });
        }
        Ok((manifest, bytes))
    }
}

impl Inner {
    /// The length of the chain `manifest` ends (base included), following committed parents;
    /// stops counting past [`crate::MAX_CHAIN_DEPTH`] (and on a loop or a missing parent, which
    /// [`Target::chain`] reports).
    pub(crate) async fn chain_length(&self, manifest: &BackupManifest) -> Result<usize> {
        let mut length = 1;
        let mut next = manifest.parent.clone();
        while let Some(parent) = next {
            if length > crate::MAX_CHAIN_DEPTH {
                break;
            }
            length += 1;
            next = match self.manifest(&manifest.volume, &parent).await {
                Ok(m) => m.parent,
                Err(Error::NotFound { .. }) => None,
                Err(err) => return Err(err),
            };
        }
        Ok(length)
    }

    /// Refuses to extend `parent` when its chain is already as long as a chain may be.
    pub(crate) async fn check_extendable(&self, parent: &BackupManifest) -> Result<()> {
        let length = self.chain_length(parent).await?;
        if length >= crate::MAX_CHAIN_DEPTH {
            return Err(Error::ChainTooLong {
                volume: parent.volume.to_string(),
                parent: parent.id.to_string(),
                length,
            });
        }
        Ok(())
    }
}

/// The bucket (or container) a target URL names: its host part, `s3://BUCKET/prefix`.
fn bucket_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| url.to_string())
}

/// `manifests` in creation order (then by id), each after its parent: ordered by the latest
/// creation time on its chain, then by depth. A hostile parent loop ends the walk.
fn parents_first(manifests: Vec<BackupManifest>) -> Vec<BackupManifest> {
    let index: HashMap<&BackupId, usize> = manifests
        .iter()
        .enumerate()
        .map(|(i, m)| (&m.id, i))
        .collect();
    let mut keys: Vec<Option<(DateTime<Utc>, usize)>> = vec![None; manifests.len()];
    for start in 0..manifests.len() {
        // The path up to the first manifest with a key (or the base, or a loop).
        let mut path = vec![start];
        while let Some(parent) = manifests[path[path.len() - 1]].parent.as_ref() {
            match index.get(parent) {
                Some(&p) if keys[p].is_none() && !path.contains(&p) => path.push(p),
                _ => break,
            }
        }
        let top = path[path.len() - 1];
        let mut key = manifests[top]
            .parent
            .as_ref()
            .and_then(|parent| index.get(parent))
            .and_then(|&p| keys[p])
            .map_or((manifests[top].created, 0), |(time, depth)| {
                (time.max(manifests[top].created), depth + 1)
            });
        keys[top] = Some(key);
        for &i in path.iter().rev().skip(1) {
            key = (key.0.max(manifests[i].created), key.1 + 1);
            keys[i] = Some(key);
        }
    }
    let mut keyed: Vec<_> = keys.into_iter().zip(manifests).collect();
    keyed.sort_by(|(a, x), (b, y)| {
        a.cmp(b)
            .then_with(|| x.created.cmp(&y.created))
            .then_with(|| x.id.cmp(&y.id))
    });
    keyed.into_iter().map(|(_, m)| m).collect()
}

/// The largest record [`Inner::get_bytes`] reads: a manifest naming a few side files is about
/// a KiB.
pub(crate) const MAX_RECORD: u64 = 1 << 20;

/// Builds a fresh in-memory target store (shared by the `memory://` scheme and tests).
pub(crate) fn memory_store() -> Arc<InMemory> {
    Arc::new(InMemory::new())
}

/// Builds the filesystem store rooted at `folder`, creating the folder.
pub(crate) fn local_store(folder: &std::path::Path) -> Result<Arc<LocalFileSystem>> {
    std::fs::create_dir_all(folder).map_err(|err| Error::io("create", folder.display(), err))?;
    // Records are published by rename or link: synced first, so that a node that loses power
    // never leaves an empty manifest or reservation behind (images sync themselves).
    let store = LocalFileSystem::new_with_prefix(folder)
        .map_err(|err| Error::store("open", folder.display(), err))?
        .with_fsync(true);
    Ok(Arc::new(store))
}
