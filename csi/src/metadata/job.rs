//! A backup datamover that first asks changed-block tracking what changed.
//!
//! The Job of [`datamover::job`](crate::datamover::job) gains an init container running
//! `strata changed-blocks --namespace NS --snapshot S --base-snapshot-handle H --output
//! CHANGED_RANGES_PATH --allow-unavailable`; the backup container then runs `strata backup
//! --changed-ranges CHANGED_RANGES_PATH --changed-since ID`, reading only the changed ranges.
//! Both share the scratch `emptyDir`.
//!
//! The base must be the snapshot the volume's latest backup in the target was taken from: an
//! incremental records only what the list names, so a list against another base, or the
//! allocated ranges of a snapshot (which miss data deleted since the previous backup), would
//! make a wrong backup. [`ChangedBlocksBase`] therefore names both the base snapshot's CSI
//! handle and the backup taken from it, and `--changed-since` makes `strata backup` compare
//! digests instead when that backup is no longer the volume's latest.
//!
//! Changed-block tracking is an optimisation, never a reason for a backup to fail: when the
//! metadata call fails (service down, token refused, base gone from the storage system),
//! `--allow-unavailable` makes the init step log the error and write no file, and the backup
//! step, finding no file, compares digests. The fallback sits in the Job because only the Job
//! sees the call fail, and one pod that falls back costs less than a failed Job, its retries
//! and a second Job.
//!
//! The init container needs the Kubernetes API (the snapshot and its content, the
//! SnapshotMetadataService, a TokenRequest), so it alone mounts a projected service-account
//! token at the standard path; the backup container, which holds the target's credentials,
//! still gets none. The pod's service account needs `get` on `volumesnapshots` and
//! `volumesnapshotcontents` (snapshot.storage.k8s.io), on `snapshotmetadataservices`
//! (cbt.storage.k8s.io), and `create` on `serviceaccounts/token` for itself; the metadata
//! service additionally checks that it may `get` the snapshots (KEP-3314).

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMapProjection, Container, DownwardAPIProjection, DownwardAPIVolumeFile, KeyToPath,
    ObjectFieldSelector, ProjectedVolumeSource, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};

use crate::datamover::{self, DatamoverSpec, SCRATCH_PATH, Step};
use crate::error::{Error, Result};

/// Where the changed-blocks step writes the ranges the backup step reads.
pub const CHANGED_RANGES_PATH: &str = "/scratch/changed-ranges.json";
/// Where the init container finds its API credentials (kube's in-cluster configuration).
const API_ACCESS_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const API_ACCESS_VOLUME: &str = "kube-api-access";
const INIT_CONTAINER: &str = "changed-blocks";
/// Lifetime of the projected API token; the kubelet renews it.
const API_TOKEN_SECONDS: i64 = 3600;

/// What an incremental's changed blocks are listed against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangedBlocksBase {
    /// CSI handle of the base snapshot (its VolumeSnapshotContent's `status.snapshotHandle`),
    /// the `base_snapshot_id` of `GetMetadataDelta`.
    pub snapshot_handle: String,
    /// The volume backup taken from the base snapshot, which the incremental's parent must be.
    pub backup: String,
}

/// The incremental backup Job of `spec`, listing the changes from `base` to VolumeSnapshot
/// `snapshot` (in the volume's namespace) first.
pub fn backup_job_with_changed_blocks(
    spec: &DatamoverSpec,
    snapshot: &str,
    base: &ChangedBlocksBase,
) -> Result<Job> {
    for (what, value) in [
        ("snapshot", snapshot),
        ("base snapshot handle", &base.snapshot_handle),
        ("base backup", &base.backup),
    ] {
        if value.is_empty() {
            return Err(Error::Invalid {
                what,
                reason: "must not be empty".to_owned(),
            });
        }
    }
    let mut job = datamover::job(
        spec,
        &Step::Backup {
            full: false,
            changed_ranges: Some(CHANGED_RANGES_PATH.to_owned()),
            changed_since: Some(base.backup.clone()),
        },
    )?;
    let pod = job
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .ok_or_else(|| Error::Invalid {
            what: "datamover Job",
            reason: "has no pod template".to_owned(),
        })?;
    let backup = pod.containers.first().cloned().unwrap_or_default();
    let args = [
        "strata",
        "changed-blocks",
        "--namespace",
        &spec.key.namespace,
        "--snapshot",
        snapshot,
        "--base-snapshot-handle",
        &base.snapshot_handle,
        "--output",
        CHANGED_RANGES_PATH,
        "--allow-unavailable",
    ];
    let mut mounts: Vec<VolumeMount> = backup
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_path == SCRATCH_PATH)
        .cloned()
        .collect();
    mounts.push(VolumeMount {
        name: API_ACCESS_VOLUME.to_owned(),
        mount_path: API_ACCESS_PATH.to_owned(),
        read_only: Some(true),
        ..Default::default()
    });
    let init = Container {
        name: INIT_CONTAINER.to_owned(),
        args: Some(args.iter().map(|a| (*a).to_owned()).collect()),
        volume_mounts: Some(mounts),
        volume_devices: None,
        env_from: None,
        ..backup
    };
    pod.init_containers = Some(vec![init]);
    pod.volumes
        .get_or_insert_default()
        .push(api_access_volume());
    Ok(job)
}

/// The same files the kubelet mounts for `automountServiceAccountToken`: a bound token, the
/// cluster CA and the namespace.
fn api_access_volume() -> Volume {
    Volume {
        name: API_ACCESS_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".to_owned(),
                        expiration_seconds: Some(API_TOKEN_SECONDS),
                        audience: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "kube-root-ca.crt".to_owned(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".to_owned(),
                            path: "ca.crt".to_owned(),
                            mode: None,
                        }]),
                        optional: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".to_owned(),
                            field_ref: Some(ObjectFieldSelector {
                                api_version: Some("v1".to_owned()),
                                field_path: "metadata.namespace".to_owned(),
                            }),
                            ..Default::default()
                        }]),
                    }),
                    ..Default::default()
                },
            ]),
            default_mode: None,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VolumeKey;
    use crate::datamover::Attach;
    use serde_json::json;

    #[test]
    fn the_init_container_lists_changes_into_the_file_the_backup_reads() {
        let mut spec = DatamoverSpec::new(
            VolumeKey::new("run", "shop", "data"),
            "registry.example/strata:0.1",
            "strata-volume-data-0123",
            Attach::Block,
            "s3://bucket/prefix",
            "shop/data",
        );
        spec.credentials_secret = Some("target-credentials".into());
        let base = ChangedBlocksBase {
            snapshot_handle: "snap-handle-mon".into(),
            backup: "b-mon".into(),
        };
        let job =
            serde_json::to_value(backup_job_with_changed_blocks(&spec, "snap-tue", &base).unwrap())
                .unwrap();
        let pod = &job["spec"]["template"]["spec"];
        let init = &pod["initContainers"][0];
        assert_eq!(
            init["args"],
            json!([
                "strata",
                "changed-blocks",
                "--namespace",
                "shop",
                "--snapshot",
                "snap-tue",
                "--base-snapshot-handle",
                "snap-handle-mon",
                "--output",
                "/scratch/changed-ranges.json",
                "--allow-unavailable"
            ])
        );
        assert_eq!(init["image"], "registry.example/strata:0.1");
        assert_eq!(
            init["volumeMounts"],
            json!([{"name": "scratch", "mountPath": "/scratch"},
                   {"name": "kube-api-access", "mountPath": API_ACCESS_PATH, "readOnly": true}])
        );
        // No volume device and no target credentials in the step that talks to the API.
        assert!(init.get("volumeDevices").is_none());
        assert!(init.get("envFrom").is_none());
        assert_eq!(
            init["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        let backup = &pod["containers"][0];
        assert_eq!(
            backup["args"].as_array().unwrap()[4..],
            [
                json!(format!("--changed-ranges={CHANGED_RANGES_PATH}")),
                json!("--changed-since=b-mon"),
                json!("--"),
                json!("/dev/xvda")
            ]
        );
        assert!(
            backup["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["name"] != API_ACCESS_VOLUME)
        );
        assert_eq!(pod["automountServiceAccountToken"], false);
        let projected = &pod["volumes"][2]["projected"]["sources"];
        assert_eq!(projected[0]["serviceAccountToken"]["path"], "token");
        assert_eq!(projected[1]["configMap"]["name"], "kube-root-ca.crt");
        assert_eq!(
            projected[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        let unknown = ChangedBlocksBase {
            snapshot_handle: String::new(),
            ..base
        };
        assert!(matches!(
            backup_job_with_changed_blocks(&spec, "snap-tue", &unknown),
            Err(Error::Invalid {
                what: "base snapshot handle",
                ..
            })
        ));
    }
}
