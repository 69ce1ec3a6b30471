//! The persistent volumes an application uses.

use serde::{Deserialize, Serialize};

use crate::inventory::Inventory;
use crate::object::{ObjectKey, annotation};

/// A PersistentVolumeClaim the application uses, with what a block-level backup needs to
/// know to copy it and to provision its replacement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    /// Namespace of the claim.
    pub namespace: String,
    /// Name of the claim.
    pub pvc: String,
    /// Storage class: the claim's, its legacy annotation's, or its volume's.
    pub storage_class: Option<String>,
    /// Size: the bound capacity when known, else the requested size.
    pub size: Option<String>,
    /// Access modes, e.g. `ReadWriteOnce`.
    pub access_modes: Vec<String>,
    /// `Filesystem` (the default) or `Block`.
    pub volume_mode: String,
    /// The PersistentVolume the claim is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent_volume: Option<BoundVolume>,
}

/// The PersistentVolume behind a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BoundVolume {
    /// PV name.
    pub name: String,
    /// CSI driver, when the PV is a CSI volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csi_driver: Option<String>,
    /// CSI volume handle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
    /// PV capacity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
}

fn text(value: &serde_json::Value, pointer: &str) -> Option<String> {
    value
        .pointer(pointer)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// Describe a claim of the inventory; `None` when it is not there.
pub fn describe(inventory: &Inventory, claim: &ObjectKey) -> Option<Volume> {
    let pvc = inventory.get(claim)?;
    let spec = &pvc.data;
    let pv = text(spec, "/spec/volumeName").and_then(|name| {
        inventory
            .get(&ObjectKey::new("", "PersistentVolume", None, &name))
            .map(|pv| (name, pv))
    });
    let persistent_volume = pv.map(|(name, pv)| BoundVolume {
        name,
        csi_driver: text(&pv.data, "/spec/csi/driver"),
        volume_handle: text(&pv.data, "/spec/csi/volumeHandle"),
        capacity: text(&pv.data, "/spec/capacity/storage"),
    });
    let storage_class = text(spec, "/spec/storageClassName")
        .or_else(|| annotation(pvc, "volume.beta.kubernetes.io/storage-class").map(str::to_owned))
        .or_else(|| {
            let name = text(spec, "/spec/volumeName")?;
            text(
                &inventory
                    .get(&ObjectKey::new("", "PersistentVolume", None, &name))?
                    .data,
                "/spec/storageClassName",
            )
        });
    let access_modes = spec
        .pointer("/spec/accessModes")
        .and_then(|m| m.as_array())
        .map(|m| {
            m.iter()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Some(Volume {
        namespace: claim.namespace.clone().unwrap_or_default(),
        pvc: claim.name.clone(),
        storage_class,
        size: text(spec, "/status/capacity/storage")
            .or_else(|| text(spec, "/spec/resources/requests/storage")),
        access_modes,
        volume_mode: text(spec, "/spec/volumeMode").unwrap_or_else(|| "Filesystem".to_owned()),
        persistent_volume,
    })
}
