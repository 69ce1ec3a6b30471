//! A pure-Rust QCOW2 reader and writer with backing chains, safe with hostile images.

mod io;

pub use io::{ImageSink, LocalStorage, ReadAt, Storage};

/// How backing-file and external-data-file names found inside an image may be followed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Only relative names that stay inside the folder of the top image (the default: images
    /// read back from shared storage are untrusted).
    #[default]
    Confined,
    /// Any name, absolute or climbing out of the top image's folder (trusted local use).
    Permissive,
}
