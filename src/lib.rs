//! Strata: block-level backup and restore of Kubernetes applications as QCOW2 chains.
//!
//! This facade re-exports the member crates and composes them into the flows a datamover runs:
//! [`backup_volume`], [`restore_volume`], [`list`], [`verify`]. Restores, `strata serve` and
//! [`prune`] (and [`expire_app_backups`], retention per application backup) read through [`open_backup`], which checks the chain against its manifests and
//! every cluster against its backup's checksums. The in-cluster side, the
//! `Target`/`Backup`/`Restore` custom resources and their reconcilers, is `operator` (feature `kubernetes`).
//!
//! ```no_run
//! use strata::target::{Target, VolumeName};
//!
//! let target = Target::open("/srv/backups")?;
//! let volume = VolumeName::new("pvc-data")?;
//! let source = strata::open_volume("/dev/vdb".as_ref())?;
//! let manifest = strata::backup_volume(&target, &volume, &source, &Default::default(),
//!     &mut |_| {})?;
//! strata::restore_volume(&target, &volume, Some(&manifest.id), "restored.raw".as_ref(),
//!     &mut |_| {})?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! - `s3` (default): targets on S3 (`s3://`), through object_store's AWS client. Without it
//!   the facade is the data path on folder targets alone (the demo's build).
//! - `kubernetes`: re-exports `discovery`, `csi` and the `operator` (CRDs, reconcilers, the
//!   controller's run loop), the Kubernetes side (kube and its TLS stack), and composes the
//!   operator with this crate's flows (`operator_context`).
//! - `cli`: the `strata` binary (and, with `kubernetes`, `strata-controller`); installed with
//!   `cargo install --path . --features cli,kubernetes`.

mod planned_restore;
mod retention;
mod verified;
mod volume;

pub use retention::{Expiry, delete_app_backup, expire_app_backups, expire_app_backups_keeping};
pub use strata_chain as chain;
#[cfg(feature = "kubernetes")]
pub use strata_csi as csi;
pub use strata_datamover as datamover;
#[cfg(feature = "kubernetes")]
pub use strata_discovery as discovery;
pub use strata_nbd as nbd;
#[cfg(feature = "kubernetes")]
pub use strata_operator as operator;
pub use strata_qcow2 as qcow2;
pub use strata_target as target;
pub use volume::{
    BackupOptions, CHECKSUMS_FILE, DEFAULT_COMPRESSION_LEVEL, DEFAULT_MAX_CHAIN_LENGTH,
    DIGESTS_FILE, Error, Pruned, Result, VerifyReport, backup_volume, chain_text, follow_links,
    is_mount_point, list, list_readable, open_backup, open_backup_leased, open_destination,
    open_volume, prune, restore_volume, restore_volume_with, verify,
};

/// The operator's settings for a controller whose Backups apply retention with
/// [`expire_app_backups`] and delete their data with [`delete_app_backup`] (the operator sits below this facade, so the facade hands it the
/// data path's retention).
#[cfg(feature = "kubernetes")]
pub fn operator_context(client: kube::Client, image: impl Into<String>) -> operator::Context {
    operator::Context::new(
        client,
        image,
        |target, app, keep_last, pinned| {
            let expiry = expire_app_backups_keeping(target, app, keep_last, pinned)?;
            Ok(operator::AppRetention {
                expired: expiry.expired,
                kept: expiry.kept,
            })
        },
        |target, app, id, volumes| Ok(delete_app_backup(target, app, id, volumes)?),
    )
}
