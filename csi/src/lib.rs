//! CSI volume snapshots, PVCs made from them, and datamover Jobs: the building blocks of Strata's
//! in-cluster data path.
//!
//! A backup of a PVC runs: choose the VolumeSnapshotClass for the PVC's CSI driver
//! ([`choose_snapshot_class`]), create a [`VolumeSnapshot`] ([`volume_snapshot`]), wait until it
//! is ready ([`client::wait_until_ready`], surfacing `status.error`), make a PVC from it
//! ([`pvc_from_snapshot`], Block mode when the datamover reads the raw device), run a datamover
//! Job on it ([`datamover::backup_job`]) and clean up ([`client::delete_snapshot`]).
//!
//! A restore writes raw bytes too: into the recreated PVC when it is Block, else into an empty
//! Block [`staging_pvc`], snapshotted with [`staging_snapshot`], whose content is annotated with
//! [`client::allow_volume_mode_change`] before the Filesystem PVC is made from it
//! ([`claim_from_snapshot`]).
//!
//! For an incremental, [`metadata`] asks the CSI driver's SnapshotMetadata service (Kubernetes
//! changed-block tracking) which ranges changed since the previous backup's snapshot, so the
//! datamover reads only those ([`metadata::backup_job_with_changed_blocks`]).
//!
//! ```
//! use strata_csi::{Role, VolumeKey, volume_snapshot};
//!
//! let key = VolumeKey::new("nightly-2026-11-25", "shop", "data-postgres-0");
//! let snapshot = volume_snapshot(&key, "csi-hostpath-snapclass");
//! // The same run and PVC always give the same name, so a re-run finds its own snapshot.
//! assert_eq!(snapshot.metadata.name, Some(key.name(Role::Snapshot)));
//! assert!(key.name(Role::Snapshot).len() <= 63);
//! ```
//!
//! # Design
//!
//! - Pure functions build every object and read every status; the async helpers in [`client`]
//!   only move them through the API server, so the decisions are unit-tested without a cluster.
//! - Idempotence by naming: object names are a function of the run, namespace and PVC
//!   ([`naming`]), and creating finds an existing object of that name and checks it is ours
//!   instead of duplicating it.
//! - The snapshot CRDs are typed here ([`types`]) from the external-snapshotter v1 API; k8s-openapi
//!   has only the core API. No schema is derived: the cluster installs these CRDs.
//!
//! # Crate features
//!
//! None. The crate depends on kube (client) and k8s-openapi with the workspace's API version, and
//! on tonic and prost for the SnapshotMetadata gRPC API, whose `.proto` file is compiled at build
//! time by protox (no `protoc` needed). TLS everywhere is rustls with the aws-lc-rs provider.

mod class;
pub mod client;
pub mod datamover;
mod error;
pub mod metadata;
pub mod naming;
mod pvc;
mod snapshot;
pub mod types;

pub use class::{DEFAULT_CLASS_ANNOTATION, choose_snapshot_class, driver_of, storage_class_name};
pub use error::{Error, Result};
pub use naming::{Role, VolumeKey};
pub use pvc::{
    ALLOW_VOLUME_MODE_CHANGE_ANNOTATION, VolumeMode, changes_volume_mode, claim_from_snapshot,
    pvc_from_snapshot, staging_pvc,
};
pub use snapshot::{
    ReadySnapshot, SnapshotLimits, SnapshotState, check_adoptable, ready_or_failed, snapshot_state,
    staging_snapshot, volume_snapshot, waited_state,
};
pub use types::{DeletionPolicy, VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent};
