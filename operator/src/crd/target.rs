//! The `Target` resource: where backups go, and the credentials to reach it.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A backup target: a `strata-target` URL (`s3://bucket/prefix`, `gs://…`, `az://…`, a
/// `file://` path on a volume the datamovers mount), the Secret holding its credentials, and
/// object_store settings.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "strata.io",
    version = "v1alpha1",
    kind = "Target",
    namespaced,
    shortname = "stt",
    status = "TargetStatus",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Reachable","type":"boolean","jsonPath":".status.reachable"}"#,
    printcolumn = r#"{"name":"Writable","type":"boolean","jsonPath":".status.writable"}"#,
    printcolumn = r#"{"name":"Format","type":"string","jsonPath":".status.format"}"#,
    printcolumn = r#"{"name":"Checked","type":"date","jsonPath":".status.lastCheck"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TargetSpec {
    /// The target URL, as `strata backup --target` takes it.
    #[schemars(length(min = 1))]
    pub url: String,
    /// Secret in the Target's namespace whose keys are environment variables of the datamovers
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `GOOGLE_SERVICE_ACCOUNT_KEY`, ...). The
    /// controller reads it too, as object_store settings (keys lowercased), to write metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
    /// object_store settings applied over the credentials, e.g. `aws_endpoint`,
    /// `aws_allow_http`, `aws_region`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// For a folder target (a `file://` URL or an absolute path): the NFS export holding the
    /// folder. Every datamover pod mounts it at the URL's path, and the controller must have
    /// it mounted at the same path (`strata install --nfs-target PATH=SERVER:EXPORT`). A
    /// folder target without it is refused: nothing would make the folder reach the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NfsExport>,
}

/// What the controller found when it last checked the target (every few minutes, and when
/// the Target changes): `kubectl get targets` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// The target opened and its repository marker read (or was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    /// A probe object could be written and deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
    /// The repository format found, as `NAME/VERSION` (`strata-target/1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Volumes the repository holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u32>,
    /// When the check ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// Why the target is not reachable or not writable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The generation of the spec checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An NFS export (the fields of a pod's `nfs` volume).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NfsExport {
    /// Host name or address of the NFS server.
    #[schemars(length(min = 1, max = 253))]
    pub server: String,
    /// The exported path.
    #[schemars(length(min = 1))]
    pub path: String,
}

/// A Secret in the referring object's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretReference {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// An object of a given kind in the referring object's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LocalReference {
    /// The object's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}
