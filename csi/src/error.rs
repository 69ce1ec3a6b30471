//! The crate's error type.

use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while snapshotting volumes and preparing datamovers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No VolumeSnapshotClass has the PVC's CSI driver.
    #[error("no VolumeSnapshotClass for CSI driver {driver:?}")]
    NoSnapshotClass {
        /// The driver looked for.
        driver: String,
    },
    /// Several classes serve the driver and none, or more than one, is marked default.
    #[error(
        "cannot choose a VolumeSnapshotClass for CSI driver {driver:?}: candidates {candidates:?}, {defaults} marked default; name one explicitly"
    )]
    AmbiguousSnapshotClass {
        /// The driver looked for.
        driver: String,
        /// The classes serving it.
        candidates: Vec<String>,
        /// How many of them carry the default-class annotation.
        defaults: usize,
    },
    /// The class the caller named does not exist or serves another driver.
    #[error("VolumeSnapshotClass {class:?} {reason}")]
    SnapshotClassMismatch {
        /// The class named.
        class: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A PVC or StorageClass lacks a field the step needs.
    #[error("{kind} {name:?}: {what} is missing")]
    MissingField {
        /// Kind of the object.
        kind: &'static str,
        /// Name of the object.
        name: String,
        /// The field, as a JSON path.
        what: &'static str,
    },
    /// The snapshot controller or CSI driver reported an error in `status.error`.
    #[error("VolumeSnapshot {namespace}/{name} failed: {message}")]
    SnapshotFailed {
        /// Namespace of the snapshot.
        namespace: String,
        /// Name of the snapshot.
        name: String,
        /// `status.error.message`.
        message: String,
    },
    /// The snapshot did not become ready in time.
    #[error("VolumeSnapshot {namespace}/{name} not ready after {waited:?}{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    SnapshotTimeout {
        /// Namespace of the snapshot.
        namespace: String,
        /// Name of the snapshot.
        name: String,
        /// How long was waited.
        waited: Duration,
        /// The last `status.error.message` seen, if any.
        last_error: Option<String>,
    },
    /// An object with the deterministic name exists but was not made for this request.
    #[error("{kind} {namespace}/{name} exists but belongs to something else: {reason}")]
    Conflict {
        /// Kind of the object.
        kind: &'static str,
        /// Namespace of the object.
        namespace: String,
        /// Name of the object.
        name: String,
        /// What differs.
        reason: String,
    },
    /// A caller-supplied value is invalid (empty name, bad label value, zero size).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The CSI driver advertises no SnapshotMetadata service: no `SnapshotMetadataService` of
    /// its name exists (or the CRD is not installed), so it offers no changed-block tracking.
    #[error(
        "CSI driver {driver:?} offers no changed-block tracking: no SnapshotMetadataService {driver:?} (cbt.storage.k8s.io/v1beta1)"
    )]
    NoMetadataService {
        /// The snapshot's CSI driver.
        driver: String,
    },
    /// The driver's `SnapshotMetadataService` holds an unusable address or CA certificate.
    #[error("SnapshotMetadataService {driver:?}: invalid {what}: {reason}")]
    BadMetadataService {
        /// The driver (the object's name).
        driver: String,
        /// The field.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The SnapshotMetadata service could not be reached.
    #[error("cannot connect to the SnapshotMetadata service at {address}")]
    MetadataConnect {
        /// `host:port` of the service.
        address: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The SnapshotMetadata service refused the call, or kept failing it without progress.
    #[error("{call} of {snapshot} failed with {code:?} after {calls} call(s)")]
    MetadataCall {
        /// `GetMetadataAllocated` or `GetMetadataDelta`.
        call: &'static str,
        /// The snapshot(s) asked about.
        snapshot: String,
        /// The gRPC status code of the last failure.
        code: tonic::Code,
        /// Calls made, the first included.
        calls: u32,
        /// The last failure.
        #[source]
        source: Box<tonic::Status>,
    },
    /// The SnapshotMetadata service's reply breaks the API's rules; it is not retried.
    #[error("{call} of {snapshot}: invalid reply: {violation}")]
    BadMetadata {
        /// `GetMetadataAllocated` or `GetMetadataDelta`.
        call: &'static str,
        /// The snapshot(s) asked about.
        snapshot: String,
        /// The broken rule.
        violation: crate::metadata::Violation,
    },
    /// The Kubernetes API call failed.
    #[error("Kubernetes API: {operation}")]
    Kube {
        /// What was being done.
        operation: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    pub(crate) fn kube(operation: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let operation = operation.into();
        move |source| Error::Kube { operation, source }
    }
}
