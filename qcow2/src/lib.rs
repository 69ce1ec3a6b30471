//! A pure-Rust QCOW2 reader and writer with backing chains, safe with hostile images.

mod convert;
mod io;
mod sink;
mod writer;

pub use convert::{BackingRead, RawBacking, convert_raw, convert_raw_file};
pub use io::{ImageSink, LocalStorage, ReadAt, Storage};
pub use sink::{FileSink, MemorySink};
pub use writer::error::WriteError;
pub use writer::options::{
    Compat, CompressionType, DEFAULT_CLUSTER_SIZE, MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE,
    WriterOptions,
};
pub use writer::{WriteSummary, Writer};

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
