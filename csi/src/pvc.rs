//! A PVC restored from a snapshot, for a datamover to read.
//!
//! The claim names the snapshot in `spec.dataSource` (group `snapshot.storage.k8s.io`, kind
//! `VolumeSnapshot`, same namespace) and keeps the source's StorageClass. Its size is the
//! snapshot's `restoreSize` when known (the documented minimum for a volume made from it), else
//! the source volume's capacity, else its request. Block mode lets the datamover read the volume
//! as a raw device; when the source was a Filesystem volume, Kubernetes (KEP-3141) refuses the
//! mode change unless the VolumeSnapshotContent carries [`ALLOW_VOLUME_MODE_CHANGE_ANNOTATION`],
//! which only someone allowed to edit contents (the backup controller's service account) can set.
//!
//! Restoring a Filesystem volume runs the other way: the datamover writes the raw bytes into a
//! Block [`staging_pvc`], a snapshot is taken of it, and the claim itself is made from that
//! snapshot ([`claim_from_snapshot`]) in its own mode, which again needs the annotation.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::class::storage_class_name;
use crate::error::{Error, Result};
use crate::naming::{Role, VolumeKey};
use crate::types::GROUP;

/// Annotation on a VolumeSnapshotContent allowing a restore into another volume mode (KEP-3141).
pub const ALLOW_VOLUME_MODE_CHANGE_ANNOTATION: &str =
    "snapshot.storage.kubernetes.io/allow-volume-mode-change";

/// Volume mode of the PVC made from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VolumeMode {
    /// The source PVC's mode (Filesystem when unset).
    #[default]
    SameAsSource,
    /// A raw block device, for a datamover that reads the volume bytes directly.
    Block,
}

fn source_mode(source: &PersistentVolumeClaim) -> &str {
    source
        .spec
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        .unwrap_or("Filesystem")
}

/// Whether restoring `source`'s snapshot in `mode` changes the volume mode (and so needs
/// [`ALLOW_VOLUME_MODE_CHANGE_ANNOTATION`] on the content).
pub fn changes_volume_mode(source: &PersistentVolumeClaim, mode: VolumeMode) -> bool {
    mode == VolumeMode::Block && source_mode(source) != "Block"
}

/// The temporary PVC for `key`, made from snapshot `snapshot` of `source`.
pub fn pvc_from_snapshot(
    key: &VolumeKey,
    source: &PersistentVolumeClaim,
    snapshot: &str,
    restore_size: Option<&Quantity>,
    mode: VolumeMode,
) -> Result<PersistentVolumeClaim> {
    let source_name = source.metadata.name.clone().unwrap_or_default();
    let class = storage_class_name(source)?;
    let spec = source.spec.as_ref();
    let size = restore_size
        .or_else(|| source.status.as_ref()?.capacity.as_ref()?.get("storage"))
        .or_else(|| spec?.resources.as_ref()?.requests.as_ref()?.get("storage"))
        .cloned()
        .ok_or_else(|| Error::MissingField {
            kind: "PersistentVolumeClaim",
            name: source_name.clone(),
            what: "spec.resources.requests.storage",
        })?;
    let access_modes = spec
        .and_then(|s| s.access_modes.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| vec!["ReadWriteOnce".to_owned()]);
    let volume_mode = match mode {
        VolumeMode::Block => "Block",
        VolumeMode::SameAsSource => source_mode(source),
    };
    Ok(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(key.name(Role::Volume)),
            namespace: Some(key.namespace.clone()),
            labels: Some(key.labels(Role::Volume)),
            owner_references: key.owner_references(),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            storage_class_name: Some(class.to_owned()),
            access_modes: Some(access_modes),
            volume_mode: Some(volume_mode.to_owned()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), size)])),
                ..Default::default()
            }),
            data_source: Some(TypedLocalObjectReference {
                api_group: Some(GROUP.to_owned()),
                kind: "VolumeSnapshot".to_owned(),
                name: snapshot.to_owned(),
            }),
            ..Default::default()
        }),
        status: None,
    })
}

/// The empty Block-mode staging PVC for restoring `key`'s claim `claim`: its StorageClass (left
/// unset, like the claim's, for the default class) and access modes, `size` bytes requested.
pub fn staging_pvc(
    key: &VolumeKey,
    claim: &PersistentVolumeClaim,
    size: Quantity,
) -> PersistentVolumeClaim {
    let spec = claim.spec.as_ref();
    let access_modes = spec
        .and_then(|s| s.access_modes.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| vec!["ReadWriteOnce".to_owned()]);
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(key.name(Role::Volume)),
            namespace: Some(key.namespace.clone()),
            labels: Some(key.labels(Role::Volume)),
            owner_references: key.owner_references(),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            storage_class_name: spec.and_then(|s| s.storage_class_name.clone()),
            access_modes: Some(access_modes),
            volume_mode: Some("Block".to_owned()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), size)])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// `claim` to be provisioned from snapshot `snapshot` (same namespace): `spec.dataSource` names
/// it, any other source (`dataSourceRef`) and any `selector` are dropped (the CSI
/// external-provisioner refuses a claim with a selector), and the request becomes `size` when
/// given (the provisioner refuses a claim smaller than the snapshot's `restoreSize`). The
/// volume mode is left as the claim has it.
pub fn claim_from_snapshot(
    mut claim: PersistentVolumeClaim,
    snapshot: &str,
    size: Option<Quantity>,
) -> PersistentVolumeClaim {
    let spec = claim.spec.get_or_insert_with(Default::default);
    spec.data_source = Some(TypedLocalObjectReference {
        api_group: Some(GROUP.to_owned()),
        kind: "VolumeSnapshot".to_owned(),
        name: snapshot.to_owned(),
    });
    spec.data_source_ref = None;
    spec.selector = None;
    if let Some(size) = size {
        spec.resources
            .get_or_insert_with(Default::default)
            .requests
            .get_or_insert_with(BTreeMap::new)
            .insert("storage".to_owned(), size);
    }
    claim
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(extra_status: serde_json::Value, mode: Option<&str>) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "data", "namespace": "shop"},
            "spec": {"storageClassName": "fast", "accessModes": ["ReadWriteOnce"],
                     "volumeMode": mode, "resources": {"requests": {"storage": "10Gi"}}},
            "status": extra_status
        }))
        .unwrap()
    }

    #[test]
    fn same_class_mode_and_snapshot_as_data_source() {
        let key = VolumeKey::new("run", "shop", "data");
        let pvc = pvc_from_snapshot(
            &key,
            &source(json!({}), None),
            "snap-1",
            None,
            VolumeMode::SameAsSource,
        )
        .unwrap();
        let value = serde_json::to_value(&pvc).unwrap();
        assert_eq!(value["metadata"]["name"], key.name(Role::Volume));
        assert_eq!(value["metadata"]["namespace"], "shop");
        assert_eq!(
            value["spec"],
            json!({
                "storageClassName": "fast", "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
                "resources": {"requests": {"storage": "10Gi"}},
                "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap-1"}
            })
        );
    }

    #[test]
    fn size_prefers_restore_size_then_capacity() {
        let key = VolumeKey::new("run", "shop", "data");
        let src = source(json!({"capacity": {"storage": "12Gi"}}), Some("Block"));
        let size = |pvc: PersistentVolumeClaim| {
            pvc.spec.unwrap().resources.unwrap().requests.unwrap()["storage"].clone()
        };
        let from_capacity =
            pvc_from_snapshot(&key, &src, "s", None, VolumeMode::SameAsSource).unwrap();
        assert_eq!(
            from_capacity.spec.as_ref().unwrap().volume_mode.as_deref(),
            Some("Block")
        );
        assert_eq!(size(from_capacity), Quantity("12Gi".into()));
        let restore = Quantity("11811160064".into());
        assert_eq!(
            size(
                pvc_from_snapshot(&key, &src, "s", Some(&restore), VolumeMode::SameAsSource)
                    .unwrap()
            ),
            restore
        );
    }

    #[test]
    fn block_mode_for_the_datamover_and_mode_change_detection() {
        let key = VolumeKey::new("run", "shop", "data");
        let fs = source(json!({}), Some("Filesystem"));
        let pvc = pvc_from_snapshot(&key, &fs, "s", None, VolumeMode::Block).unwrap();
        assert_eq!(pvc.spec.unwrap().volume_mode.as_deref(), Some("Block"));
        assert!(changes_volume_mode(&fs, VolumeMode::Block));
        assert!(!changes_volume_mode(&fs, VolumeMode::SameAsSource));
        assert!(!changes_volume_mode(
            &source(json!({}), Some("Block")),
            VolumeMode::Block
        ));
    }

    #[test]
    fn missing_class_or_size_is_reported() {
        let key = VolumeKey::new("run", "shop", "data");
        let mut no_size = source(json!({}), None);
        no_size.spec.as_mut().unwrap().resources = None;
        assert!(matches!(
            pvc_from_snapshot(&key, &no_size, "s", None, VolumeMode::Block),
            Err(Error::MissingField {
                what: "spec.resources.requests.storage",
                ..
            })
        ));
        let mut no_class = source(json!({}), None);
        no_class.spec.as_mut().unwrap().storage_class_name = None;
        assert!(matches!(
            pvc_from_snapshot(&key, &no_class, "s", None, VolumeMode::Block),
            Err(Error::MissingField {
                what: "spec.storageClassName",
                ..
            })
        ));
    }

    #[test]
    fn staging_is_an_empty_block_claim_of_the_claims_class() {
        let key = VolumeKey::new("copy", "shop-copy", "data");
        let claim = source(json!({}), Some("Filesystem"));
        let staging = staging_pvc(&key, &claim, Quantity("2Gi".into()));
        let value = serde_json::to_value(&staging).unwrap();
        assert_eq!(value["metadata"]["name"], key.name(Role::Volume));
        assert_eq!(value["metadata"]["namespace"], "shop-copy");
        assert_eq!(value["metadata"]["labels"]["strata.io/role"], "volume");
        assert_eq!(
            value["spec"],
            json!({"storageClassName": "fast", "accessModes": ["ReadWriteOnce"],
                   "volumeMode": "Block", "resources": {"requests": {"storage": "2Gi"}}})
        );
        let mut default_class = claim.clone();
        default_class.spec.as_mut().unwrap().storage_class_name = None;
        default_class.spec.as_mut().unwrap().access_modes = None;
        let spec = staging_pvc(&key, &default_class, Quantity("1Gi".into()))
            .spec
            .unwrap();
        assert_eq!(spec.storage_class_name, None);
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_owned()]));
    }

    #[test]
    fn claim_from_snapshot_replaces_the_source_and_keeps_the_mode() {
        let mut claim = source(json!({}), Some("Filesystem"));
        claim.metadata.labels = Some(BTreeMap::from([("app".to_owned(), "db".to_owned())]));
        let spec = claim.spec.as_mut().unwrap();
        spec.data_source_ref = Some(Default::default());
        spec.selector = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some(BTreeMap::from([("disk".to_owned(), "fast".to_owned())])),
                ..Default::default()
            },
        );
        let made = claim_from_snapshot(claim.clone(), "strata-snapshot-x", None);
        let value = serde_json::to_value(&made).unwrap();
        assert_eq!(value["metadata"]["labels"]["app"], "db");
        assert_eq!(value["spec"]["volumeMode"], "Filesystem");
        assert_eq!(
            value["spec"]["dataSource"],
            json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "strata-snapshot-x"})
        );
        assert!(value["spec"].get("dataSourceRef").is_none());
        assert!(value["spec"].get("selector").is_none(), "{value}");
        assert_eq!(value["spec"]["resources"]["requests"]["storage"], "10Gi");
        let grown = claim_from_snapshot(claim, "s", Some(Quantity("12Gi".into())));
        assert_eq!(
            grown.spec.unwrap().resources.unwrap().requests.unwrap()["storage"],
            Quantity("12Gi".into())
        );
    }
}
