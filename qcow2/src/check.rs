//! Checked reads: a caller-supplied [`ClusterCheck`] sees every stored cluster a reader of the
//! [`Image`](crate::Image) returns, whole, before any of its bytes leave the reader.
//!
//! The reader knows where a cluster is stored (qcow2.rst, "Cluster mapping": a standard cluster
//! descriptor's host offset, or a compressed cluster descriptor); the caller knows what the
//! cluster should hold (a checksum list written with the image). Putting the hook in the
//! reader, rather than in each of its users, makes every reader of a chain (hydration, an NBD
//! export, a merge) checked by opening the chain with [`OpenOptions::cluster_check`](crate::OpenOptions).

/// What a [`ClusterCheck`] found wrong, and with which image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    /// The image to blame (0 is the top): the one whose data failed, or whose list says it
    /// stores a cluster the chain does not read from it.
    pub depth: usize,
    /// Guest offset of the cluster.
    pub guest_offset: u64,
    /// What is wrong, in a few words after "cluster at guest offset 0x...".
    pub problem: String,
    /// The check could not be made (what it checks against did not read back: a local I/O
    /// error), rather than finding the cluster wrong: the read fails with
    /// [`Error::Io`](crate::Error::Io), not [`Error::ClusterCheck`](crate::Error::ClusterCheck),
    /// so that the backup is not taken for damaged.
    pub unchecked: bool,
}

/// Checks the clusters a chain's readers return, against what the caller knows they must hold.
///
/// Offsets are guest offsets; `depth` is the image's place in the chain (0 is the top).
/// A read of part of a stored cluster still reads and checks the whole cluster. A
/// [`CheckFailure`] fails the read with [`Error::ClusterCheck`](crate::Error::ClusterCheck).
///
/// Only QCOW2 images without extended L2 entries can be checked: a chain with a raw image or
/// subclusters is refused when opened with a check.
pub trait ClusterCheck: Send + Sync {
    /// The image at `depth` stores the cluster starting at `guest_offset` as `data` (after
    /// decompression; shorter than a cluster only at the end of the image's virtual size).
    fn stored(&self, depth: usize, guest_offset: u64, data: &[u8]) -> Result<(), CheckFailure>;

    /// `len` bytes from `guest_offset` read as zeros without any stored data: the image at
    /// `depth` says so (zero clusters), or, with `None`, no image of the chain allocates them.
    fn zeros(&self, depth: Option<usize>, guest_offset: u64, len: u64) -> Result<(), CheckFailure>;

    /// The name errors give the image at `depth` (its storage name when `None`).
    fn image_name(&self, depth: usize) -> Option<String> {
        let _ = depth;
        None
    }
}
