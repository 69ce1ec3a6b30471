//! Datamover slots per node.

/// The condition of a Backup whose next datamovers wait for a node with a free slot.
pub const SLOT_CONDITION: &str = "DatamoverSlots";
