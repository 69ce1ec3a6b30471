//! Strata's in-cluster operator: custom resources, the reconcile logic of the controller and
//! its run loop. The facade re-exports it as `strata::operator` (feature `kubernetes`).
//!
//! `Target`, `Backup` and `Restore` ([`crd`]) describe what to back up, where, and what to
//! restore. The reconcilers ([`reconcile_backup`], [`reconcile_restore`]) move one run a step
//! forward per call and record where it stands in the resource's status; [`controller::run`]
//! wraps them in kube-runtime `Controller`s, and the `strata-controller` binary is a thin
//! `main` around it. Backups' retention runs the data path's `strata::expire_app_backups`, and
//! `deletionPolicy: Delete` its `strata::delete_app_backup`, which the facade
//! (above this crate) hands over in the [`Context`] (`strata::operator_context`).
//!
//! ```
//! // The CRDs to install, as `strata crds | kubectl apply -f -` prints them.
//! let yaml = strata_operator::crd::crds_yaml()?;
//! assert!(yaml.contains("name: backups.strata.io"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Design
//!
//! - **Level-triggered, one step per call.** A reconcile reads the resource's status and the
//!   cluster, does the next step, writes the status and asks to be called again. Nothing is
//!   held in memory between calls, so a controller restart resumes where the status says.
//! - **Idempotent by naming.** Snapshots, PVCs and Jobs get strata-csi's deterministic names
//!   for (run, namespace, PVC); creating finds an existing object instead of duplicating it,
//!   the metadata archive is kept in a Secret of a deterministic name until it is committed, and
//!   the application backup id is the Backup's name, committed create-only.
//! - **Changed blocks when the cluster offers them.** Each volume keeps the snapshot of its
//!   latest backup as a base; an incremental's datamover asks the CSI driver's SnapshotMetadata
//!   service what changed since it, and compares digests whenever that is not possible
//!   (`reconcile::cbt` explains the record and why it lives on the snapshot).
//! - **One Backup per volume at a time**, by a Lease per PVC created atomically and owned by the
//!   Backup, so backup ids and bases are never attributed to the wrong run.
//! - **Failures are data.** Every error is classified ([`ErrorClass`]). A permanent one (bad
//!   spec, 422 Invalid, corrupt data, failed Job) sets the `Failed` condition and phase; a
//!   transient one (5xx, 429, conflicts, target I/O) sets condition `Retrying`, a stalled one
//!   (403, a missing Target or Secret, refused credentials) condition `Stalled`, both retried
//!   with exponential backoff per object ([`backoff`]) and cleared by the next success. Each
//!   failure is also a Warning Event, each phase change a Normal one ([`events`]).
//! - **Optimistic concurrency.** Status is written with the `resourceVersion` the reconcile
//!   read, so a write computed from a stale copy is refused (409) and redone from a fresh read.
//! - **One leader.** Replicas elect one ([`leader`], a Lease with client-go's semantics); only
//!   it runs the controllers. Each replica serves probes and Prometheus metrics ([`endpoint`],
//!   [`metrics`]).

pub mod backoff;
mod context;
pub mod controller;
pub mod crd;
pub mod endpoint;
mod error;
pub mod events;
pub mod install;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod reconcile;
mod selection;
pub mod status;

pub use context::{
    AppRetention, BoxError, Context, DEFAULT_SNAPSHOT_READY_TIMEOUT, DeleteAppBackup, Prune,
    TargetAccess, cluster_uid, folder_of, valid_cluster_id, volume_name,
};
pub use error::{Error, ErrorClass, Result};
pub use reconcile::{reconcile_backup, reconcile_restore, reconcile_target};
pub use selection::{ApplicationSelection, OperatorSelection};
