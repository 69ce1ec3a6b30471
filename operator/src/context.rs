//! What the reconcilers share: the client, the datamover image, timing, and access to the
//! target a resource names.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::Recorder;
use kube::{Api, Client};

use super::backoff::Backoff;
use super::crd::NfsExport;
use super::crd::Target as TargetResource;
use super::endpoint::Health;
use super::error::{Error, Result};
use super::metrics::Metrics;
use super::policy::RestorePolicy;
use strata_csi::SnapshotLimits;
use strata_csi::datamover::TargetMount;
use strata_target::{
    AppBackupId, AppName, BackupId, Target, TargetOptions, VolumeBackupRef, VolumeName,
};

/// An error from outside the operator (the retention the facade supplies).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Retention of an application: keep its newest `keep_last` application backups and the
/// pinned ones (those a Restore under way reads), expire the other older ones and remove the
/// volume backups no remaining application backup names. The data path's flows live in the
/// facade above this crate, so the controller is handed `strata::expire_app_backups_keeping`
/// ([`Context::new`]'s caller supplies it; `strata::operator_context` wires it).
pub type Prune =
    fn(&Target, &AppName, usize, &[AppBackupId]) -> std::result::Result<AppRetention, BoxError>;

/// Deleting one application backup (a Backup with `deletionPolicy: Delete`): its manifest,
/// then each of the volume backups given (those it names) that no remaining application
/// backup names, with retention's reference counting; the volume backups removed. The facade
/// supplies `strata::delete_app_backup`, as it does [`Prune`].
pub type DeleteAppBackup = fn(
    &Target,
    &AppName,
    &AppBackupId,
    &[VolumeBackupRef],
) -> std::result::Result<Vec<(VolumeName, BackupId)>, BoxError>;

/// What retention of an application did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppRetention {
    /// The application backups expired, oldest first.
    pub expired: Vec<AppBackupId>,
    /// The application backups that remain, oldest first.
    pub kept: Vec<AppBackupId>,
}

/// How long a run waits for a snapshot to become ready by default
/// ([`Context::snapshot_ready_timeout`]): twice the error grace, so a snapshot the controller
/// is still retrying fails with its error rather than with the timeout.
pub const DEFAULT_SNAPSHOT_READY_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Settings of the controller.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Container image of the datamover Jobs (it must hold the `strata` binary).
    pub image: String,
    /// Service account of the datamover pods; the namespace default when unset.
    pub datamover_service_account: Option<String>,
    /// How long to wait before looking again at what no watch reports: a restored claim's
    /// binding (the application's claim, which Strata does not label as its own).
    pub poll: Duration,
    /// How long a run waiting for what the run loop watches (its snapshots, Jobs and claims,
    /// another Backup's end, a free datamover slot) waits before looking again anyway: a safety
    /// net, as every such change reconciles the run at once ([`crate::controller`]). It also
    /// bounds how late a waiting run notices a deadline (`datamover_start_timeout`,
    /// `snapshot_error_grace`, `snapshot_ready_timeout`).
    pub resync: Duration,
    /// Field manager for server-side apply of restored objects.
    pub field_manager: String,
    /// What a Backup's `retention` runs after its commit, once per application backup.
    pub prune: Prune,
    /// What deleting a Backup with `deletionPolicy: Delete` runs on the target.
    pub delete_app_backup: DeleteAppBackup,
    /// How long a datamover pod may be unable to start (image pull, missing Secret or claim,
    /// refused by admission) before the run fails with the reason; meanwhile the run's
    /// `DatamoversStarted` condition names it. Each attempt of the Job gets the whole window,
    /// from its pod's creation or the previous pod's end, so a retry after an eviction or an
    /// OOM kill is not charged the time the earlier pod ran.
    pub datamover_start_timeout: Duration,
    /// The datamover Jobs' `activeDeadlineSeconds`: a Job running longer is failed by the Job
    /// controller (`DeadlineExceeded`), so a hung writer cannot hold its volumes' locks forever.
    pub datamover_deadline: Option<Duration>,
    /// How long a VolumeSnapshot may report `status.error` before the run fails with it: the
    /// snapshot controller posts transient errors and clears them on a later retry
    /// (external-snapshotter retries with exponential backoff up to about five minutes).
    pub snapshot_error_grace: Duration,
    /// How long a Backup waits for a VolumeSnapshot to become ready, from its creation, before
    /// the run fails naming it: a snapshot the controller never gives a status, or one that
    /// stays `readyToUse: false` without an error, would otherwise hold the run and its
    /// volumes' locks forever. A Restore's staging snapshot is held to the same limit.
    pub snapshot_ready_timeout: Duration,
    /// This cluster's name in the target layout: every Target's URL gets `/<cluster_id>`
    /// appended, so two clusters writing to one target never interleave their chains (their
    /// volume names, `NAMESPACE.PVC`, may well be equal). `None` writes at the URL itself.
    pub cluster_id: Option<String>,
    /// Accept folder Targets without `spec.nfs`: for a controller and datamovers that share
    /// a filesystem (development, tests), never in a cluster.
    pub host_folder_targets: bool,
    /// The Prometheus metrics the reconciles update.
    pub metrics: Arc<Metrics>,
    /// What the probes report; the run loop says when its watches have started.
    pub health: Arc<Health>,
    /// At most this many volumes of one Backup are copied at once, unless the Backup says.
    pub max_parallel_volumes: usize,
    /// What Restores may create ([`crate::policy`]): by default the usual application kinds,
    /// into the Restore's own namespace.
    pub restore_policy: RestorePolicy,
    /// At most this many datamover pods run on one node at once, across all runs (0: no
    /// bound); see [`crate::reconcile::nodes`].
    pub max_datamovers_per_node: usize,
    /// Held from counting the datamovers per node to creating the new Jobs, so that two
    /// reconciles cannot both take a node's last slot.
    pub datamover_slots: Arc<tokio::sync::Mutex<()>>,
    /// How often every Target is checked ([`crate::reconcile::reconcile_target`]).
    pub target_check_interval: Duration,
    /// Publishes the Events on Backups and Restores.
    pub recorder: Recorder,
    /// Failures in a row per object, and when each may be tried again.
    pub backoff: Arc<Backoff>,
}

impl Context {
    /// How long a Backup waits for its snapshots: errors for `snapshot_error_grace`, readiness
    /// for `snapshot_ready_timeout`.
    pub fn snapshot_limits(&self) -> SnapshotLimits {
        SnapshotLimits {
            error_grace: self.snapshot_error_grace,
            ready_timeout: self.snapshot_ready_timeout,
        }
    }

    /// A context polling every five seconds, applying retention with `prune` and deleting
    /// application backups with `delete_app_backup`, publishing
    /// Events as [`events::reporter`](crate::events::reporter) says; datamover pods get ten
    /// minutes to start and a day to finish (a 2 TiB volume at 100 MB/s takes under six
    /// hours), snapshots fifteen minutes to clear an error and thirty to become ready.
    pub fn new(
        client: Client,
        image: impl Into<String>,
        prune: Prune,
        delete_app_backup: DeleteAppBackup,
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(&metrics));
        Context {
            recorder: Recorder::new(client.clone(), crate::events::reporter()),
            backoff: Arc::default(),
            client,
            image: image.into(),
            datamover_service_account: None,
            poll: Duration::from_secs(5),
            resync: Duration::from_secs(60),
            field_manager: "strata-controller".to_owned(),
            prune,
            delete_app_backup,
            datamover_start_timeout: Duration::from_secs(10 * 60),
            datamover_deadline: Some(Duration::from_secs(24 * 60 * 60)),
            snapshot_error_grace: Duration::from_secs(15 * 60),
            snapshot_ready_timeout: DEFAULT_SNAPSHOT_READY_TIMEOUT,
            cluster_id: None,
            host_folder_targets: false,
            metrics,
            health,
            target_check_interval: Duration::from_secs(5 * 60),
            max_parallel_volumes: 4,
            restore_policy: RestorePolicy::default(),
            max_datamovers_per_node: 2,
            datamover_slots: Arc::default(),
        }
    }
}

/// A Target resource resolved into what opening it needs.
#[derive(Clone, Debug)]
pub struct TargetAccess {
    /// The target URL.
    pub url: String,
    /// Secret the datamovers take their environment from.
    pub credentials_secret: Option<String>,
    /// object_store settings for the controller's own access.
    pub store_config: Vec<(String, String)>,
    /// The NFS export a folder target lives on, which the datamovers mount at its folder.
    pub mount: Option<TargetMount>,
}

/// The folder of a folder target URL (`file:///p` or `/p`), `None` for object storage.
pub fn folder_of(url: &str) -> Option<&str> {
    match url.split_once("://") {
        None => Some(url),
        Some(("file", rest)) => Some(rest.strip_prefix("localhost").unwrap_or(rest)),
        Some(_) => None,
    }
}

/// The uid of namespace `kube-system`: a cluster's identity for as long as it exists (a
/// Namespace's uid never changes, and `kube-system` is never deleted).
pub async fn cluster_uid(client: &Client) -> Result<String> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .get("kube-system")
        .await
        .map_err(Error::kube("get Namespace kube-system"))?
        .metadata
        .uid
        .ok_or(Error::MissingMetadata {
            kind: "Namespace",
            field: "metadata.uid",
        })
}

/// Whether `id` can name a cluster in a target's layout: a DNS label (RFC 1123).
pub fn valid_cluster_id(id: &str) -> bool {
    is_dns_label(id)
}

/// Whether `s` is a DNS label (RFC 1123): 1 to 63 of `a-z`, `0-9` and `-`, not at either end.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Prefixes of object_store configuration keys; other Secret keys are the datamovers' business.
const STORE_KEY_PREFIXES: [&str; 3] = ["aws_", "google_", "azure_"];

impl TargetAccess {
    /// Read Target `namespace/name` and its credentials Secret, as `ctx` reaches targets: a
    /// folder target needs its NFS export (unless `ctx.host_folder_targets`), and the URL
    /// gets the cluster's part of the layout (`ctx.cluster_id`).
    pub async fn resolve(ctx: &Context, namespace: &str, name: &str) -> Result<Self> {
        let mut access = Self::read(&ctx.client, namespace, name).await?;
        if folder_of(&access.url).is_some() && access.mount.is_none() && !ctx.host_folder_targets {
            return Err(Error::InvalidSpec {
                what: "Target",
                reason: format!(
                    "{namespace}/{name} is the folder {} but has no spec.nfs: datamover pods \
                     cannot reach a folder of the controller's; give the NFS export holding it",
                    access.url
                ),
            });
        }
        if let Some(id) = &ctx.cluster_id {
            if !valid_cluster_id(id) {
                return Err(Error::InvalidSpec {
                    what: "cluster id",
                    reason: format!("{id:?} is not a DNS label"),
                });
            }
            access.url = format!("{}/{id}", access.url.trim_end_matches('/'));
        }
        Ok(access)
    }

    /// Read Target `namespace/name` and its credentials Secret, as they are.
    pub async fn read(client: &Client, namespace: &str, name: &str) -> Result<Self> {
        let targets: Api<TargetResource> = Api::namespaced(client.clone(), namespace);
        let target = targets
            .get_opt(name)
            .await
            .map_err(Error::kube(format!("get Target {namespace}/{name}")))?
            .ok_or_else(|| Error::NotFound {
                kind: "Target",
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
        let mut store_config = Vec::new();
        let credentials_secret = target.spec.credentials_secret_ref.map(|r| r.name);
        if let Some(secret_name) = &credentials_secret {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let secret = secrets
                .get_opt(secret_name)
                .await
                .map_err(Error::kube(format!("get Secret {namespace}/{secret_name}")))?
                .ok_or_else(|| Error::NotFound {
                    kind: "Secret",
                    namespace: namespace.to_owned(),
                    name: secret_name.clone(),
                })?;
            for (key, value) in secret.data.into_iter().flatten() {
                let key = key.to_ascii_lowercase();
                if STORE_KEY_PREFIXES.iter().any(|p| key.starts_with(p)) {
                    let value = String::from_utf8(value.0).map_err(|_| Error::InvalidSpec {
                        what: "credentials Secret",
                        reason: format!("key {key} of {secret_name} is not UTF-8"),
                    })?;
                    store_config.push((key, value));
                }
            }
        }
        store_config.extend(target.spec.options);
        Ok(TargetAccess {
            credentials_secret,
            store_config,
            mount: match (folder_of(&target.spec.url), target.spec.nfs) {
                (Some(folder), Some(NfsExport { server, path })) => Some(TargetMount {
                    server,
                    export: path,
                    path: folder.to_owned(),
                }),
                _ => None,
            },
            url: target.spec.url,
        })
    }

    /// Run `work` on the opened target in a blocking task (the target's API is synchronous and
    /// owns a runtime, which must not be dropped on an async worker).
    pub async fn with<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Target) -> Result<T> + Send + 'static,
    {
        self.open_and(true, work).await
    }

    /// Like [`with`](Self::with) for a reader (a Restore): a target that holds no repository
    /// is an error, and nothing is created there.
    pub async fn with_existing<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Target) -> Result<T> + Send + 'static,
    {
        self.open_and(false, work).await
    }

    async fn open_and<T, F>(&self, create: bool, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Target) -> Result<T> + Send + 'static,
    {
        let url = self.url.clone();
        let mut options = TargetOptions::default();
        options.store_config = self.store_config.clone();
        options.create = create;
        tokio::task::spawn_blocking(move || {
            let target =
                Target::open_with(&url, options).map_err(Error::target(format!("open {url}")))?;
            work(&target)
        })
        .await
        .map_err(Error::Task)?
    }
}

/// The name of PVC `namespace/pvc` in the target: `NAMESPACE.PVC`. Namespaces are DNS labels
/// (no dots), so the first dot separates the two.
pub fn volume_name(namespace: &str, pvc: &str) -> Result<VolumeName> {
    VolumeName::new(format!("{namespace}.{pvc}"))
        .map_err(Error::target(format!("name of volume {namespace}/{pvc}")))
}
