//! Changed-block metadata from the Kubernetes SnapshotMetadata service (KEP-3314, changed block
//! tracking), turned into the byte ranges `strata backup --changed-ranges` reads.
//!
//! A CSI driver with changed-block tracking runs a gRPC service (`SnapshotMetadata`, [`proto`])
//! and advertises it with a cluster-scoped [`SnapshotMetadataService`] named after the driver:
//! address, CA certificate and token audience. [`changed_blocks`] does the whole flow for one
//! snapshot: the driver from the snapshot's VolumeSnapshotContent, the service, a
//! service-account token for its audience (TokenRequest API), a TLS connection trusting only the
//! service's CA, then `GetMetadataAllocated` (no base: the ranges holding data, for a full
//! backup) or `GetMetadataDelta` (the base snapshot's CSI handle and the target's name: the
//! changed ranges, for an incremental), streamed, checked ([`Violation`]), coalesced and resumed
//! from the last range received when the stream breaks ([`fetch`]). In the cluster, a backup
//! datamover runs it as an init step ([`backup_job_with_changed_blocks`]).
//!
//! ```no_run
//! use strata_csi::metadata::{ChangedBlocksRequest, FetchOptions, changed_blocks, write_changed_ranges};
//!
//! # async fn run(client: kube::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let request = ChangedBlocksRequest::new("shop", "data-tuesday", Some("data-monday".into()));
//! let changed = changed_blocks(&client, &request, &FetchOptions::default()).await?;
//! write_changed_ranges(std::fs::File::create("/scratch/changed-ranges.json")?, &changed.ranges)?;
//! # Ok(()) }
//! ```
//!
//! FIXED_LENGTH and VARIABLE_LENGTH block metadata are both offset and size tuples; they differ
//! only in what is checked (one size for all FIXED_LENGTH tuples), so both become the same ranges.

mod channel;
mod collector;
mod fetch;
mod job;
pub mod proto;
mod ranges_file;
mod request;
mod service;
mod token;

pub use channel::{MetadataClient, connect};
pub use collector::Violation;
pub use fetch::{ChangedBlocks, FetchOptions, Query, fetch, is_transient};
pub use job::{CHANGED_RANGES_PATH, ChangedBlocksBase, backup_job_with_changed_blocks};
pub use proto::BlockMetadataType;
pub use ranges_file::write_changed_ranges;
pub use request::{ChangedBlocksRequest, DeltaBase, changed_blocks};
pub use service::{
    SnapshotMetadataService, SnapshotMetadataServiceSpec, bound_content, metadata_service,
    snapshot_handle,
};
pub use token::{SecurityToken, ServiceAccountRef, current_service_account, request_token};
