//! Progress counters, reported through a callback as work goes on.

/// Where a backup, restore or merge stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the volume (or virtual disk) in all.
    pub total_bytes: u64,
    /// Bytes scanned so far.
    pub scanned_bytes: u64,
    /// Bytes of data written (stored clusters for a backup, data for a restore).
    pub written_bytes: u64,
    /// Clusters stored because they changed.
    pub changed_clusters: u64,
    /// Clusters that became zero and were written as zero clusters.
    pub zeroed_clusters: u64,
}
