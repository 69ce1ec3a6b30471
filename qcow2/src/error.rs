//! Errors of the QCOW2 reader and writer.

use std::fmt;
use std::io;

/// A QCOW2 error: what went wrong, and where (the image's name, a file offset).
///
/// `Display` names the problem and its place; the underlying cause, if any, is only available
/// through [`std::error::Error::source`]. Names and text that can come from an image (the
/// names of lower layers and data files, feature names) are shown with control characters
/// escaped (`\r`, `\u{1b}`), so a hostile image cannot rewrite the line an error is printed
/// on; the fields keep the bytes as stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the underlying bytes failed.
    #[error("{}: I/O error while {}", Escaped(.image), Escaped(.action))]
    Io {
        /// The image (or source) being accessed.
        image: String,
        /// What was being done, e.g. "reading the L1 table at 0x30000".
        action: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The bytes do not start with the QCOW2 magic.
    #[error("{}: not a QCOW2 image (bad magic)", Escaped(.image))]
    NotQcow2 {
        /// The image.
        image: String,
    },
    /// A structure in the image is invalid.
    #[error("{}: corrupt image: {} (at offset {offset:#x})", Escaped(.image), Escaped(.what))]
    Corrupt {
        /// The image.
        image: String,
        /// What is wrong.
        what: String,
        /// The file offset of the offending structure.
        offset: u64,
    },
    /// The image uses a feature this reader refuses or does not implement.
    #[error("{}: unsupported: {}", Escaped(.image), Escaped(.feature))]
    Unsupported {
        /// The image.
        image: String,
        /// The feature.
        feature: String,
    },
    /// Incompatible feature bits this implementation does not know are set.
    #[error(
        "{}: unknown incompatible features {} (bits {bits:#x}); refusing to open",
        Escaped(.image),
        Escaped(.names)
    )]
    UnknownIncompatibleFeatures {
        /// The image.
        image: String,
        /// The unknown bits.
        bits: u64,
        /// Their names from the image's feature name table, where it has them.
        names: String,
    },
    /// The image is encrypted; encrypted images are refused.
    #[error(
        "{}: image is encrypted ({method}); encrypted images are not supported",
        Escaped(.image)
    )]
    Encrypted {
        /// The image.
        image: String,
        /// `AES` or `LUKS`.
        method: &'static str,
    },
    /// A backing or external data file name was refused by the [`BackingPolicy`](crate::BackingPolicy).
    #[error("{}: {role} {name:?} refused: {reason}", Escaped(.image))]
    PathRefused {
        /// The image naming the file.
        image: String,
        /// "backing file" or "external data file".
        role: &'static str,
        /// The name as stored.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The backing chain is longer than the configured limit.
    #[error("{}: backing chain deeper than the limit of {limit} images", Escaped(.image))]
    ChainTooDeep {
        /// The image at which the limit was hit.
        image: String,
        /// The limit.
        limit: usize,
    },
    /// A backing file names an image already in the chain.
    #[error(
        "{}: backing loop: {} is already in the chain",
        Escaped(.image),
        Escaped(.name)
    )]
    BackingLoop {
        /// The image naming the file.
        image: String,
        /// The resolved name that repeats.
        name: String,
    },
    /// A stored cluster, or a range read as zeros, failed the chain's
    /// [`ClusterCheck`](crate::ClusterCheck): the read returns none of its bytes.
    #[error(
        "{}: cluster at guest offset {guest_offset:#x} {}",
        Escaped(.image),
        Escaped(.problem)
    )]
    ClusterCheck {
        /// The image (as the check names it, else its storage name).
        image: String,
        /// Its depth in the chain (0 is the top).
        depth: usize,
        /// Guest offset of the cluster (or of the range read as zeros).
        guest_offset: u64,
        /// What the check found.
        problem: String,
    },
    /// A read or write outside the virtual disk.
    #[error("request of {len} bytes at {offset:#x} is outside the virtual size {size:#x}")]
    OutOfRange {
        /// Guest offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// The virtual size.
        size: u64,
    },
    /// A writer option has a value the writer does not accept.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option as given (`key=value`).
        option: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The image asked of the writer cannot be expressed (or QEMU could not open it).
    #[error("cannot write: {feature}")]
    CannotWrite {
        /// What was asked for.
        feature: &'static str,
    },
    /// While writing an image: reading the source or backing, or writing to the sink, failed.
    /// The image is incomplete: the sink never received its header area.
    #[error("I/O error while {operation} at offset {offset:#x}")]
    WriteIo {
        /// What the writer was doing (`appending to the sink`, `reading the source`, ...).
        operation: &'static str,
        /// The byte offset involved (host offset for the sink, guest offset for sources).
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Clusters must come to the writer in ascending guest order, each at most once.
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
    /// An earlier error left the writer unable to continue; the image is incomplete.
    #[error("the writer already failed; the image is incomplete")]
    Poisoned,
    /// An invalid argument (option string, cluster size, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Text shown in a message with its control characters and bidirectional-text controls
/// escaped as Rust escapes them (`\r`, `\u{1b}`, `\u{202e}`); everything else as it is. For
/// names and strings read from an image (untrusted) on their way to a terminal.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            let bidi = matches!(
                c,
                '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            );
            if c.is_control() {
                write!(f, "{}", c.escape_debug())?;
            } else if bidi {
                write!(f, "{}", c.escape_unicode())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn corrupt(image: &str, what: impl Into<String>, offset: u64) -> Error {
    Error::Corrupt {
        image: image.to_owned(),
        what: what.into(),
        offset,
    }
}

pub(crate) fn io_err(image: &str, action: impl Into<String>, source: io::Error) -> Error {
    Error::Io {
        image: image.to_owned(),
        action: action.into(),
        source,
    }
}

impl Error {
    /// A [`Error::WriteIo`] maker for `map_err`.
    pub(crate) fn write_io(operation: &'static str, offset: u64) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::WriteIo {
            operation,
            offset,
            source,
        }
    }
}
