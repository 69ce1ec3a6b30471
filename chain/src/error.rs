//! Errors of the chain operations.

/// What went wrong in a backup, restore, merge or verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing an image failed, or an image is corrupt.
    #[error("image")]
    Image(#[from] strata_qcow2::Error),
    /// Reading the source volume or writing the destination failed.
    #[error("{what} at offset {offset:#x}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The byte offset.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A digest manifest or checksum list is malformed.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// "digest manifest", "checksum list" or "changed ranges".
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Inputs that do not fit together (sizes, cluster sizes).
    #[error("mismatch: {0}")]
    Mismatch(String),
    /// The operating system gave no random seed for XXH3 digests.
    #[error("drawing a random seed for XXH3 digests: {0}")]
    Seed(getrandom::Error),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> Error {
    Error::Malformed {
        what,
        reason: reason.into(),
    }
}
