//! What the reconcilers share: the client, the datamover image, timing, and access to the
//! target a resource names.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::crd::Target as TargetResource;
use super::error::{Error, Result};
use strata_target::{AppBackupId, AppName, Target, TargetOptions, VolumeName};

/// An error from outside the operator (the retention the facade supplies).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Retention of an application: keep its newest `keep_last` application backups, expire the
/// older ones and remove the volume backups no remaining application backup names. The data
/// path's flows live in the facade above this crate, so the controller is handed
/// `strata::expire_app_backups` ([`Context::new`]'s caller supplies it;
/// `strata::operator_context` wires it).
pub type Prune = fn(&Target, &AppName, usize) -> std::result::Result<AppRetention, BoxError>;

/// What retention of an application did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppRetention {
    /// The application backups expired, oldest first.
    pub expired: Vec<AppBackupId>,
    /// The application backups that remain, oldest first.
    pub kept: Vec<AppBackupId>,
}

/// Settings of the controller.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Container image of the datamover Jobs (it must hold the `strata` binary).
    pub image: String,
    /// Service account of the datamover pods; the namespace default when unset.
    pub datamover_service_account: Option<String>,
    /// How long to wait before looking again at snapshots and Jobs in progress.
    pub poll: Duration,
    /// Field manager for server-side apply of restored objects.
    pub field_manager: String,
    /// What a Backup's `retention` runs after its commit, once per application backup.
    pub prune: Prune,
    /// How long a datamover pod may be unable to start (image pull, missing Secret or claim,
    /// refused by admission) before the run fails with the reason; meanwhile the run's
    /// `DatamoversStarted` condition names it.
    pub datamover_start_timeout: Duration,
    /// The datamover Jobs' `activeDeadlineSeconds`: a Job running longer is failed by the Job
    /// controller (`DeadlineExceeded`), so a hung writer cannot hold its volumes' locks forever.
    pub datamover_deadline: Option<Duration>,
    /// How long a VolumeSnapshot may report `status.error` before the run fails with it: the
    /// snapshot controller posts transient errors and clears them on a later retry
    /// (external-snapshotter retries with exponential backoff up to about five minutes).
    pub snapshot_error_grace: Duration,
}

impl Context {
    /// A context polling every five seconds, applying retention with `prune`; datamover pods get ten
    /// minutes to start and a day to finish (a 2 TiB volume at 100 MB/s takes under six
    /// hours), snapshots fifteen minutes to clear an error.
    pub fn new(client: Client, image: impl Into<String>, prune: Prune) -> Self {
        Context {
            client,
            image: image.into(),
            datamover_service_account: None,
            poll: Duration::from_secs(5),
            field_manager: "strata-controller".to_owned(),
            prune,
            datamover_start_timeout: Duration::from_secs(10 * 60),
            datamover_deadline: Some(Duration::from_secs(24 * 60 * 60)),
            snapshot_error_grace: Duration::from_secs(15 * 60),
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
}

/// Prefixes of object_store configuration keys; other Secret keys are the datamovers' business.
const STORE_KEY_PREFIXES: [&str; 3] = ["aws_", "google_", "azure_"];

impl TargetAccess {
    /// Read Target `namespace/name` and its credentials Secret.
    pub async fn resolve(client: &Client, namespace: &str, name: &str) -> Result<Self> {
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
            url: target.spec.url,
            credentials_secret,
            store_config,
        })
    }

    /// Run `work` on the opened target in a blocking task (the target's API is synchronous and
    /// owns a runtime, which must not be dropped on an async worker).
    pub async fn with<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Target) -> Result<T> + Send + 'static,
    {
        let url = self.url.clone();
        let mut options = TargetOptions::default();
        options.store_config = self.store_config.clone();
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
