//! Choosing the VolumeSnapshotClass for a PVC.
//!
//! A VolumeSnapshotClass serves the CSI driver named in its `driver` field; a PVC's driver is the
//! `provisioner` of its StorageClass. Among several classes for one driver the one annotated
//! `snapshot.storage.kubernetes.io/is-default-class: "true"` wins, as the snapshot controller
//! itself does when `volumeSnapshotClassName` is unset (external-snapshotter, "Volume Snapshot
//! Classes" in the Kubernetes storage docs). Unlike the controller this chooses up front, so an
//! ambiguity is a typed error before anything is created rather than an event on a stuck snapshot.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;

use crate::error::{Error, Result};
use crate::types::VolumeSnapshotClass;

/// Annotation that marks a VolumeSnapshotClass as its driver's default.
pub const DEFAULT_CLASS_ANNOTATION: &str = "snapshot.storage.kubernetes.io/is-default-class";

/// The StorageClass name a PVC asks for (`spec.storageClassName`).
pub fn storage_class_name(pvc: &PersistentVolumeClaim) -> Result<&str> {
    pvc.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::MissingField {
            kind: "PersistentVolumeClaim",
            name: pvc.metadata.name.clone().unwrap_or_default(),
            what: "spec.storageClassName",
        })
}

/// The CSI driver behind `storage_class`: its provisioner.
pub fn driver_of(storage_class: &StorageClass) -> &str {
    &storage_class.provisioner
}

fn is_default(class: &VolumeSnapshotClass) -> bool {
    class
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
        .is_some_and(|v| v == "true")
}

fn name_of(class: &VolumeSnapshotClass) -> &str {
    class.metadata.name.as_deref().unwrap_or("")
}

/// Choose the class for `driver` among `classes`.
///
/// With `preferred` set, that class must exist and serve `driver`. Otherwise the only class for
/// the driver is taken, or the single one marked default among several.
pub fn choose_snapshot_class<'a>(
    driver: &str,
    classes: &'a [VolumeSnapshotClass],
    preferred: Option<&str>,
) -> Result<&'a VolumeSnapshotClass> {
    if let Some(wanted) = preferred {
        let class = classes
            .iter()
            .find(|c| name_of(c) == wanted)
            .ok_or_else(|| Error::SnapshotClassMismatch {
                class: wanted.to_owned(),
                reason: "does not exist".to_owned(),
            })?;
        if class.driver != driver {
            return Err(Error::SnapshotClassMismatch {
                class: wanted.to_owned(),
                reason: format!("serves driver {:?}, not {driver:?}", class.driver),
            });
        }
        return Ok(class);
    }
    let candidates: Vec<&VolumeSnapshotClass> =
        classes.iter().filter(|c| c.driver == driver).collect();
    let defaults: Vec<&VolumeSnapshotClass> = candidates
        .iter()
        .copied()
        .filter(|c| is_default(c))
        .collect();
    match (candidates.as_slice(), defaults.as_slice()) {
        ([], _) => Err(Error::NoSnapshotClass {
            driver: driver.to_owned(),
        }),
        ([only], _) => Ok(only),
        (_, [default]) => Ok(default),
        _ => {
            let mut names: Vec<String> = candidates.iter().map(|c| name_of(c).to_owned()).collect();
            names.sort();
            Err(Error::AmbiguousSnapshotClass {
                driver: driver.to_owned(),
                candidates: names,
                defaults: defaults.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::DeletionPolicy;
    use std::collections::BTreeMap;

    fn class(name: &str, driver: &str, default: Option<&str>) -> VolumeSnapshotClass {
        let mut c = VolumeSnapshotClass {
            driver: driver.to_owned(),
            deletion_policy: DeletionPolicy::Delete,
            ..Default::default()
        };
        c.metadata.name = Some(name.to_owned());
        c.metadata.annotations =
            default.map(|v| BTreeMap::from([(DEFAULT_CLASS_ANNOTATION.to_owned(), v.to_owned())]));
        c
    }

    fn chosen(
        driver: &str,
        classes: &[VolumeSnapshotClass],
        preferred: Option<&str>,
    ) -> Result<String> {
        choose_snapshot_class(driver, classes, preferred).map(|c| name_of(c).to_owned())
    }

    #[test]
    fn single_class_for_the_driver_is_taken_even_without_default() {
        let classes = [
            class("ebs", "ebs.csi.aws.com", None),
            class("hp", "hostpath.csi.k8s.io", Some("true")),
        ];
        assert_eq!(chosen("ebs.csi.aws.com", &classes, None).unwrap(), "ebs");
    }

    #[test]
    fn default_annotation_breaks_ties() {
        let classes = [
            class("slow", "d", None),
            class("fast", "d", Some("true")),
            class("off", "d", Some("false")),
        ];
        assert_eq!(chosen("d", &classes, None).unwrap(), "fast");
    }

    #[test]
    fn override_wins_and_is_checked() {
        let classes = [
            class("a", "d", Some("true")),
            class("b", "d", None),
            class("x", "other", None),
        ];
        assert_eq!(chosen("d", &classes, Some("b")).unwrap(), "b");
        assert!(matches!(
            choose_snapshot_class("d", &classes, Some("x")),
            Err(Error::SnapshotClassMismatch { class, reason }) if class == "x" && reason.contains("other")
        ));
        assert!(matches!(
            choose_snapshot_class("d", &classes, Some("nope")),
            Err(Error::SnapshotClassMismatch { reason, .. }) if reason == "does not exist"
        ));
    }

    #[test]
    fn none_or_ambiguous_is_a_typed_error() {
        let classes = [
            class("a", "d", None),
            class("b", "d", None),
            class("c", "d2", Some("true")),
        ];
        assert!(matches!(
            choose_snapshot_class("missing", &classes, None),
            Err(Error::NoSnapshotClass { driver }) if driver == "missing"
        ));
        match choose_snapshot_class("d", &classes, None) {
            Err(Error::AmbiguousSnapshotClass {
                candidates,
                defaults,
                ..
            }) => {
                assert_eq!(candidates, ["a", "b"]);
                assert_eq!(defaults, 0);
            }
            other => panic!("expected ambiguity, got {other:?}"),
        }
        let two_defaults = [class("a", "d", Some("true")), class("b", "d", Some("true"))];
        assert!(matches!(
            choose_snapshot_class("d", &two_defaults, None),
            Err(Error::AmbiguousSnapshotClass { defaults: 2, .. })
        ));
    }

    #[test]
    fn pvc_without_storage_class_is_reported() {
        let mut pvc = PersistentVolumeClaim::default();
        pvc.metadata.name = Some("data".into());
        assert!(matches!(
            storage_class_name(&pvc),
            Err(Error::MissingField { what: "spec.storageClassName", name, .. }) if name == "data"
        ));
    }
}
