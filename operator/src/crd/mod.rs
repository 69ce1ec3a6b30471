//! The custom resources: `Target`, `Backup` and `Restore` in group [`GROUP`], version
//! [`VERSION`].
//!
//! The group is `strata.io`, the domain strata-csi's labels (`strata.io/run`, ...) already use,
//! so one name covers everything Strata puts in a cluster. The version is `v1alpha1`: the
//! schema may still change incompatibly, which Kubernetes' API versioning allows only at alpha.

mod backup;
mod restore;
mod target;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use backup::{
    Backup, BackupMode, BackupSpec, BackupStatus, ChangeSource, CleanupPolicy, DeletionPolicy,
    Retention, Staging, VolumeFilter, VolumeStatus,
};
pub use restore::{ExistingObjects, Restore, RestoreSpec, RestoreStatus};
pub use target::{LocalReference, NfsExport, SecretReference, Target, TargetSpec, TargetStatus};

/// API group of the resources.
pub const GROUP: &str = "strata.io";
/// API version of the resources.
pub const VERSION: &str = "v1alpha1";

/// The three CustomResourceDefinitions: Target, Backup, Restore.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Target::crd(), Backup::crd(), Restore::crd()]
}

/// The CRDs as one multi-document YAML stream, for `kubectl apply -f -`.
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
