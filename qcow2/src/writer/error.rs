//! Why writing an image failed.

use std::io;

/// An error from the QCOW2 writer or the raw-volume converter.
///
/// After any error the image is incomplete: the sink never received its header area, so
/// nothing at the destination claims to be a valid image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// An option has a value the writer does not accept.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option as given (`key=value`).
        option: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The combination asked for cannot be expressed (or QEMU could not open it).
    #[error("unsupported: {feature}")]
    Unsupported {
        /// What was asked for.
        feature: &'static str,
    },
    /// Reading the source or backing, or writing to the sink, failed.
    #[error("I/O error while {operation} at offset {offset:#x}")]
    Io {
        /// What the writer was doing (`appending to the sink`, `reading the source`, ...).
        operation: &'static str,
        /// The byte offset involved (host offset for the sink, guest offset for sources).
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Clusters must come in ascending guest order, each at most once.
    #[error("guest offset {offset:#x} comes after {next:#x} was already written")]
    OutOfOrder {
        /// The offending guest offset.
        offset: u64,
        /// The lowest guest offset still allowed.
        next: u64,
    },
    /// A write was not aligned to clusters, or reached past the virtual size.
    #[error(
        "guest range {offset:#x}+{len:#x} is not cluster-aligned inside the virtual size {virtual_size:#x}"
    )]
    BadRange {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The image's virtual size.
        virtual_size: u64,
    },
    /// An earlier error left the writer unable to continue.
    #[error("the writer already failed; the image is incomplete")]
    Poisoned,
}

impl WriteError {
    pub(crate) fn io(operation: &'static str, offset: u64) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io {
            operation,
            offset,
            source,
        }
    }
}
