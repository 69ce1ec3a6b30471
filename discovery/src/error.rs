//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong while discovering, archiving or restoring an application.
///
/// `Display` names the kind of failure and its context; the underlying cause is reachable
/// through [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file or stream failed.
    #[error("i/o error while {operation} {}", path.display())]
    Io {
        /// What was being done (e.g. "reading dump").
        operation: &'static str,
        /// The file involved, empty for streams.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document could not be parsed or does not have the expected shape.
    #[error("invalid JSON in {what}")]
    Json {
        /// Which document.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A YAML document could not be parsed.
    #[error("invalid YAML in {what}")]
    Yaml {
        /// Which document.
        what: String,
        /// The cause (boxed: the parser's error carries a source snippet and is large).
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// A YAML document could not be written.
    #[error("cannot write {what} as YAML")]
    YamlWrite {
        /// Which object.
        what: String,
        /// The cause.
        #[source]
        source: serde_saphyr::SerializeError,
    },
    /// An object lacks a field every Kubernetes object has (apiVersion, kind, metadata.name).
    #[error("object {what} has no {field}")]
    MissingField {
        /// Which object (as far as it is known).
        what: String,
        /// The missing field.
        field: &'static str,
    },
    /// A Helm release storage record (Secret or ConfigMap) cannot be decoded.
    #[error("Helm release record {record} is corrupt: {reason}")]
    HelmRecord {
        /// `namespace/name` of the storage record.
        record: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A label selector does not follow the Kubernetes selector syntax.
    #[error("invalid label selector {selector:?} at byte {position}: {reason}")]
    Selector {
        /// The selector text.
        selector: String,
        /// Byte offset of the problem.
        position: usize,
        /// What was expected.
        reason: &'static str,
    },
    /// An `--operator` reference is not `GROUP/KIND/NAME`.
    #[error("invalid operator reference {0:?}: expected GROUP/KIND/NAME")]
    OperatorRef(String),
    /// Something the application definition names does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// Input exceeds a size or count limit meant to bound memory use.
    #[error("{what} exceeds the limit of {limit}")]
    Limit {
        /// What was too large.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// A metadata archive is malformed.
    #[error("metadata archive entry {entry:?} is invalid: {reason}")]
    Archive {
        /// The entry path inside the archive.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// A JSON patch given as a restore transform does not apply.
    #[error("JSON patch does not apply to {object}")]
    Patch {
        /// The object the patch was applied to.
        object: String,
        /// The cause.
        #[source]
        source: json_patch::PatchError,
    },
    /// A Kubernetes API call failed.
    #[error("Kubernetes API error while {operation}")]
    Kube {
        /// What was being done.
        operation: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            operation,
            path: path.into(),
            source,
        }
    }
    pub(crate) fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        Error::Json {
            what: what.into(),
            source,
        }
    }
    /// Whether the API server refused the request (403 Forbidden: RBAC does not allow it).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(status), .. } if status.code == 403)
    }

    pub(crate) fn kube(operation: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            operation: operation.into(),
            source,
        }
    }
}
