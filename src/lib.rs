//! Strata: block-level backup and restore of Kubernetes applications as QCOW2 chains.

pub use strata_chain as chain;
pub use strata_discovery as discovery;
pub use strata_nbd as nbd;
pub use strata_qcow2 as qcow2;
pub use strata_target as target;
