//! Application discovery for Kubernetes backups: find every object and volume that makes up
//! an application, save the objects in a form that restores cleanly on another cluster, and
//! restore them in an order that works.
//!
//! An application is any mix of
//! - **Helm releases**, read from Helm's own storage records ([`helm`]): the live revision's
//!   manifest is resolved to objects, objects annotated as the release's are added, and every
//!   revision's record is kept so `helm history`, `upgrade` and `rollback` work after restore;
//! - **operator instances** ([`operator`]): a custom resource, its CRD, everything its
//!   ownerReferences graph reaches, and optionally the operator itself;
//! - **label selectors** ([`Selector`]) in the full Kubernetes syntax.
//!
//! Discovery then adds what those objects need (PVCs, ConfigMaps, Secrets, ServiceAccounts),
//! lists the volumes with their storage class, size, access and volume modes and bound PVs
//! ([`Volume`]), and leaves out what must not be restored ([`Exclusion`]).
//!
//! # Example
//!
//! Discover a Helm release in an offline dump (`kubectl get -o json` output) and write the
//! metadata archive:
//!
//! ```no_run
//! use strata_discovery::{AppSpec, DumpSource, Inventory, MetadataBackup, RestoreOrder, discover};
//!
//! # async fn run() -> strata_discovery::Result<()> {
//! let source = DumpSource::from_path("examples/data/sample-app.json".as_ref())?;
//! let inventory = Inventory::collect(&source, &["shop".to_owned()]).await?;
//! let spec = AppSpec { namespace: "shop".into(), helm_releases: vec!["db".into()], ..Default::default() };
//! let app = discover(&inventory, &spec)?;
//! let backup = MetadataBackup::from_application(&app, &RestoreOrder::default())?;
//! for r in backup.references()? {
//!     println!("{r}");
//! }
//! let file = std::fs::File::create("metadata.tar.gz").expect("create");
//! backup.write_archive(file)?;
//! # Ok(()) }
//! ```
//!
//! Against a cluster, use [`LiveSource`] over a [`kube::Client`] instead; the rest is the same.
//! Restoring: [`MetadataBackup::read_archive`], a [`RestorePlan`] with [`Transforms`]
//! (namespace and storage-class mapping, label/annotation edits, JSON patches), then
//! [`restore::apply`] with server-side apply.
//!
//! # Selector syntax
//!
//! ```
//! use strata_discovery::Selector;
//! let s: Selector = "app.kubernetes.io/name=db,tier in (primary,replica),!canary".parse()?;
//! let labels = [("app.kubernetes.io/name".to_string(), "db".to_string()), ("tier".into(), "primary".into())];
//! assert!(s.matches(&labels.into_iter().collect()));
//! # Ok::<(), strata_discovery::Error>(())
//! ```
//!
//! # Design
//!
//! - **Snapshot, then decide.** Sources only list ([`ObjectSource`]); an [`Inventory`] holds one
//!   read of the namespace(s) plus cluster-scoped objects, and all discovery is plain
//!   synchronous code over it. The same logic runs over a live cluster and over a dump, and a
//!   discovery sees one consistent state rather than racing the cluster object by object.
//! - **Dynamic objects.** Everything is [`kube::api::DynamicObject`] / [`serde_json::Value`]:
//!   custom resources have no Rust types, and unknown fields must survive a round trip.
//! - **Restore order is data** ([`RestoreOrder`]), a table callers replace or edit; owners are
//!   moved before their dependents so ownerReferences can be re-pointed at new uids.
//! - **Persistent volume data is not here.** This crate lists the PVCs; the block-level copy
//!   of their data is the job of the QCOW2 chain crates.
//!
//! # Crate features
//!
//! None. The crate uses kube-rs with rustls on aws-lc-rs and one k8s-openapi API version
//! chosen by the workspace.

mod application;
mod archive;
mod error;
pub mod helm;
mod inventory;
mod object;
pub mod operator;
mod references;
pub mod restore;
mod sanitize;
mod selector;
mod source;
mod volumes;
mod yaml;

pub use application::{AppSpec, Application, discover};
pub use archive::{
    FORMAT, INDEX_PATH, MAX_ENTRIES, MAX_ENTRY_BYTES, MAX_TOTAL_BYTES, MetadataBackup,
};
pub use error::{Error, Result};
pub use inventory::{Inventory, UNREAD_KINDS};
pub use object::{ObjectKey, ObjectRef, group_of};
pub use operator::OperatorRef;
pub use references::{claims_from_templates, dependencies};
pub use restore::{RestoreOrder, RestorePlan, Transforms};
pub use sanitize::{Exclusion, exclusion, sanitize};
pub use selector::{Requirement, Selector};
pub use source::{DumpSource, LiveSource, ObjectSource, ResourceKind};
pub use volumes::{BoundVolume, Volume};
