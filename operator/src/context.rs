//! What the reconcilers share: the client, the datamover image, timing, and access to the
//! target a resource names.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::Recorder;
use kube::{Api, Client};

use super::backoff::Backoff;
use super::crd::Target as TargetResource;
use super::error::{Error, Result};
use strata_target::{BackupId, Target, TargetOptions, VolumeName};

/// An error from outside the operator (the retention the facade supplies).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Retention: keep the newest `keep_last` backups of a volume, folding older ones into their
/// children, and return the ids removed. The data path's flows live in the facade above this
/// crate, so the controller is handed `strata::prune` ([`Context::new`]'s caller supplies it;
/// `strata::operator_context` wires it).
pub type Prune = fn(&Target, &VolumeName, usize) -> std::result::Result<Vec<BackupId>, BoxError>;

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
    /// What a Backup's `retention` runs after its commit.
    pub prune: Prune,
    /// Publishes the Events on Backups and Restores.
    pub recorder: Recorder,
    /// Failures in a row per object, and when each may be tried again.
    pub backoff: Arc<Backoff>,
}

impl Context {
    /// A context polling every five seconds, pruning with `prune`, publishing Events as
    /// [`events::reporter`](crate::events::reporter) says.
    pub fn new(client: Client, image: impl Into<String>, prune: Prune) -> Self {
        Context {
            recorder: Recorder::new(client.clone(), crate::events::reporter()),
            backoff: Arc::default(),
            client,
            image: image.into(),
            datamover_service_account: None,
            poll: Duration::from_secs(5),
            field_manager: "strata-controller".to_owned(),
            prune,
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
