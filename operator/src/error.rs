//! The controller's error type and how each error is classified.

use crate::backoff::Retry;

/// Result alias of the operator module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop a reconcile. [`Error::class`] says what the controller does about it and
/// [`Error::reason`] names the cause in a condition or Event.
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
    /// The restore policy refuses objects of the plan ([`crate::policy`]).
    #[error("the restore policy refuses {}", refused.join("; "))]
    NotAuthorized {
        /// One line per refused object or namespace.
        refused: Vec<String>,
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
    /// Deleting a Backup's application backup from the target (`deletionPolicy: Delete`)
    /// failed.
    #[error("delete application backup {backup}")]
    DeleteData {
        /// `APP/ID`.
        backup: String,
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
    /// A reconcile failed and is retried after a pause: what the controller's error policy
    /// reads (the reconcilers return every error in this form).
    #[error("attempt {} failed, next in {}s", retry.attempt, retry.delay.as_secs())]
    Retrying {
        /// The attempt and the pause before the next.
        retry: Retry,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
}

/// What the controller does about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// It may pass by itself (API 5xx, 429, timeouts, conflicts, target I/O): retried soon,
    /// with exponential backoff, under condition `Retrying`.
    Transient,
    /// A person must act, but outside the resource (RBAC, a missing Target, Secret, bucket or
    /// snapshot class, refused credentials): retried slowly under condition `Stalled`.
    Stalled,
    /// The spec or the data is wrong (422 Invalid, a bad spec, corrupt backup, failed Job): the
    /// run is Failed.
    Permanent,
}

impl ErrorClass {
    /// The condition type a retried error of this class is reported under (`None` for
    /// [`ErrorClass::Permanent`], reported by `Failed`).
    pub fn condition_type(self) -> Option<&'static str> {
        match self {
            ErrorClass::Transient => Some("Retrying"),
            ErrorClass::Stalled => Some("Stalled"),
            ErrorClass::Permanent => None,
        }
    }
}

impl Error {
    /// What the controller does about this error.
    pub fn class(&self) -> ErrorClass {
        self.classify().0
    }

    /// The cause as a CamelCase reason (`Forbidden`, `TargetNotFound`, `CredentialsRejected`,
    /// `Conflict`, `Invalid`, `JobFailed`, ...), for conditions and Events.
    pub fn reason(&self) -> &'static str {
        self.classify().1
    }

    /// How long the controller waits before the next attempt, for an error a reconciler
    /// returned (always [`Error::Retrying`]).
    pub fn requeue_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Retrying { retry, .. } => Some(retry.delay),
            _ => None,
        }
    }

    fn classify(&self) -> (ErrorClass, &'static str) {
        use ErrorClass::{Permanent, Stalled, Transient};
        match self {
            Error::InvalidSpec { .. } | Error::MissingMetadata { .. } => (Permanent, "InvalidSpec"),
            Error::JobFailed { .. } => (Permanent, "JobFailed"),
            Error::NotAuthorized { .. } => (Permanent, "NotAuthorized"),
            Error::NotFound { kind, .. } => (Stalled, not_found_reason(kind)),
            Error::Discovery { source, .. } => match &**source {
                strata_discovery::Error::Kube { source, .. } => classify_kube(source),
                strata_discovery::Error::NotFound { .. } => (Stalled, "ApplicationNotFound"),
                _ => (Permanent, "DiscoveryFailed"),
            },
            Error::Csi { source, .. } => classify_csi(source),
            Error::Target { source, .. } => classify_target(source),
            Error::Retention { source, .. } => classify_facade(source, "RetentionFailed"),
            Error::DeleteData { source, .. } => classify_facade(source, "DeleteFailed"),
            Error::Kube { source, .. } => classify_kube(source),
            Error::Task(_) => (Transient, "TargetTaskFailed"),
            Error::Retrying { source, .. } => source.classify(),
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

/// An error of the facade's data path: as the target error in its cause chain, else a
/// transient `otherwise`.
fn classify_facade(
    source: &crate::context::BoxError,
    otherwise: &'static str,
) -> (ErrorClass, &'static str) {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**source);
    while let Some(err) = cause {
        if let Some(target) = err.downcast_ref::<strata_target::Error>() {
            return classify_target(target);
        }
        cause = err.source();
    }
    (ErrorClass::Transient, otherwise)
}

/// The reason of a referenced object that does not exist.
fn not_found_reason(kind: &str) -> &'static str {
    match kind {
        "Target" => "TargetNotFound",
        "Secret" => "SecretNotFound",
        "ServiceAccount" => "ServiceAccountNotFound",
        "StorageClass" => "StorageClassNotFound",
        "VolumeSnapshotClass" => "SnapshotClassNotFound",
        _ => "NotFound",
    }
}

/// An API server's answer by its HTTP status code (the Kubernetes API conventions, "HTTP
/// Status codes"): what a retry can fix by itself, what needs a person (401, 403, 404: RBAC or
/// a kind or object that is not there), what says the request itself is wrong (400, 422).
fn classify_kube(err: &kube::Error) -> (ErrorClass, &'static str) {
    use ErrorClass::{Permanent, Stalled, Transient};
    match err {
        kube::Error::Api(status) => match status.code {
            400 => (Permanent, "BadRequest"),
            401 => (Stalled, "Unauthorized"),
            403 => (Stalled, "Forbidden"),
            404 => (Stalled, "NotFound"),
            405 => (Permanent, "MethodNotAllowed"),
            408 | 504 => (Transient, "Timeout"),
            409 => (Transient, "Conflict"),
            410 => (Transient, "Expired"),
            413 => (Permanent, "RequestEntityTooLarge"),
            415 => (Permanent, "UnsupportedMediaType"),
            422 => (Permanent, "Invalid"),
            429 => (Transient, "TooManyRequests"),
            500 => (Transient, "InternalError"),
            503 => (Transient, "ServiceUnavailable"),
            501..=599 => (Transient, "ServerError"),
            // An unknown refusal: retried slowly rather than failing the run on a guess.
            402..=499 => (Stalled, "Rejected"),
            _ => (Transient, "ApiError"),
        },
        kube::Error::Auth(_) => (Stalled, "Unauthorized"),
        _ => (Transient, "ApiUnreachable"),
    }
}

fn classify_csi(err: &strata_csi::Error) -> (ErrorClass, &'static str) {
    use ErrorClass::{Permanent, Stalled, Transient};
    match err {
        strata_csi::Error::Kube { source, .. } => classify_kube(source),
        strata_csi::Error::NoSnapshotClass { .. } => (Stalled, "SnapshotClassNotFound"),
        // strata-csi's wording for a named class that is not there (another reason is a class
        // of the wrong driver, which the spec must change).
        strata_csi::Error::SnapshotClassMismatch { reason, .. } if reason == "does not exist" => {
            (Stalled, "SnapshotClassNotFound")
        }
        strata_csi::Error::AmbiguousSnapshotClass { .. } => (Stalled, "SnapshotClassAmbiguous"),
        strata_csi::Error::MetadataConnect { .. } | strata_csi::Error::MetadataCall { .. } => {
            (Transient, "ChangedBlocksUnavailable")
        }
        _ => (Permanent, "VolumeStepFailed"),
    }
}

/// A target's error: refused credentials and missing buckets need a person; bad names and
/// corrupt data fail the run; the rest (store and file I/O, another writer) may pass.
fn classify_target(err: &strata_target::Error) -> (ErrorClass, &'static str) {
    use ErrorClass::{Permanent, Stalled, Transient};
    use strata_target::Error as T;
    match err {
        T::AccessDenied { .. } => (Stalled, "CredentialsRejected"),
        T::NotFound { what: "bucket", .. } => (Stalled, "BucketNotFound"),
        T::NotFound { .. } => (Stalled, "TargetObjectNotFound"),
        T::InvalidUrl { .. } => (Stalled, "TargetUrlInvalid"),
        T::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::PermissionDenied => (Stalled, "TargetAccessDenied"),
            std::io::ErrorKind::NotFound => (Stalled, "TargetPathNotFound"),
            _ => (Transient, "TargetIo"),
        },
        T::InvalidName { .. } => (Permanent, "InvalidSpec"),
        T::Corrupt { .. } => (Permanent, "Corrupt"),
        T::ChainTooLong { .. } => (Permanent, "ChainTooLong"),
        T::UnsupportedFormat { .. } | T::Unsupported { .. } | T::Upload { .. } => {
            (Permanent, "TargetFailed")
        }
        T::BackupExists { .. }
        | T::ParentNotHead { .. }
        | T::Superseded { .. }
        | T::FoldInProgress { .. }
        | T::HasChild { .. }
        | T::BeingRead { .. } => (Transient, "TargetBusy"),
        _ => (Transient, "TargetUnavailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorClass::{Permanent, Stalled, Transient};

    fn api(code: u16) -> Error {
        let status = kube::core::Status::failure("refused", "Test").with_code(code);
        Error::kube("get x")(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn api_status_codes_map_to_classes() {
        let cases = [
            (400, Permanent, "BadRequest"),
            (401, Stalled, "Unauthorized"),
            (403, Stalled, "Forbidden"),
            (404, Stalled, "NotFound"),
            (408, Transient, "Timeout"),
            (409, Transient, "Conflict"),
            (410, Transient, "Expired"),
            (418, Stalled, "Rejected"),
            (422, Permanent, "Invalid"),
            (429, Transient, "TooManyRequests"),
            (500, Transient, "InternalError"),
            (502, Transient, "ServerError"),
            (503, Transient, "ServiceUnavailable"),
            (504, Transient, "Timeout"),
        ];
        for (code, class, reason) in cases {
            let err = api(code);
            assert_eq!((err.class(), err.reason()), (class, reason), "HTTP {code}");
        }
    }

    #[test]
    fn api_errors_inside_discovery_and_csi_are_classified_by_code() {
        let status = || Box::new(kube::core::Status::failure("no", "Forbidden").with_code(403));
        let discovery = Error::discovery("read namespace shop")(strata_discovery::Error::Kube {
            operation: "listing configmaps".into(),
            source: kube::Error::Api(status()),
        });
        assert_eq!(
            (discovery.class(), discovery.reason()),
            (Stalled, "Forbidden")
        );
        let csi = Error::csi("snapshot")(strata_csi::Error::Kube {
            operation: "create".into(),
            source: kube::Error::Api(Box::new(
                kube::core::Status::failure("bad", "Invalid").with_code(422),
            )),
        });
        assert_eq!((csi.class(), csi.reason()), (Permanent, "Invalid"));
    }

    #[test]
    fn missing_references_stall_and_name_what_is_missing() {
        let missing = |kind| Error::NotFound {
            kind,
            namespace: "shop".into(),
            name: "x".into(),
        };
        assert_eq!(missing("Target").reason(), "TargetNotFound");
        assert_eq!(missing("Secret").reason(), "SecretNotFound");
        assert_eq!(missing("Target").class(), Stalled);
        let no_class =
            Error::csi("choose class")(strata_csi::Error::NoSnapshotClass { driver: "d".into() });
        assert_eq!(
            (no_class.class(), no_class.reason()),
            (Stalled, "SnapshotClassNotFound")
        );
        let named = |reason: &str| {
            Error::csi("choose class")(strata_csi::Error::SnapshotClassMismatch {
                class: "c".into(),
                reason: reason.into(),
            })
            .class()
        };
        assert_eq!(named("does not exist"), Stalled);
        assert_eq!(named("serves driver \"a\", not \"b\""), Permanent);
    }

    #[test]
    fn target_errors_split_credentials_and_buckets_from_data() {
        let target = |err| Error::target("open s3://b/p")(err);
        let denied = target(strata_target::Error::AccessDenied {
            operation: "get",
            path: "p/strata-repository.json".into(),
            problem: "the access key is unknown".into(),
        });
        assert_eq!(
            (denied.class(), denied.reason()),
            (Stalled, "CredentialsRejected")
        );
        let bucket = target(strata_target::Error::NotFound {
            what: "bucket",
            name: "b".into(),
        });
        assert_eq!(
            (bucket.class(), bucket.reason()),
            (Stalled, "BucketNotFound")
        );
        let corrupt = target(strata_target::Error::Corrupt {
            what: "manifest",
            path: "p".into(),
            reason: "bad JSON".into(),
        });
        assert_eq!((corrupt.class(), corrupt.reason()), (Permanent, "Corrupt"));
        let io = target(strata_target::Error::Io {
            operation: "write",
            path: "/t".into(),
            source: std::io::Error::other("EIO"),
        });
        assert_eq!(io.class(), Transient);
    }

    #[test]
    fn retention_finds_the_target_error_in_its_cause_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("prune")]
        struct Facade(#[source] strata_target::Error);
        let err = Error::Retention {
            app: "shop".into(),
            source: Box::new(Facade(strata_target::Error::AccessDenied {
                operation: "delete",
                path: "p".into(),
                problem: "no".into(),
            })),
        };
        assert_eq!(
            (err.class(), err.reason()),
            (Stalled, "CredentialsRejected")
        );
    }

    #[test]
    fn permanent_errors_and_the_retry_wrapper() {
        let job = Error::JobFailed {
            namespace: "shop".into(),
            job: "j".into(),
            message: "BackoffLimitExceeded".into(),
        };
        assert_eq!((job.class(), job.reason()), (Permanent, "JobFailed"));
        let retry = Retry {
            attempt: 2,
            delay: std::time::Duration::from_secs(10),
        };
        let wrapped = Error::Retrying {
            retry,
            source: Box::new(api(403)),
        };
        assert_eq!((wrapped.class(), wrapped.reason()), (Stalled, "Forbidden"));
        assert_eq!(
            wrapped.requeue_after(),
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(api(403).requeue_after(), None);
        assert_eq!(ErrorClass::Stalled.condition_type(), Some("Stalled"));
        assert_eq!(ErrorClass::Permanent.condition_type(), None);
    }
}
