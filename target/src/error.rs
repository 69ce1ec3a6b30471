//! The crate's error type.

use std::io;

/// What can go wrong with a backup target.
///
/// `Display` names the kind of failure and its context (operation, object, backup); the
/// underlying cause, when there is one, is reachable through [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The target URL could not be understood or its scheme is not compiled in.
    #[error("invalid target URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// A volume, backup, application or file name breaks the naming rules of the layout.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// What was being named (`volume`, `backup id`, ...).
        kind: &'static str,
        /// The name as given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The object store failed (after retries, for transient errors).
    #[error("object store failed to {operation} {path}")]
    Store {
        /// What was being done (`put`, `get`, `list`, ...).
        operation: &'static str,
        /// The object or prefix concerned.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// The store refused the credentials (HTTP 401 or 403): `problem` says which part is wrong,
    /// from the store's error code where it gives one.
    #[error("the store refused to {operation} {path}: {problem}")]
    AccessDenied {
        /// What was being done.
        operation: &'static str,
        /// The object or prefix concerned.
        path: String,
        /// What the store's answer means for the user.
        problem: String,
    },
    /// Local file I/O failed (filesystem targets write images directly).
    #[error("I/O error while trying to {operation} {path}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file concerned.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A volume, backup, file or repository marker does not exist.
    #[error("{what} {name} not found")]
    NotFound {
        /// What was looked for.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// Another writer already claimed (or committed) this backup id.
    #[error("backup {id} of volume {volume} already exists or is being written")]
    BackupExists {
        /// The volume.
        volume: String,
        /// The backup id.
        id: String,
    },
    /// The parent is no longer the head of its chain: another backup already extends it.
    #[error(
        "backup {parent} of volume {volume} is no longer the head of its chain: {child} already \
         extends it"
    )]
    ParentNotHead {
        /// The volume.
        volume: String,
        /// The parent the caller wanted to extend.
        parent: String,
        /// The backup (committed or in progress) that extends it.
        child: String,
    },
    /// The writer lost its reservation before committing (it stalled past its lease and a later
    /// writer took over, or gc removed it): nothing was committed.
    #[error("backup {id} of volume {volume} was not committed: superseded by {by}")]
    Superseded {
        /// The volume.
        volume: String,
        /// The backup that was being written.
        id: String,
        /// What took its place.
        by: String,
    },
    /// Every answer to the commit's manifest put was lost and the store could not say whether
    /// it was stored: the backup may or may not be committed. Nothing it wrote was removed;
    /// listing the volume tells, and [`Target::gc`](crate::Target::gc) removes its objects once
    /// no manifest names them.
    #[error("the commit's outcome is unknown: {0}; list the volume to see whether it committed")]
    CommitUnknown(Box<Error>),
    /// Writing the image of a fold (the merge of a backup into its child) failed: reading the
    /// pair (a damaged cluster, say) or writing the new image.
    #[error("folding into {image} failed: {reason}")]
    Fold {
        /// The image being folded into.
        image: String,
        /// Why, as the merge said it.
        reason: String,
    },
    /// The backup is being deleted: its deleter holds its child slot. A deleter killed before
    /// it removed the manifest leaves it so; deleting the backup again finishes the job.
    #[error("backup {id} of volume {volume} is being deleted; delete it again if no delete runs")]
    BeingDeleted {
        /// The volume.
        volume: String,
        /// The backup.
        id: String,
    },
    /// The backup cannot be deleted now: a live reader (a restore, an NBD export) reads it
    /// (see [`crate::ReadLease`]).
    #[error(
        "backup {id} of volume {volume} is being read (a restore or an export); try again when it ends"
    )]
    BeingRead {
        /// The volume.
        volume: String,
        /// The backup.
        id: String,
    },
    /// Extending the parent would make a chain longer than any reader of this build opens.
    #[error(
        "backup {parent} of volume {volume} ends a chain of {length} images, the limit: take a \
         full backup"
    )]
    ChainTooLong {
        /// The volume.
        volume: String,
        /// The backup that ends the chain.
        parent: String,
        /// Its chain's length, base included.
        length: usize,
    },
    /// The backup cannot be deleted: another backup (committed or in progress) extends it.
    #[error("backup {id} of volume {volume} has a child, {child}")]
    HasChild {
        /// The volume.
        volume: String,
        /// The backup that was to be deleted.
        id: String,
        /// The backup that extends it.
        child: String,
    },
    /// Another fold of the volume (of backup `parent` into its child) is in progress, or
    /// stopped and not yet recovered (the next `prune`, or `gc` after the grace period,
    /// finishes or rolls it back): one fold of a volume runs at a time.
    #[error("backup {parent} of volume {volume} is already being folded by {writer}")]
    FoldInProgress {
        /// The volume.
        volume: String,
        /// The backup being folded.
        parent: String,
        /// The writer token in the fold's intent record.
        writer: String,
    },
    /// The repository was written by a newer (or unknown) layout version.
    #[error(
        "repository format {found:?} version {version} is not supported (this build reads version {supported})"
    )]
    UnsupportedFormat {
        /// The format name found in the marker.
        found: String,
        /// The version found.
        version: u32,
        /// The version this build understands.
        supported: u32,
    },
    /// Stored bytes are not what they claim to be (bad JSON, size or checksum mismatch).
    #[error("corrupt {what} at {path}: {reason}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// The object concerned.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The upload was used out of order (commit before the image was finished, a header area
    /// smaller than the store's minimum part size, a second image, ...).
    #[error("upload of {path} misused: {reason}")]
    Upload {
        /// The object being uploaded.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The target's background runtime stopped before the operation completed.
    #[error("the target's I/O runtime stopped during {operation}")]
    Runtime {
        /// The operation that was cut short.
        operation: &'static str,
    },
    /// The store lacks a capability this operation needs.
    #[error("unsupported by this store: {feature}")]
    Unsupported {
        /// What is missing.
        feature: &'static str,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// No repository at `url`: what a reader that may not create one meets there.
    pub(crate) fn no_repository(url: impl ToString) -> Self {
        Error::NotFound {
            what: "repository",
            name: url.to_string(),
        }
    }

    pub(crate) fn store(
        operation: &'static str,
        path: impl ToString,
        source: object_store::Error,
    ) -> Self {
        match source {
            object_store::Error::NotFound { .. } => Error::NotFound {
                what: "object",
                name: path.to_string(),
            },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => Error::AccessDenied {
                operation,
                path: path.to_string(),
                problem: credential_problem(&source.to_string()),
            },
            source => Error::Store {
                operation,
                path: path.to_string(),
                source,
            },
        }
    }

    pub(crate) fn io(operation: &'static str, path: impl ToString, source: io::Error) -> Self {
        Error::Io {
            operation,
            path: path.to_string(),
            source,
        }
    }
}

/// What a refusal means, from the S3 error code in the store's answer (`<Code>...</Code>`).
fn credential_problem(answer: &str) -> String {
    let code = answer
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code);
    let meaning = match code {
        Some("SignatureDoesNotMatch") => {
            "the secret key (AWS_SECRET_ACCESS_KEY) does not match the access key"
        }
        Some("InvalidAccessKeyId" | "NotSignedUp") => {
            "the access key (AWS_ACCESS_KEY_ID) is unknown to the store"
        }
        Some("ExpiredToken" | "InvalidToken" | "TokenRefreshRequired") => {
            "the session token (AWS_SESSION_TOKEN) is expired or invalid"
        }
        Some("AccessDenied") => "the credentials are valid but lack permission for this",
        _ => "the credentials were refused (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
    };
    match code {
        Some(code) => format!("{meaning} ({code})"),
        None => meaning.to_string(),
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        let kind = match &err {
            Error::NotFound { .. } => io::ErrorKind::NotFound,
            Error::BackupExists { .. } | Error::FoldInProgress { .. } => {
                io::ErrorKind::AlreadyExists
            }
            Error::InvalidName { .. } | Error::Upload { .. } => io::ErrorKind::InvalidInput,
            Error::Corrupt { .. } => io::ErrorKind::InvalidData,
            Error::Unsupported { .. } => io::ErrorKind::Unsupported,
            Error::AccessDenied { .. } => io::ErrorKind::PermissionDenied,
            Error::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(answer: &str) -> String {
        let source = object_store::Error::PermissionDenied {
            path: "p/strata-repository.json".into(),
            source: answer.to_string().into(),
        };
        Error::store("get", "p/strata-repository.json", source).to_string()
    }

    #[test]
    fn refused_credentials_say_which_part_is_wrong() {
        assert_eq!(
            refused("403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code></Error>"),
            "the store refused to get p/strata-repository.json: the secret key \
             (AWS_SECRET_ACCESS_KEY) does not match the access key (SignatureDoesNotMatch)"
        );
        assert!(
            refused("<Code>InvalidAccessKeyId</Code>").contains("AWS_ACCESS_KEY_ID) is unknown")
        );
        assert!(refused("<Code>NotSignedUp</Code>").contains("AWS_ACCESS_KEY_ID) is unknown"));
        assert!(refused("<Code>AccessDenied</Code>").contains("lack permission"));
        assert!(refused("401").ends_with("(check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"));
    }
}
