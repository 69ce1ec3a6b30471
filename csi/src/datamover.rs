//! Datamover Jobs: a `strata backup` or `strata restore` run inside the cluster, with the volume
//! attached to the pod.
//!
//! The Job runs one pod (`restartPolicy: Never`, a bounded `backoffLimit`) whose container runs
//! `strata backup [--full] --target T --volume NAME [--changed-ranges FILE [--changed-since ID]]
//! PATH` or
//! `strata restore --target T --volume NAME [--backup ID] PATH`, where `PATH` is the device
//! ([`DEVICE_PATH`], when the claim is attached as a raw block device through `volumeDevices`)
//! or the volume's raw image in a filesystem mount ([`MOUNT_FILE`] under [`MOUNT_PATH`]). Target credentials come from a
//! Secret through `envFrom`, so they never appear in the Job spec. The command line is a
//! `strata_datamover::Invocation` ([`invocation`]), the type the `strata` CLI's parser flattens,
//! so the two cannot drift apart unnoticed.
//!
//! # Security context
//!
//! Every container drops all capabilities, forbids privilege escalation, runs with a read-only
//! root filesystem (scratch space is an `emptyDir` at [`SCRATCH_PATH`], also `TMPDIR`) and the
//! `RuntimeDefault` seccomp profile. Filesystem mounts run as a non-root user with `fsGroup`, which
//! the kubelet applies to the volume. Raw block devices are different: the kubelet does not apply
//! `fsGroup` to block devices, and the device node it creates is owned by root with mode 0660, so
//! a non-root user cannot open it. Block datamovers therefore run as uid 0 *without any
//! capability*: opening a root-owned node needs only ownership, not `CAP_DAC_OVERRIDE`. Such a pod
//! satisfies the Pod Security "baseline" level, not "restricted" (which demands `runAsNonRoot`);
//! [`DatamoverSpec::run_as_user`] overrides the choice where a driver sets other ownership.
//!
//! # Scheduling
//!
//! A bound claim's PersistentVolume carries `nodeAffinity` and the scheduler honours it for any
//! pod using the claim, and `WaitForFirstConsumer` claims are provisioned where the pod lands, so
//! no affinity is needed for the volume to attach. [`DatamoverSpec::node_affinity`] exists to pin
//! further ([`pin_to_node`]) or to copy a source volume's topology ([`affinity_of_volume`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    NFSVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PersistentVolume, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretEnvSource, SecurityContext,
    Volume, VolumeDevice, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use strata_datamover::{BackupInvocation, Invocation, RestoreInvocation};

use crate::error::{Error, Result};
use crate::naming::{Role, VolumeKey};

/// Where a raw block volume appears in the datamover container.
pub const DEVICE_PATH: &str = "/dev/xvda";
/// Where a filesystem volume is mounted in the datamover container.
pub const MOUNT_PATH: &str = "/mnt/volume";
/// The file in a filesystem volume holding the volume's data as a raw image: what a backup
/// reads and a restore writes (as `volume.img.partial` beside it until complete, inside the
/// mount, since the container's root filesystem is read-only). A directory is no volume.
pub const MOUNT_FILE: &str = "/mnt/volume/volume.img";
/// Writable scratch space (an `emptyDir`); the root filesystem is read-only.
pub const SCRATCH_PATH: &str = "/scratch";
/// Non-root uid and gid for filesystem datamovers (the conventional "nonroot" id of distroless).
pub const NON_ROOT_ID: i64 = 65532;

const CONTAINER: &str = "datamover";
const DATA_VOLUME: &str = "data";
const SCRATCH_VOLUME: &str = "scratch";
const TARGET_VOLUME: &str = "target";

/// What the datamover does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Read the volume and write a backup to the target.
    Backup {
        /// Take a full base image even when the volume has backups (`--full`).
        full: bool,
        /// File listing the changed ranges, for an incremental backup.
        changed_ranges: Option<String>,
        /// The backup the changed ranges are relative to (`--changed-since`): with it, `strata
        /// backup` compares digests instead when the file is missing or the volume's latest
        /// backup is another.
        changed_since: Option<String>,
    },
    /// Write a backup from the target into the volume.
    Restore {
        /// The backup to restore; the latest when unset.
        backup: Option<String>,
    },
}

/// How the claim is attached to the datamover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// As a raw block device at [`DEVICE_PATH`] (a `volumeMode: Block` claim).
    Block,
    /// As a filesystem mounted at [`MOUNT_PATH`], the volume's data being the raw image file
    /// [`MOUNT_FILE`] in it.
    Filesystem,
}

/// Everything a datamover Job needs.
#[derive(Clone, Debug)]
pub struct DatamoverSpec {
    /// The volume being moved; names and labels the Job.
    pub key: VolumeKey,
    /// Container image with the `strata` binary.
    pub image: String,
    /// The claim to attach (for a backup, the PVC made from the snapshot).
    pub claim: String,
    /// How the claim is attached.
    pub attach: Attach,
    /// `--target`: the backup target URL.
    pub target: String,
    /// `--volume`: the volume's name in the target.
    pub volume: String,
    /// Secret whose keys become the container's environment (target credentials).
    pub credentials_secret: Option<String>,
    /// CPU and memory requests and limits.
    pub resources: ResourceRequirements,
    /// Extra node affinity; see the module docs on scheduling.
    pub node_affinity: Option<NodeAffinity>,
    /// Service account of the pod; the namespace default when unset.
    pub service_account: Option<String>,
    /// Uid to run as; defaults per [`Attach`] as the module docs explain.
    pub run_as_user: Option<i64>,
    /// Retries of a failed pod.
    pub backoff_limit: i32,
    /// Upper bound on the Job's run time, in seconds.
    pub active_deadline_seconds: Option<i64>,
    /// For a folder target: the NFS export mounted at the target's path.
    pub target_mount: Option<TargetMount>,
}

/// An NFS export the datamover mounts where its folder target is (`path` is the `--target`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetMount {
    /// NFS server.
    pub server: String,
    /// The exported path.
    pub export: String,
    /// Where the pod sees it: the target folder.
    pub path: String,
}

impl DatamoverSpec {
    /// A spec with default resources (250m CPU and 256Mi requested, 1Gi memory limit), three
    /// retries, no deadline, no credentials and no extra affinity.
    pub fn new(
        key: VolumeKey,
        image: impl Into<String>,
        claim: impl Into<String>,
        attach: Attach,
        target: impl Into<String>,
        volume: impl Into<String>,
    ) -> Self {
        DatamoverSpec {
            key,
            image: image.into(),
            claim: claim.into(),
            attach,
            target: target.into(),
            volume: volume.into(),
            credentials_secret: None,
            resources: ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_owned(), Quantity("250m".to_owned())),
                    ("memory".to_owned(), Quantity("256Mi".to_owned())),
                ])),
                limits: Some(BTreeMap::from([(
                    "memory".to_owned(),
                    Quantity("1Gi".to_owned()),
                )])),
                ..Default::default()
            },
            node_affinity: None,
            service_account: None,
            run_as_user: None,
            backoff_limit: 3,
            active_deadline_seconds: None,
            target_mount: None,
        }
    }
}

/// Exit code of a `strata` command line that does not parse (clap's usage error): the image's
/// CLI does not match the controller's, so a retry cannot help.
pub const USAGE_EXIT_CODE: i32 = 2;

/// The Job's `podFailurePolicy` (batch/v1, Kubernetes docs "Jobs", "Pod failure policy"; it
/// needs `restartPolicy: Never`, which the pod has). Rules apply in order:
///
/// 1. `Ignore` a pod failed with the `DisruptionTarget` condition (node loss or drain,
///    preemption, eviction): not the datamover's fault, so it does not count against
///    `backoffLimit`, and the replacement takes over the dead writer's claim.
/// 2. `FailJob` on [`USAGE_EXIT_CODE`]: the command line itself is wrong.
///
/// Every other failure (exit 1, an OOM kill's 137) counts against `backoffLimit`.
pub fn pod_failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "Ignore".to_owned(),
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".to_owned(),
                    status: "True".to_owned(),
                }]),
                on_exit_codes: None,
            },
            PodFailurePolicyRule {
                action: "FailJob".to_owned(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(CONTAINER.to_owned()),
                    operator: "In".to_owned(),
                    values: vec![USAGE_EXIT_CODE],
                }),
                on_pod_conditions: None,
            },
        ],
    }
}

/// The `strata` invocation for `step` (the typed command line the CLI parses, see
/// `strata_datamover`).
pub fn invocation(spec: &DatamoverSpec, step: &Step) -> Invocation {
    let path = match spec.attach {
        Attach::Block => DEVICE_PATH,
        Attach::Filesystem => MOUNT_FILE,
    };
    match step {
        Step::Backup {
            full,
            changed_ranges,
            changed_since,
        } => Invocation::Backup(BackupInvocation {
            target: spec.target.clone(),
            volume: spec.volume.clone(),
            changed_ranges: changed_ranges.as_ref().map(PathBuf::from),
            changed_since: changed_since.clone(),
            full: *full,
            source: path.into(),
        }),
        Step::Restore { backup } => Invocation::Restore(RestoreInvocation {
            target: spec.target.clone(),
            volume: spec.volume.clone(),
            backup: backup.clone(),
            dest: path.into(),
        }),
    }
}

/// The `strata` command line for `step`.
pub fn command_line(spec: &DatamoverSpec, step: &Step) -> Vec<String> {
    invocation(spec, step).args()
}

/// Affinity pinning a pod to node `node` (by `metadata.name`, which needs no node label).
pub fn pin_to_node(node: &str) -> NodeAffinity {
    NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_fields: Some(vec![NodeSelectorRequirement {
                    key: "metadata.name".to_owned(),
                    operator: "In".to_owned(),
                    values: Some(vec![node.to_owned()]),
                }]),
                ..Default::default()
            }],
        }),
        ..Default::default()
    }
}

/// The nodes a PersistentVolume can attach to (its `spec.nodeAffinity.required`) as pod affinity;
/// `None` when the volume attaches anywhere.
pub fn affinity_of_volume(pv: &PersistentVolume) -> Option<NodeAffinity> {
    let required = pv.spec.as_ref()?.node_affinity.as_ref()?.required.clone()?;
    Some(NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(required),
        ..Default::default()
    })
}

/// The backup Job (an incremental on the volume's latest backup, or a full one when it has
/// none); `changed_ranges` is the file listing the changes, else digests are compared.
pub fn backup_job(spec: &DatamoverSpec, changed_ranges: Option<&str>) -> Result<Job> {
    job(
        spec,
        &Step::Backup {
            full: false,
            changed_ranges: changed_ranges.map(str::to_owned),
            changed_since: None,
        },
    )
}

/// The restore Job.
pub fn restore_job(spec: &DatamoverSpec, backup: Option<&str>) -> Result<Job> {
    job(
        spec,
        &Step::Restore {
            backup: backup.map(str::to_owned),
        },
    )
}

/// The Job running `step` on `spec`'s volume.
pub fn job(spec: &DatamoverSpec, step: &Step) -> Result<Job> {
    for (what, value) in [
        ("image", &spec.image),
        ("claim", &spec.claim),
        ("target", &spec.target),
        ("volume", &spec.volume),
    ] {
        if value.is_empty() {
            return Err(Error::Invalid {
                what,
                reason: "must not be empty".to_owned(),
            });
        }
    }
    let read_only = matches!(step, Step::Backup { .. });
    let run_as_user = spec.run_as_user.unwrap_or(match spec.attach {
        Attach::Block => 0,
        Attach::Filesystem => NON_ROOT_ID,
    });
    let (volume_devices, mut volume_mounts) = match spec.attach {
        Attach::Block => (
            Some(vec![VolumeDevice {
                name: DATA_VOLUME.to_owned(),
                device_path: DEVICE_PATH.to_owned(),
            }]),
            vec![],
        ),
        Attach::Filesystem => (
            None,
            vec![VolumeMount {
                name: DATA_VOLUME.to_owned(),
                mount_path: MOUNT_PATH.to_owned(),
                read_only: Some(read_only),
                ..Default::default()
            }],
        ),
    };
    volume_mounts.push(VolumeMount {
        name: SCRATCH_VOLUME.to_owned(),
        mount_path: SCRATCH_PATH.to_owned(),
        ..Default::default()
    });
    if let Some(mount) = &spec.target_mount {
        // Read-write for a restore too, though it reads only backups: it records itself as a
        // reader of the volume (`strata_target::ReadLease`), so that a prune's fold does not
        // have what it reads collected under it, and it marks a backup it finds damaged.
        // Mounted read-only, every in-cluster restore read unrecorded.
        volume_mounts.push(VolumeMount {
            name: TARGET_VOLUME.to_owned(),
            mount_path: mount.path.clone(),
            read_only: Some(false),
            ..Default::default()
        });
    }
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(spec.image.clone()),
        args: Some(command_line(spec, step)),
        env: Some(vec![EnvVar {
            name: "TMPDIR".to_owned(),
            value: Some(SCRATCH_PATH.to_owned()),
            ..Default::default()
        }]),
        env_from: spec.credentials_secret.as_ref().map(|secret| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }]
        }),
        resources: Some(spec.resources.clone()),
        volume_devices,
        volume_mounts: Some(volume_mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let labels = spec.key.labels(Role::Datamover);
    let pod = PodSpec {
        restart_policy: Some("Never".to_owned()),
        service_account_name: spec.service_account.clone(),
        automount_service_account_token: Some(false),
        containers: vec![container],
        volumes: Some(
            vec![
                Volume {
                    name: DATA_VOLUME.to_owned(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: spec.claim.clone(),
                        read_only: Some(read_only),
                    }),
                    ..Default::default()
                },
                Volume {
                    name: SCRATCH_VOLUME.to_owned(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(spec.target_mount.as_ref().map(|mount| Volume {
                name: TARGET_VOLUME.to_owned(),
                nfs: Some(NFSVolumeSource {
                    server: mount.server.clone(),
                    path: mount.export.clone(),
                    read_only: None,
                }),
                ..Default::default()
            }))
            .collect(),
        ),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(run_as_user != 0),
            run_as_user: Some(run_as_user),
            run_as_group: Some(if run_as_user == 0 { 0 } else { NON_ROOT_ID }),
            fs_group: (spec.attach == Attach::Filesystem).then_some(NON_ROOT_ID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        affinity: spec.node_affinity.clone().map(|node_affinity| Affinity {
            node_affinity: Some(node_affinity),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(spec.key.name(Role::Datamover)),
            namespace: Some(spec.key.namespace.clone()),
            labels: Some(labels.clone()),
            owner_references: spec.key.owner_references(),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(spec.backoff_limit),
            active_deadline_seconds: spec.active_deadline_seconds,
            pod_failure_policy: Some(pod_failure_policy()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn a_folder_targets_nfs_export_is_mounted_at_its_path_writable_for_restores_too() {
        let mut spec = spec(Attach::Block);
        spec.target = "/targets/nas".into();
        spec.target_mount = Some(TargetMount {
            server: "nas.example".into(),
            export: "/exports/strata".into(),
            path: "/targets/nas".into(),
        });
        // A restore records itself as a reader on the target, and marks damage it finds.
        for (job, read_only) in [
            (backup_job(&spec, None).unwrap(), false),
            (restore_job(&spec, None).unwrap(), false),
        ] {
            let job = serde_json::to_value(job).unwrap();
            let pod = &job["spec"]["template"]["spec"];
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == TARGET_VOLUME)
                .unwrap();
            assert_eq!(
                volume["nfs"],
                json!({"server": "nas.example", "path": "/exports/strata"})
            );
            let mount = pod["containers"][0]["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == TARGET_VOLUME)
                .unwrap();
            assert_eq!(mount["mountPath"], "/targets/nas");
            assert_eq!(mount["readOnly"], read_only);
        }
    }

    fn spec(attach: Attach) -> DatamoverSpec {
        let mut spec = DatamoverSpec::new(
            VolumeKey::new("run", "shop", "data"),
            "registry.example/strata:0.1",
            "strata-volume-data-0123",
            attach,
            "s3://bucket/prefix",
            "shop/data",
        );
        spec.credentials_secret = Some("target-credentials".into());
        spec
    }

    fn value(job: &Job) -> Value {
        serde_json::to_value(job).unwrap()
    }

    #[test]
    fn backup_command_lines() {
        let block = spec(Attach::Block);
        assert_eq!(
            command_line(
                &block,
                &Step::Backup {
                    full: false,
                    changed_ranges: Some("/scratch/ranges".into()),
                    changed_since: Some("b-6".into()),
                }
            ),
            [
                "strata",
                "backup",
                "--target=s3://bucket/prefix",
                "--volume=shop/data",
                "--changed-ranges=/scratch/ranges",
                "--changed-since=b-6",
                "--",
                "/dev/xvda"
            ]
        );
        assert_eq!(
            command_line(
                &block,
                &Step::Backup {
                    full: true,
                    changed_ranges: None,
                    changed_since: None,
                }
            )[..3],
            ["strata", "backup", "--full"]
        );
        assert_eq!(
            command_line(&spec(Attach::Filesystem), &Step::Restore { backup: None }),
            [
                "strata",
                "restore",
                "--target=s3://bucket/prefix",
                "--volume=shop/data",
                "--",
                "/mnt/volume/volume.img"
            ]
        );
        assert_eq!(
            command_line(
                &block,
                &Step::Restore {
                    backup: Some("b-7".into())
                }
            )[4..],
            ["--backup=b-7", "--", "/dev/xvda"]
        );
    }

    #[test]
    fn block_backup_job_attaches_a_read_only_device_as_capabilityless_root() {
        let job = value(&backup_job(&spec(Attach::Block), None).unwrap());
        assert_eq!(
            job["metadata"]["name"],
            VolumeKey::new("run", "shop", "data").name(Role::Datamover)
        );
        assert_eq!(job["metadata"]["namespace"], "shop");
        assert_eq!(job["spec"]["backoffLimit"], 3);
        let rules = &job["spec"]["podFailurePolicy"]["rules"];
        assert_eq!(rules[0]["action"], "Ignore");
        assert_eq!(rules[0]["onPodConditions"][0]["type"], "DisruptionTarget");
        assert_eq!(rules[1]["action"], "FailJob");
        assert_eq!(rules[1]["onExitCodes"]["values"], json!([USAGE_EXIT_CODE]));
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(
            job["spec"]["template"]["metadata"]["labels"]["strata.io/role"],
            "datamover"
        );
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(
            pod["securityContext"],
            json!({"runAsNonRoot": false, "runAsUser": 0, "runAsGroup": 0, "seccompProfile": {"type": "RuntimeDefault"}})
        );
        assert_eq!(
            pod["volumes"][0],
            json!({"name": "data", "persistentVolumeClaim": {"claimName": "strata-volume-data-0123", "readOnly": true}})
        );
        assert_eq!(
            pod["volumes"][1],
            json!({"name": "scratch", "emptyDir": {}})
        );
        let c = &pod["containers"][0];
        assert_eq!(
            c["volumeDevices"],
            json!([{"name": "data", "devicePath": "/dev/xvda"}])
        );
        assert_eq!(
            c["volumeMounts"],
            json!([{"name": "scratch", "mountPath": "/scratch"}])
        );
        assert_eq!(
            c["securityContext"],
            json!({"allowPrivilegeEscalation": false, "privileged": false, "readOnlyRootFilesystem": true,
                   "capabilities": {"drop": ["ALL"]}})
        );
        assert_eq!(
            c["envFrom"],
            json!([{"secretRef": {"name": "target-credentials", "optional": false}}])
        );
        assert_eq!(c["env"], json!([{"name": "TMPDIR", "value": "/scratch"}]));
        assert_eq!(
            c["resources"]["requests"],
            json!({"cpu": "250m", "memory": "256Mi"})
        );
        assert_eq!(c["args"][1], "backup");
        assert!(pod.get("affinity").is_none());
    }

    #[test]
    fn filesystem_restore_job_mounts_writable_as_non_root_with_fs_group() {
        let mut s = spec(Attach::Filesystem);
        s.node_affinity = Some(pin_to_node("worker-2"));
        s.active_deadline_seconds = Some(3600);
        let job = value(&restore_job(&s, Some("b-7")).unwrap());
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(job["spec"]["activeDeadlineSeconds"], 3600);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], NON_ROOT_ID);
        assert_eq!(pod["securityContext"]["fsGroup"], NON_ROOT_ID);
        assert_eq!(
            pod["volumes"][0]["persistentVolumeClaim"]["readOnly"],
            false
        );
        let c = &pod["containers"][0];
        assert!(c.get("volumeDevices").is_none());
        assert_eq!(
            c["volumeMounts"][0],
            json!({"name": "data", "mountPath": "/mnt/volume", "readOnly": false})
        );
        assert_eq!(
            c["args"].as_array().unwrap().last().unwrap(),
            "/mnt/volume/volume.img"
        );
        assert_eq!(
            pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                [0]["matchFields"],
            json!([{"key": "metadata.name", "operator": "In", "values": ["worker-2"]}])
        );
    }

    #[test]
    fn volume_topology_becomes_required_affinity() {
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": "pv-1"},
            "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["eu-west-1a"]}]}]}}}
        }))
        .unwrap();
        let affinity = serde_json::to_value(affinity_of_volume(&pv).unwrap()).unwrap();
        assert_eq!(
            affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
                [0]["values"],
            json!(["eu-west-1a"])
        );
        assert!(affinity_of_volume(&PersistentVolume::default()).is_none());
    }

    #[test]
    fn empty_fields_are_refused_and_run_as_user_overrides() {
        let mut s = spec(Attach::Block);
        s.target.clear();
        assert!(matches!(
            backup_job(&s, None),
            Err(Error::Invalid { what: "target", .. })
        ));
        let mut s = spec(Attach::Block);
        s.run_as_user = Some(1000);
        let job = value(&backup_job(&s, None).unwrap());
        assert_eq!(
            job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
            true
        );
        assert_eq!(
            job["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
            1000
        );
    }
}
