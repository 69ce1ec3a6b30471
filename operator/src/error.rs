//! The controller's error type.

/// Result alias of the operator module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop a reconcile. [`Error::is_permanent`] tells a spec or data problem (the run is
/// marked Failed) from a transient one (the reconcile is retried).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The resource's spec cannot be acted on.
    #[error("invalid {what}: {reason}")]
    InvalidSpec {
        /// The field or reference.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A resource the run refers to does not exist.
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        /// Its kind.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The object has no namespace or name (the API server always sets both).
    #[error("{kind} has no {field}")]
    MissingMetadata {
        /// Its kind.
        kind: &'static str,
        /// `metadata.name` or `metadata.namespace`.
        field: &'static str,
    },
    /// Discovery, archiving or applying objects failed.
    #[error("application metadata: {operation}")]
    Discovery {
        /// What was being done.
        operation: String,
        /// The cause.
        #[source]
        source: Box<strata_discovery::Error>,
    },
    /// A snapshot, PVC or datamover step failed.
    #[error("volume step: {operation}")]
    Csi {
        /// What was being done.
        operation: String,
        /// The cause.
        #[source]
        source: Box<strata_csi::Error>,
    },
    /// Reading or writing the target failed.
    #[error("target: {operation}")]
    Target {
        /// What was being done.
        operation: String,
        /// The cause.
        #[source]
        source: Box<strata_target::Error>,
    },
    /// A datamover Job failed.
    #[error("datamover Job {namespace}/{job} failed: {message}")]
    JobFailed {
        /// Its namespace.
        namespace: String,
        /// Its name.
        job: String,
        /// Reason and message of the Job's `Failed` condition.
        message: String,
    },
    /// Retention (expiring old application backups and their volume backups) failed.
    #[error("retention of application {app}")]
    Retention {
        /// The application.
        app: String,
        /// The cause.
        #[source]
        source: crate::context::BoxError,
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
    /// A blocking task (target I/O) panicked or was cancelled.
    #[error("target task: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl Error {
    /// Whether retrying cannot help: the spec, the backup data or a volume step is wrong.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::InvalidSpec { .. } | Error::MissingMetadata { .. } | Error::JobFailed { .. } => {
                true
            }
            Error::Discovery { source, .. } => {
                !matches!(**source, strata_discovery::Error::Kube { .. })
            }
            Error::Csi { source, .. } => !matches!(**source, strata_csi::Error::Kube { .. }),
            Error::Target { source, .. } => matches!(
                **source,
                strata_target::Error::InvalidName { .. } | strata_target::Error::Corrupt { .. }
            ),
            Error::NotFound { .. }
            | Error::Retention { .. }
            | Error::Kube { .. }
            | Error::Task(_) => false,
        }
    }

    pub(crate) fn kube(operation: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let operation = operation.into();
        move |source| Error::Kube { operation, source }
    }

    pub(crate) fn csi(operation: impl Into<String>) -> impl FnOnce(strata_csi::Error) -> Error {
        let operation = operation.into();
        move |source| Error::Csi {
            operation,
            source: Box::new(source),
        }
    }

    pub(crate) fn discovery(
        operation: impl Into<String>,
    ) -> impl FnOnce(strata_discovery::Error) -> Error {
        let operation = operation.into();
        move |source| Error::Discovery {
            operation,
            source: Box::new(source),
        }
    }

    pub(crate) fn target(
        operation: impl Into<String>,
    ) -> impl FnOnce(strata_target::Error) -> Error {
        let operation = operation.into();
        move |source| Error::Target {
            operation,
            source: Box::new(source),
        }
    }
}
