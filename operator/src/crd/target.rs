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
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
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
