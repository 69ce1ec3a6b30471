//! A cluster simulator for the operator tests: the in-memory API server ([`Mock`]) plus the
//! behaviour of the components the operator relies on, each written from its documentation:
//!
//! - a **snapshot controller** (external-snapshotter; Kubernetes docs "Volume Snapshots"):
//!   binds a VolumeSnapshot to a new VolumeSnapshotContent and sets `readyToUse` after a delay,
//!   posts transient `status.error`s that it clears on a later retry, or a permanent one;
//! - a **provisioner** (docs "Persistent Volumes", "Volume snapshot and restore volume from
//!   snapshot"; KEP-3141 "Prevent unauthorised volume mode conversion"): binds a claim made from
//!   a ready snapshot to a new PersistentVolume holding a copy of the snapshot's data, refuses a
//!   volume-mode change unless the content carries
//!   `snapshot.storage.kubernetes.io/allow-volume-mode-change: "true"`, and binds
//!   `WaitForFirstConsumer` claims only once a pod uses them;
//! - a **Job controller** (docs "Jobs": pod backoff failure policy, `backoffLimit`,
//!   `activeDeadlineSeconds`, "Handling Pod and container failures" / `podFailurePolicy`):
//!   creates a pod from the template through **admission** (the ServiceAccount admission
//!   plugin refuses a pod whose ServiceAccount is missing; Pod Security admission, docs "Pod
//!   Security Standards", refuses what the namespace's `enforce` level forbids), recording a
//!   `FailedCreate` Event when refused; counts failed pods against `backoffLimit`, applies
//!   `podFailurePolicy` rules on exit codes and the `DisruptionTarget` condition, and fails the
//!   Job with `DeadlineExceeded` past its deadline;
//! - a **scheduler** (docs "Assigning Pods to Nodes": required node affinity, `matchExpressions`
//!   on node labels and `matchFields` on `metadata.name`, terms ORed): binds a pod to the node
//!   its affinity allows that runs the fewest pods (ties by name), or leaves it Pending and
//!   Unschedulable when none does; the cluster starts with node `node-1` ([`Sim::add_node`]);
//! - a **kubelet** (docs "Pod Lifecycle", "Images", "Configure a Pod to use a ConfigMap/Secret"):
//!   leaves a pod Pending and Unschedulable while a claim it uses is missing or unbound, in
//!   `ErrImagePull` for an image the registry lacks, in `CreateContainerConfigError` for a
//!   missing Secret; otherwise it runs the container's `strata` command for real, with the
//!   volume's device path mapped onto a file standing in for the device, and reports the exit.
//!
//! Faults are injected per datamover pod (a crash point for the `strata` process: its SIGKILL is
//! an OOM kill) and per snapshot (transient or permanent errors); [`Sim::lose_node`] kills a
//! running pod as a node loss does (`DisruptionTarget`). Time is the simulator's own clock
//! ([`Sim::advance`]) for the Job deadline; the operator's bounded waits take their timeouts from
//! its `Context`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

use crate::kube_mock::Mock;

pub const DRIVER: &str = "hostpath.csi.k8s.io";
pub const IMAGE: &str = "registry.example/strata:test";
const SNAPSHOTS: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces";
const CONTENTS: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";
const PVS: &str = "/api/v1/persistentvolumes";
const ALLOW_MODE_CHANGE: &str = "snapshot.storage.kubernetes.io/allow-volume-mode-change";

/// A fault for one snapshot, by its name.
#[derive(Clone, Debug)]
pub enum SnapshotFault {
    /// `status.error` for this many rounds, then cleared and the snapshot made.
    Transient(u32, String),
    /// `status.error` that never clears.
    Permanent(String),
}

/// How a datamover pod's process is made to end early.
#[derive(Clone, Debug)]
pub enum PodFault {
    /// The `strata` process SIGKILLs itself at this crash point (strata-target's failpoints);
    /// the kubelet reports the container `OOMKilled` with exit code 137.
    OomAt(&'static str),
    /// The process stops (SIGSTOP) at this crash point: a frozen node, a hung device.
    FreezeAt(&'static str),
}

struct Running {
    child: Child,
    oom: bool,
    /// The node it runs on.
    node: String,
}

#[derive(Default)]
struct State {
    /// Seconds since the simulation started.
    now: u64,
    /// Rounds each snapshot has been seen, by path.
    snapshot_rounds: BTreeMap<String, u32>,
    snapshot_faults: BTreeMap<String, SnapshotFault>,
    pod_faults: VecDeque<PodFault>,
    running: BTreeMap<String, Running>,
    /// Job path → seconds at which it was first seen (its `status.startTime`).
    job_started: BTreeMap<String, u64>,
    next_pod: u64,
    next_event: u64,
    /// Pods the garbage collector deleted, as they were.
    deleted_pods: BTreeMap<String, Value>,
    /// The most pods seen running on one node at once (sampled every kubelet round).
    most_on_a_node: usize,
}

impl Drop for State {
    fn drop(&mut self) {
        for running in self.running.values_mut() {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }
}

/// The simulated cluster. Cloning shares it.
#[derive(Clone)]
pub struct Sim {
    pub mock: Mock,
    dir: Arc<tempfile::TempDir>,
    /// Images the registry has.
    pub images: Arc<Mutex<BTreeSet<String>>>,
    state: Arc<Mutex<State>>,
}

fn ns_of(path: &str) -> &str {
    path.split("/namespaces/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
}

fn name_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or_default()
}

/// Whether `path` is an object directly in collection `resource` of some namespace
/// (`/.../namespaces/N/resource/NAME`).
fn is_a(path: &str, resource: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    parts.len() >= 3 && parts[parts.len() - 2] == resource && parts[parts.len() - 4] == "namespaces"
}

fn rfc3339_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Namespace `shop` (Pod Security `namespace_labels`) holding Block PVC `data` (class `fast`
/// of the hostpath driver, labelled `app=db`) on a device holding `contents`; a snapshot class;
/// Target `local` on the folder `target` of the returned directory; Backup `nightly` (Full) of
/// `app=db`.
pub fn shop_cluster(namespace_labels: Value, contents: &[u8]) -> (Sim, tempfile::TempDir) {
    shop_cluster_of_class(namespace_labels, contents, Some("fast"))
}

/// [`shop_cluster`] with PVC `data` of StorageClass `class` (`None`: a claim without one).
pub fn shop_cluster_of_class(
    namespace_labels: Value,
    contents: &[u8],
    class: Option<&str>,
) -> (Sim, tempfile::TempDir) {
    let sim = Sim::new();
    sim.add_namespace("shop", namespace_labels);
    sim.add_storage_class("fast", DRIVER, "Immediate");
    sim.add_snapshot_class("csi-hostpath-snapclass", DRIVER);
    sim.add_volume(
        "shop",
        "data",
        json!({"app": "db"}),
        class,
        DRIVER,
        contents,
    );
    let folder = tempfile::tempdir().expect("temp dir");
    sim.mock
        .put_snapshot_class_target_and_backup(&folder.path().join("target"));
    (sim, folder)
}

/// Backup `id` of `volume` in folder target `target`, restored with `strata restore` into a
/// file beside the target and read back.
pub fn restore_from(target: &std::path::Path, volume: &str, id: &str) -> Vec<u8> {
    let out = target.with_file_name(format!("restored-{volume}-{id}.raw"));
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "restore",
            "--target",
            target.to_str().unwrap(),
            "--volume",
            volume,
        ])
        .args(["--backup", id, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::read(out).unwrap()
}

impl Sim {
    /// Secret `target-credentials` of `shop` holding `data`, named by Target `local`.
    pub fn give_target_credentials(&self, data: Value) {
        self.mock.put(
            "/api/v1/namespaces/shop/secrets/target-credentials",
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "target-credentials", "namespace": "shop"},
                   "data": data}),
        );
        let target = "/apis/strata.io/v1alpha1/namespaces/shop/targets/local";
        let mut spec = self.mock.get(target).expect("Target local");
        spec["spec"]["credentialsSecretRef"] = json!({"name": "target-credentials"});
        self.mock.put(target, spec);
    }

    /// A cluster of one node, `node-1`, whose registry holds [`IMAGE`].
    pub fn new() -> Self {
        let sim = Sim {
            mock: Mock::default(),
            dir: Arc::new(tempfile::tempdir().expect("temp dir")),
            images: Arc::new(Mutex::new(BTreeSet::from([IMAGE.to_owned()]))),
            state: Arc::default(),
        };
        sim.add_node("node-1");
        sim
    }

    /// Node `name`, its `kubernetes.io/hostname` label the same.
    pub fn add_node(&self, name: &str) {
        self.mock.put(
            &format!("/api/v1/nodes/{name}"),
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                   "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
    }

    /// The most pods that ran on one node at once so far.
    pub fn most_pods_on_a_node(&self) -> usize {
        self.state.lock().unwrap().most_on_a_node
    }

    /// Paths of the stored objects of namespaced `resource` (`pods`, `jobs`, ...).
    fn objects(&self, resource: &str) -> Vec<String> {
        self.mock
            .paths()
            .into_iter()
            .filter(|p| is_a(p, resource))
            .collect()
    }

    /// A file under the simulator's folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The file standing in for PersistentVolume `pv`'s device.
    pub fn device_of_pv(&self, pv: &str) -> PathBuf {
        self.file(&format!("pv-{pv}.img"))
    }

    /// The device file of claim `namespace/name` (through its bound PV).
    pub fn device_of_claim(&self, namespace: &str, name: &str) -> Option<PathBuf> {
        let pvc = self.mock.get(&format!(
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"
        ))?;
        let pv = pvc["spec"]["volumeName"].as_str()?;
        Some(self.device_of_pv(pv))
    }

    /// A bound claim `namespace/name` of `class` (none when `None`) and `mode` on a PV of
    /// `driver` whose device holds `data`.
    pub fn add_volume(
        &self,
        namespace: &str,
        name: &str,
        labels: Value,
        class: Option<&str>,
        driver: &str,
        data: &[u8],
    ) {
        let pv = format!("pv-{namespace}-{name}");
        std::fs::write(self.device_of_pv(&pv), data).expect("write device");
        let size = data.len().to_string();
        let mut spec = json!({"volumeMode": "Block", "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": size}}, "volumeName": pv});
        if let Some(class) = class {
            spec["storageClassName"] = json!(class);
        }
        self.mock.put(
            &format!("/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"),
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": name, "namespace": namespace, "labels": labels,
                                "uid": format!("uid-pvc-{name}")},
                   "spec": spec,
                   "status": {"phase": "Bound", "capacity": {"storage": size}}}),
        );
        self.mock.put(
            &format!("{PVS}/{pv}"),
            json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                   "spec": {"capacity": {"storage": size}, "volumeMode": "Block",
                            "csi": {"driver": driver, "volumeHandle": format!("handle-{pv}")},
                            "claimRef": {"namespace": namespace, "name": name}},
                   "status": {"phase": "Bound"}}),
        );
    }

    /// StorageClass `name` of `provisioner`, binding `Immediate` or `WaitForFirstConsumer`.
    pub fn add_storage_class(&self, name: &str, provisioner: &str, binding: &str) {
        self.mock.put(
            &format!("/apis/storage.k8s.io/v1/storageclasses/{name}"),
            json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                   "metadata": {"name": name}, "provisioner": provisioner,
                   "volumeBindingMode": binding}),
        );
    }

    /// VolumeSnapshotClass `name` of `driver`.
    pub fn add_snapshot_class(&self, name: &str, driver: &str) {
        self.mock.put(
            &format!("/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses/{name}"),
            json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
                   "metadata": {"name": name}, "driver": driver, "deletionPolicy": "Delete"}),
        );
    }

    /// Namespace `name` with `labels` (e.g. a Pod Security `enforce` level) and its `default`
    /// ServiceAccount.
    pub fn add_namespace(&self, name: &str, labels: Value) {
        self.mock.put(
            &format!("/api/v1/namespaces/{name}"),
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": name, "labels": labels}}),
        );
        self.add_service_account(name, "default");
    }

    pub fn add_service_account(&self, namespace: &str, name: &str) {
        self.mock.put(
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": name, "namespace": namespace}}),
        );
    }

    /// The next datamover pods to start end with these faults, one each, in order.
    pub fn inject_pod_fault(&self, fault: PodFault) {
        self.state.lock().unwrap().pod_faults.push_back(fault);
    }

    /// Snapshot `namespace/name` fails as `fault` says.
    pub fn inject_snapshot_fault(&self, namespace: &str, name: &str, fault: SnapshotFault) {
        self.state.lock().unwrap().snapshot_faults.insert(
            format!("{SNAPSHOTS}/{namespace}/volumesnapshots/{name}"),
            fault,
        );
    }

    /// Move the simulator's clock on (the Job controller's deadlines read it).
    pub fn advance(&self, seconds: u64) {
        self.state.lock().unwrap().now += seconds;
    }

    /// Pods (paths) of Job `namespace/job`.
    pub fn pods_of(&self, namespace: &str, job: &str) -> Vec<String> {
        let prefix = format!("/api/v1/namespaces/{namespace}/pods/");
        self.mock
            .paths()
            .into_iter()
            .filter(|p| p.starts_with(&prefix))
            .filter(|p| {
                self.mock.get(p).is_some_and(|pod| {
                    pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] == job
                })
            })
            .collect()
    }

    /// Events recorded for object `name` in `namespace`: (reason, message).
    pub fn events_for(&self, namespace: &str, name: &str) -> Vec<(String, String)> {
        let prefixes = [
            format!("/api/v1/namespaces/{namespace}/events/"),
            format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events/"),
        ];
        self.mock
            .paths()
            .into_iter()
            .filter(|p| prefixes.iter().any(|prefix| p.starts_with(prefix)))
            .filter_map(|p| self.mock.get(&p))
            .filter(|e| e["involvedObject"]["name"] == name || e["regarding"]["name"] == name)
            .map(|e| {
                let message = e["message"].as_str().or(e["note"].as_str());
                (
                    e["reason"].as_str().unwrap_or_default().to_owned(),
                    message.unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// One round of every simulated component; running pods get up to `wait` to finish.
    pub async fn step(&self, wait: Duration) {
        self.service_account_controller();
        self.snapshot_controller();
        self.provisioner();
        self.job_controller();
        self.kubelet(wait).await;
        // A pod that ended this round is counted by the Job controller at once, as the real
        // one reacts to the pod's update.
        self.job_controller();
    }

    /// The ServiceAccount controller (docs "Service Accounts"): every namespace has a
    /// `default` ServiceAccount.
    fn service_account_controller(&self) {
        let namespaces: Vec<String> = self
            .mock
            .paths()
            .into_iter()
            .filter(|p| p.starts_with("/api/v1/namespaces/") && p.matches('/').count() == 4)
            .collect();
        for path in namespaces {
            let account = format!("{path}/serviceaccounts/default");
            if self.mock.get(&account).is_none() {
                self.add_service_account(name_of(&path), "default");
            }
        }
    }

    // --- snapshot controller ----------------------------------------------------------------

    fn snapshot_controller(&self) {
        let paths: Vec<String> = self
            .mock
            .paths()
            .into_iter()
            .filter(|p| p.starts_with(SNAPSHOTS) && is_a(p, "volumesnapshots"))
            .collect();
        for path in paths {
            let Some(mut snapshot) = self.mock.get(&path) else {
                continue;
            };
            if snapshot["status"]["readyToUse"] == true {
                continue;
            }
            let rounds = {
                let mut state = self.state.lock().unwrap();
                let rounds = state.snapshot_rounds.entry(path.clone()).or_default();
                *rounds += 1;
                *rounds
            };
            let fault = self
                .state
                .lock()
                .unwrap()
                .snapshot_faults
                .get(&path)
                .cloned();
            let error = match fault {
                Some(SnapshotFault::Transient(n, message)) if rounds <= n => Some(message),
                Some(SnapshotFault::Permanent(message)) => Some(message),
                _ => None,
            };
            if let Some(message) = error {
                snapshot["status"] = json!({"readyToUse": false,
                    "error": {"message": message, "time": rfc3339_now()}});
                self.mock.put(&path, snapshot);
                continue;
            }
            let namespace = ns_of(&path).to_owned();
            let source = snapshot["spec"]["source"]["persistentVolumeClaimName"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let Some(pvc) = self.mock.get(&format!(
                "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{source}"
            )) else {
                snapshot["status"] = json!({"readyToUse": false, "error": {
                    "message": format!("failed to get input parameters to create snapshot: \
                                        persistentvolumeclaim {source:?} not found"),
                    "time": rfc3339_now()}});
                self.mock.put(&path, snapshot);
                continue;
            };
            let pv = pvc["spec"]["volumeName"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let Some(volume) = self.mock.get(&format!("{PVS}/{pv}")) else {
                continue;
            };
            let class_name = snapshot["spec"]["volumeSnapshotClassName"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let class = self.mock.get(&format!(
                "/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses/{class_name}"
            ));
            let driver = volume["spec"]["csi"]["driver"].clone();
            if class.as_ref().map(|c| &c["driver"]) != Some(&driver) {
                snapshot["status"] = json!({"readyToUse": false, "error": {
                    "message": format!("VolumeSnapshotClass {class_name:?} is missing or not \
                                        of the volume's driver {driver}"),
                    "time": rfc3339_now()}});
                self.mock.put(&path, snapshot);
                continue;
            }
            let content = format!(
                "snapcontent-{}",
                snapshot["metadata"]["uid"].as_str().unwrap_or("x")
            );
            std::fs::copy(self.device_of_pv(&pv), self.file(&format!("{content}.img")))
                .expect("copy the snapshot's data");
            let size = pvc["status"]["capacity"]["storage"].clone();
            self.mock.put(
                &format!("{CONTENTS}/{content}"),
                json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
                       "metadata": {"name": content},
                       "spec": {"volumeSnapshotRef": {"name": name_of(&path), "namespace": namespace},
                                "deletionPolicy": "Delete", "driver": driver,
                                "sourceVolumeMode": pvc["spec"]["volumeMode"],
                                "volumeSnapshotClassName": class_name,
                                "source": {"volumeHandle": volume["spec"]["csi"]["volumeHandle"]}},
                       "status": {"readyToUse": true, "snapshotHandle": format!("snap-{content}"),
                                  "restoreSize": size_bytes(&size)}}),
            );
            snapshot["status"] = json!({"readyToUse": true, "boundVolumeSnapshotContentName": content,
                "restoreSize": size, "creationTime": rfc3339_now()});
            self.mock.put(&path, snapshot);
        }
    }

    // --- provisioner ------------------------------------------------------------------------

    fn provisioner(&self) {
        let paths: Vec<String> = self.objects("persistentvolumeclaims");
        for path in paths {
            let Some(mut pvc) = self.mock.get(&path) else {
                continue;
            };
            if pvc["status"]["phase"] == "Bound" {
                continue;
            }
            let namespace = ns_of(&path).to_owned();
            let name = name_of(&path).to_owned();
            let class = pvc["spec"]["storageClassName"].as_str().unwrap_or_default();
            let Some(storage_class) = self
                .mock
                .get(&format!("/apis/storage.k8s.io/v1/storageclasses/{class}"))
            else {
                continue;
            };
            if storage_class["volumeBindingMode"] == "WaitForFirstConsumer"
                && !self.used_by_a_pod(&namespace, &name)
            {
                continue;
            }
            let source = &pvc["spec"]["dataSource"];
            let data = if source["kind"] == "VolumeSnapshot" {
                let snapshot = self.mock.get(&format!(
                    "{SNAPSHOTS}/{namespace}/volumesnapshots/{}",
                    source["name"].as_str().unwrap_or_default()
                ));
                let Some(content) = snapshot
                    .filter(|s| s["status"]["readyToUse"] == true)
                    .and_then(|s| {
                        s["status"]["boundVolumeSnapshotContentName"]
                            .as_str()
                            .map(str::to_owned)
                    })
                else {
                    continue;
                };
                let Some(content_object) = self.mock.get(&format!("{CONTENTS}/{content}")) else {
                    continue;
                };
                let wanted = pvc["spec"]["volumeMode"].as_str().unwrap_or("Filesystem");
                let had = content_object["spec"]["sourceVolumeMode"]
                    .as_str()
                    .unwrap_or("Filesystem");
                let allowed =
                    content_object["metadata"]["annotations"][ALLOW_MODE_CHANGE] == "true";
                if wanted != had && !allowed {
                    // KEP-3141: the provisioner refuses and retries; the claim stays Pending.
                    self.event(
                        &namespace,
                        "PersistentVolumeClaim",
                        &name,
                        "ProvisioningFailed",
                        &format!(
                            "requested volume mode {wanted} differs from the snapshot's \
                                  {had} and the content lacks {ALLOW_MODE_CHANGE}"
                        ),
                    );
                    continue;
                }
                std::fs::read(self.file(&format!("{content}.img"))).expect("snapshot data")
            } else {
                let size = size_bytes(&pvc["spec"]["resources"]["requests"]["storage"]);
                vec![0; usize::try_from(size).unwrap_or(0)]
            };
            let pv = format!("pvc-{}", pvc["metadata"]["uid"].as_str().unwrap_or(&name));
            std::fs::write(self.device_of_pv(&pv), &data).expect("write device");
            let size = data.len().to_string();
            self.mock.put(
                &format!("{PVS}/{pv}"),
                json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                       "spec": {"capacity": {"storage": size}, "volumeMode": pvc["spec"]["volumeMode"],
                                "csi": {"driver": storage_class["provisioner"],
                                        "volumeHandle": format!("handle-{pv}")},
                                "claimRef": {"namespace": namespace, "name": name}},
                       "status": {"phase": "Bound"}}),
            );
            pvc["spec"]["volumeName"] = json!(pv);
            pvc["status"] = json!({"phase": "Bound", "capacity": {"storage": size}});
            self.mock.put(&path, pvc);
        }
    }

    fn used_by_a_pod(&self, namespace: &str, claim: &str) -> bool {
        let prefix = format!("/api/v1/namespaces/{namespace}/pods/");
        self.mock
            .paths()
            .iter()
            .filter(|p| p.starts_with(&prefix))
            .any(|p| {
                self.mock
                    .get(p)
                    .is_some_and(|pod| claims_of(&pod).iter().any(|c| c == claim))
            })
    }

    // --- Job controller ---------------------------------------------------------------------

    /// The garbage collector (docs "Garbage Collection", background cascading deletion):
    /// a pod whose owning Job is gone is killed and deleted.
    fn garbage_collector(&self) {
        let pods: Vec<String> = self.objects("pods");
        for path in pods {
            let Some(pod) = self.mock.get(&path) else {
                continue;
            };
            let owner = pod["metadata"]["ownerReferences"][0]["name"]
                .as_str()
                .map(str::to_owned);
            let Some(owner) = owner else { continue };
            let job = format!("/apis/batch/v1/namespaces/{}/jobs/{owner}", ns_of(&path));
            if self.mock.get(&job).is_none() {
                let running = self.state.lock().unwrap().running.remove(&path);
                if let Some(mut running) = running {
                    let _ = running.child.kill();
                    let _ = running.child.wait();
                }
                let mut gone = self.mock.get(&path).unwrap_or(pod.clone());
                if gone["status"]["phase"] == "Running" || gone["status"]["phase"] == "Pending" {
                    gone["status"]["phase"] = json!("Failed");
                }
                self.state
                    .lock()
                    .unwrap()
                    .deleted_pods
                    .insert(path.clone(), gone);
                self.mock.remove(&path);
            }
        }
    }

    /// Every pod Job `namespace/job` ever had, the deleted ones as they ended, by name.
    pub fn pod_history(&self, namespace: &str, job: &str) -> Vec<Value> {
        let mut all: BTreeMap<String, Value> = self.state.lock().unwrap().deleted_pods.clone();
        for path in self.pods_of(namespace, job) {
            if let Some(pod) = self.mock.get(&path) {
                all.insert(path, pod);
            }
        }
        all.into_values()
            .filter(|pod| {
                pod["metadata"]["namespace"] == namespace
                    && pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] == job
            })
            .collect()
    }

    fn job_controller(&self) {
        self.garbage_collector();
        let jobs: Vec<String> = self.objects("jobs");
        for path in jobs {
            let Some(mut job) = self.mock.get(&path) else {
                continue;
            };
            let finished = job["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter().any(|c| {
                    (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True"
                })
            });
            if finished {
                continue;
            }
            let namespace = ns_of(&path).to_owned();
            let name = name_of(&path).to_owned();
            let started = {
                let mut state = self.state.lock().unwrap();
                let now = state.now;
                *state.job_started.entry(path.clone()).or_insert(now)
            };
            let now = self.state.lock().unwrap().now;
            let pods: Vec<Value> = self
                .pods_of(&namespace, &name)
                .iter()
                .filter_map(|p| self.mock.get(p))
                .collect();
            let phase = |pod: &Value| {
                pod["status"]["phase"]
                    .as_str()
                    .unwrap_or("Pending")
                    .to_owned()
            };
            let active: Vec<&Value> = pods
                .iter()
                .filter(|p| !matches!(phase(p).as_str(), "Succeeded" | "Failed"))
                .collect();
            let mut failed = 0;
            let mut verdict: Option<(&str, String)> = None;
            for pod in pods.iter().filter(|p| phase(p) == "Failed") {
                match pod_failure_action(&job, pod) {
                    "Ignore" => {}
                    "FailJob" => {
                        verdict = Some((
                            "PodFailurePolicy",
                            format!(
                                "Container {} for pod {namespace}/{} failed with exit code {} \
                             matching FailJob rule",
                                "datamover",
                                pod["metadata"]["name"].as_str().unwrap_or_default(),
                                exit_code(pod).unwrap_or(-1)
                            ),
                        ));
                    }
                    _ => failed += 1,
                }
            }
            let succeeded = pods.iter().filter(|p| phase(p) == "Succeeded").count();
            let backoff_limit = job["spec"]["backoffLimit"].as_i64().unwrap_or(6);
            if verdict.is_none() && failed > backoff_limit {
                verdict = Some((
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit".to_owned(),
                ));
            }
            if let Some(deadline) = job["spec"]["activeDeadlineSeconds"].as_u64() {
                if verdict.is_none() && succeeded == 0 && now.saturating_sub(started) > deadline {
                    verdict = Some((
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline".to_owned(),
                    ));
                }
            }
            let mut status = json!({"startTime": rfc3339_now(), "active": active.len(),
                                    "failed": failed, "succeeded": succeeded});
            if succeeded > 0 {
                status["conditions"] = json!([{"type": "Complete", "status": "True"}]);
            } else if let Some((reason, message)) = verdict {
                for pod in &active {
                    self.kill(&pod_path(pod), false);
                }
                status["active"] = json!(0);
                status["conditions"] = json!([
                    {"type": "FailureTarget", "status": "True", "reason": reason, "message": message},
                    {"type": "Failed", "status": "True", "reason": reason, "message": message}]);
            } else if active.is_empty() {
                self.create_pod(&job, &namespace, &name);
                status["active"] = json!(self.pods_of(&namespace, &name).len() - pods.len());
            }
            job["status"] = status;
            self.mock.put(&path, job);
        }
    }

    /// The Job controller's pod create, through admission.
    fn create_pod(&self, job: &Value, namespace: &str, job_name: &str) {
        let template = &job["spec"]["template"];
        let spec = &template["spec"];
        let account = spec["serviceAccountName"].as_str().unwrap_or("default");
        let refused = if self
            .mock
            .get(&format!(
                "/api/v1/namespaces/{namespace}/serviceaccounts/{account}"
            ))
            .is_none()
        {
            // The ServiceAccount admission plugin.
            Some(format!(
                "pods \"{job_name}-\" is forbidden: error looking up service account \
                          {namespace}/{account}: serviceaccount \"{account}\" not found"
            ))
        } else {
            self.pod_security(namespace, spec).map(|violation| {
                format!(
                    "pods \"{job_name}-\" is forbidden: violates PodSecurity \
                         \"restricted:latest\": {violation}"
                )
            })
        };
        if let Some(message) = refused {
            self.event(
                namespace,
                "Job",
                job_name,
                "FailedCreate",
                &format!("Error creating: {message}"),
            );
            return;
        }
        let n = {
            let mut state = self.state.lock().unwrap();
            state.next_pod += 1;
            state.next_pod
        };
        let pod_name = format!("{job_name}-{n:05}");
        let mut labels = template["metadata"]["labels"].clone();
        if !labels.is_object() {
            labels = json!({});
        }
        labels["batch.kubernetes.io/job-name"] = json!(job_name);
        labels["job-name"] = json!(job_name);
        self.mock.put(
            &format!("/api/v1/namespaces/{namespace}/pods/{pod_name}"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": pod_name, "namespace": namespace, "labels": labels,
                                "creationTimestamp": rfc3339_now(),
                                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                    "name": job_name, "uid": job["metadata"]["uid"],
                                    "controller": true}]},
                   "spec": spec,
                   "status": {"phase": "Pending"}}),
        );
    }

    /// What Pod Security's `restricted` level refuses in `spec`, when the namespace enforces
    /// it (docs "Pod Security Standards": runAsNonRoot, non-zero runAsUser, no privilege
    /// escalation, all capabilities dropped, a RuntimeDefault or Localhost seccomp profile).
    fn pod_security(&self, namespace: &str, spec: &Value) -> Option<String> {
        let ns = self.mock.get(&format!("/api/v1/namespaces/{namespace}"))?;
        if ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] != "restricted" {
            return None;
        }
        let pod = &spec["securityContext"];
        let mut violations = Vec::new();
        for container in spec["containers"].as_array().into_iter().flatten() {
            let c = &container["securityContext"];
            let non_root = c["runAsNonRoot"]
                .as_bool()
                .or(pod["runAsNonRoot"].as_bool());
            if non_root != Some(true) {
                violations.push("runAsNonRoot != true".to_owned());
            }
            if c["runAsUser"].as_i64().or(pod["runAsUser"].as_i64()) == Some(0) {
                violations.push("runAsUser=0".to_owned());
            }
            if c["allowPrivilegeEscalation"] != false {
                violations.push("allowPrivilegeEscalation != false".to_owned());
            }
        }
        (!violations.is_empty()).then(|| violations.join(", "))
    }

    fn event(&self, namespace: &str, kind: &str, name: &str, reason: &str, message: &str) {
        let n = {
            let mut state = self.state.lock().unwrap();
            state.next_event += 1;
            state.next_event
        };
        self.mock.put(
            &format!("/api/v1/namespaces/{namespace}/events/{name}.sim{n}"),
            json!({"apiVersion": "v1", "kind": "Event",
                   "metadata": {"name": format!("{name}.sim{n}"), "namespace": namespace},
                   "involvedObject": {"kind": kind, "name": name, "namespace": namespace},
                   "reason": reason, "message": message, "type": "Warning",
                   "lastTimestamp": rfc3339_now()}),
        );
    }

    // --- kubelet ----------------------------------------------------------------------------

    async fn kubelet(&self, wait: Duration) {
        let pods: Vec<String> = self.objects("pods");
        for path in &pods {
            let Some(pod) = self.mock.get(path) else {
                continue;
            };
            if pod["status"]["phase"] == "Pending"
                && !self.state.lock().unwrap().running.contains_key(path)
            {
                self.start(path, pod);
            }
        }
        {
            let mut state = self.state.lock().unwrap();
            let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
            for running in state.running.values() {
                *per_node.entry(running.node.as_str()).or_default() += 1;
            }
            let most = per_node.values().copied().max().unwrap_or(0);
            state.most_on_a_node = state.most_on_a_node.max(most);
        }
        // Let the processes run; report the ones that ended.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.reap();
            let busy = !self.state.lock().unwrap().running.is_empty();
            if !busy || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Admit and start `pod`, or leave it Pending with the reason a kubelet reports.
    fn start(&self, path: &str, mut pod: Value) {
        let namespace = ns_of(path).to_owned();
        let spec = pod["spec"].clone();
        // Scheduling: every claim must exist and be bound (WaitForFirstConsumer claims are
        // bound by the provisioner once this pod names them).
        for claim in claims_of(&pod) {
            let found = self.mock.get(&format!(
                "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}"
            ));
            let message = match found {
                None => Some(format!("persistentvolumeclaim \"{claim}\" not found")),
                Some(c) if c["status"]["phase"] != "Bound" => {
                    let class = c["spec"]["storageClassName"].as_str().unwrap_or_default();
                    let delayed = self
                        .mock
                        .get(&format!("/apis/storage.k8s.io/v1/storageclasses/{class}"))
                        .is_some_and(|sc| sc["volumeBindingMode"] == "WaitForFirstConsumer");
                    if delayed {
                        // The scheduler waits for the provisioner, which this pod triggers.
                        return;
                    }
                    Some("pod has unbound immediate PersistentVolumeClaims".to_owned())
                }
                Some(_) => None,
            };
            if let Some(message) = message {
                pod["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
                    "status": "False", "reason": "Unschedulable",
                    "message": format!("0/1 nodes are available: {message}.")}]});
                self.mock.put(path, pod);
                return;
            }
        }
        let Some(node) = self.schedule(&pod) else {
            let nodes = self.mock.names_under("/api/v1/nodes").len();
            pod["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
                "status": "False", "reason": "Unschedulable",
                "message": format!("0/{nodes} nodes are available: {nodes} node(s) didn't \
                                    match Pod's node affinity/selector.")}]});
            self.mock.put(path, pod);
            return;
        };
        pod["spec"]["nodeName"] = json!(node);
        let Some(container) = spec["containers"].get(0).cloned() else {
            return;
        };
        let waiting = |reason: &str, message: String| {
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
                   "containerStatuses": [{"name": container["name"], "ready": false,
                       "restartCount": 0, "image": container["image"], "imageID": "",
                       "state": {"waiting": {"reason": reason, "message": message}}}]})
        };
        let image = container["image"].as_str().unwrap_or_default();
        if !self.images.lock().unwrap().contains(image) {
            pod["status"] = waiting(
                "ErrImagePull",
                format!("failed to pull and unpack image \"{image}\": not found"),
            );
            self.mock.put(path, pod);
            return;
        }
        let mut env: Vec<(String, String)> = Vec::new();
        for from in container["envFrom"].as_array().into_iter().flatten() {
            let Some(secret) = from["secretRef"]["name"].as_str() else {
                continue;
            };
            let found = self
                .mock
                .get(&format!("/api/v1/namespaces/{namespace}/secrets/{secret}"))
                .and_then(|s| serde_json::from_value::<Secret>(s).ok());
            match found {
                Some(found) => {
                    for (key, value) in found.data.unwrap_or_default() {
                        env.push((key, String::from_utf8_lossy(&value.0).into_owned()));
                    }
                    for (key, value) in found.string_data.unwrap_or_default() {
                        env.push((key, value));
                    }
                }
                None => {
                    pod["status"] = waiting(
                        "CreateContainerConfigError",
                        format!("secret \"{secret}\" not found"),
                    );
                    self.mock.put(path, pod);
                    return;
                }
            }
        }
        for var in container["env"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (var["name"].as_str(), var["value"].as_str()) {
                env.push((k.to_owned(), v.to_owned()));
            }
        }
        // Map the volume's device path and the scratch space onto the simulator's files.
        let mut devices: BTreeMap<String, PathBuf> = BTreeMap::new();
        for device in container["volumeDevices"].as_array().into_iter().flatten() {
            let claim = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == device["name"])
                .and_then(|v| v["persistentVolumeClaim"]["claimName"].as_str());
            if let (Some(claim), Some(at)) = (claim, device["devicePath"].as_str()) {
                if let Some(file) = self.device_of_claim(&namespace, claim) {
                    devices.insert(at.to_owned(), file);
                }
            }
        }
        let scratch = self.file(&format!("scratch-{}", name_of(path)));
        std::fs::create_dir_all(&scratch).expect("scratch");
        // The image has no ENTRYPOINT, so `command` (else `args`) begins with the program
        // (docs "Define a Command and Arguments for a Container"); the image holds `strata`.
        let words: Vec<String> = ["command", "args"]
            .iter()
            .flat_map(|field| container[*field].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(str::to_owned))
            .map(|a| {
                devices
                    .get(&a)
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or(a)
            })
            .collect();
        let Some((program, args)) = words.split_first() else {
            return;
        };
        let program = match program.as_str() {
            "strata" | "/usr/local/bin/strata" => env!("CARGO_BIN_EXE_strata"),
            other => {
                pod["status"] = waiting("StartError", format!("exec: {other:?}: not found"));
                self.mock.put(path, pod);
                return;
            }
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.file(&format!("{}.log", name_of(path)))).expect("log"),
            );
        for (key, value) in &env {
            command.env(key, value);
        }
        command.env("TMPDIR", &scratch);
        let fault = self.state.lock().unwrap().pod_faults.pop_front();
        let oom = match &fault {
            Some(PodFault::OomAt(point)) => {
                command.env("STRATA_FAILPOINT", point);
                true
            }
            Some(PodFault::FreezeAt(point)) => {
                command.env("STRATA_FAILPOINT", format!("{point}:stop"));
                false
            }
            None => false,
        };
        let child = command.spawn().expect("run strata");
        self.state
            .lock()
            .unwrap()
            .running
            .insert(path.to_owned(), Running { child, oom, node });
        pod["status"] = json!({"phase": "Running", "startTime": rfc3339_now(),
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": container["name"], "ready": true, "restartCount": 0,
                "image": image, "imageID": "", "state": {"running": {"startedAt": rfc3339_now()}}}]});
        self.mock.put(path, pod);
    }

    /// The node `pod` goes to: its `spec.nodeName`, else of the nodes its required node
    /// affinity allows the one running the fewest pods (ties by name).
    fn schedule(&self, pod: &Value) -> Option<String> {
        if let Some(node) = pod["spec"]["nodeName"].as_str() {
            return Some(node.to_owned());
        }
        let terms = pod["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let state = self.state.lock().unwrap();
        self.mock
            .names_under("/api/v1/nodes")
            .into_iter()
            .filter_map(|name| self.mock.get(&format!("/api/v1/nodes/{name}")))
            .filter(|node| terms.is_empty() || terms.iter().any(|t| term_matches(t, node)))
            .filter_map(|node| node["metadata"]["name"].as_str().map(str::to_owned))
            .min_by_key(|name| {
                let here = state.running.values().filter(|r| &r.node == name).count();
                (here, name.clone())
            })
    }

    /// Report the pods whose processes ended.
    fn reap(&self) {
        let ended: Vec<(String, std::process::ExitStatus, bool)> = {
            let mut state = self.state.lock().unwrap();
            let mut ended = Vec::new();
            for (path, running) in state.running.iter_mut() {
                if let Ok(Some(status)) = running.child.try_wait() {
                    ended.push((path.clone(), status, running.oom));
                }
            }
            for (path, ..) in &ended {
                state.running.remove(path);
            }
            ended
        };
        for (path, status, oom) in ended {
            use std::os::unix::process::ExitStatusExt;
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            let reason = match (code, oom) {
                (0, _) => "Completed",
                (137, true) => "OOMKilled",
                _ => "Error",
            };
            self.finish(&path, code, reason, None);
        }
    }

    fn finish(&self, path: &str, code: i32, reason: &str, disruption: Option<&str>) {
        let Some(mut pod) = self.mock.get(path) else {
            return;
        };
        let mut conditions = vec![
            json!({"type": "PodScheduled", "status": "True"}),
            json!({"type": "Ready", "status": "False"}),
        ];
        if let Some(why) = disruption {
            conditions.push(json!({"type": "DisruptionTarget", "status": "True",
                                   "reason": why, "message": "node lost"}));
        }
        pod["status"] = json!({"phase": if code == 0 { "Succeeded" } else { "Failed" },
            "conditions": conditions,
            "containerStatuses": [{"name": pod["spec"]["containers"][0]["name"], "ready": false,
                "restartCount": 0, "image": pod["spec"]["containers"][0]["image"], "imageID": "",
                "state": {"terminated": {"exitCode": code, "reason": reason}}}]});
        self.mock.put(path, pod);
    }

    fn kill(&self, path: &str, disruption: bool) {
        let running = self.state.lock().unwrap().running.remove(path);
        if let Some(mut running) = running {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
        self.finish(
            path,
            137,
            "Error",
            disruption.then_some("DeletionByTaintManager"),
        );
    }

    /// The node running `pod` is lost: its process dies and the pod fails with the
    /// `DisruptionTarget` condition (docs "Disruptions": pod disruption conditions).
    pub fn lose_node(&self, pod: &str) {
        self.kill(pod, true);
    }

    /// Whether any datamover process is still running.
    pub fn busy(&self) -> bool {
        !self.state.lock().unwrap().running.is_empty()
    }

    /// The stderr a pod's process wrote.
    pub fn log_of(&self, pod: &str) -> String {
        std::fs::read_to_string(self.file(&format!("{}.log", name_of(pod)))).unwrap_or_default()
    }
}

fn pod_path(pod: &Value) -> String {
    format!(
        "/api/v1/namespaces/{}/pods/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or_default(),
        pod["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Whether `node` satisfies node selector term `term`: every `matchExpressions` requirement on
/// its labels and every `matchFields` one on `metadata.name` (`In`, `NotIn`, `Exists`,
/// `DoesNotExist`).
fn term_matches(term: &Value, node: &Value) -> bool {
    let requirements = |field: &str| term[field].as_array().cloned().unwrap_or_default();
    let holds = |requirement: &Value, value: Option<&str>| {
        let values: Vec<&str> = requirement["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        match requirement["operator"].as_str() {
            Some("In") => value.is_some_and(|v| values.contains(&v)),
            Some("NotIn") => value.is_none_or(|v| !values.contains(&v)),
            Some("Exists") => value.is_some(),
            Some("DoesNotExist") => value.is_none(),
            _ => false,
        }
    };
    requirements("matchExpressions").iter().all(|r| {
        let key = r["key"].as_str().unwrap_or_default();
        holds(r, node["metadata"]["labels"][key].as_str())
    }) && requirements("matchFields")
        .iter()
        .all(|r| holds(r, node["metadata"]["name"].as_str()))
}

fn claims_of(pod: &Value) -> Vec<String> {
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            v["persistentVolumeClaim"]["claimName"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn exit_code(pod: &Value) -> Option<i64> {
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"].as_i64()
}

/// The action of the first `podFailurePolicy` rule matching failed `pod` (docs "Jobs",
/// "Pod failure policy": rules in order; `onExitCodes` with `In`/`NotIn`, or `onPodConditions`),
/// or `Count` when none matches.
fn pod_failure_action<'a>(job: &'a Value, pod: &Value) -> &'a str {
    let code = exit_code(pod);
    for rule in job["spec"]["podFailurePolicy"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let action = rule["action"].as_str().unwrap_or("Count");
        if let Some(on) = rule.get("onExitCodes") {
            let values: Vec<i64> = on["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_i64)
                .collect();
            let matched = code.is_some_and(|c| values.contains(&c));
            let hit = match on["operator"].as_str() {
                Some("In") => matched,
                Some("NotIn") => code.is_some() && !matched,
                _ => false,
            };
            if hit {
                return action;
            }
        }
        for wanted in rule["onPodConditions"].as_array().into_iter().flatten() {
            let has = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| {
                    c["type"] == wanted["type"]
                        && c["status"] == wanted["status"].as_str().unwrap_or("True")
                });
            if has {
                return action;
            }
        }
    }
    "Count"
}

/// Bytes of a plain or binary-suffixed quantity.
fn size_bytes(quantity: &Value) -> u64 {
    let text = quantity
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| quantity.to_string());
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().unwrap_or(0);
    match &text[digits.len()..] {
        "Ki" => n << 10,
        "Mi" => n << 20,
        "Gi" => n << 30,
        _ => n,
    }
}

// RBAC as `strata install` generates it.

/// The controller's grants as `strata install` generates them for application namespace
/// `shop`: each ClusterRole or Role its account is bound to, cluster-wide or in the binding's
/// namespace. The cluster-wide rules come first.
pub fn install_grants(
    install: &strata::operator::install::Install,
) -> Vec<(Option<String>, Vec<Value>)> {
    let objects = strata::operator::install::controller_objects(install);
    let role = |kind: &str, name: &str, namespace: Option<&str>| {
        objects
            .iter()
            .find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"] == name
                    && o["metadata"]["namespace"].as_str() == namespace
            })
            .unwrap_or_else(|| panic!("{kind} {name}"))["rules"]
            .as_array()
            .unwrap()
            .clone()
    };
    let mut grants: Vec<(Option<String>, Vec<Value>)> = Vec::new();
    for binding in &objects {
        let controller = binding["subjects"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "strata-controller"));
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let namespace = binding["metadata"]["namespace"].as_str();
        match binding["kind"].as_str() {
            Some("ClusterRoleBinding") if controller => {
                grants.insert(0, (None, role("ClusterRole", role_name, None)));
            }
            Some("RoleBinding") if controller => {
                let rules = match binding["roleRef"]["kind"].as_str() {
                    Some("ClusterRole") => role("ClusterRole", role_name, None),
                    _ => role("Role", role_name, namespace),
                };
                grants.push((namespace.map(str::to_owned), rules));
            }
            _ => {}
        }
    }
    grants
}

/// The install the RBAC tests run under: application namespace `shop`.
pub fn shop_install() -> strata::operator::install::Install {
    let mut install = strata::operator::install::Install::new(IMAGE);
    install.app_namespaces.push("shop".to_owned());
    install
}

impl Sim {
    /// Authorise every request from now on as `grants` (from [`install_grants`]) would.
    pub fn enforce(&self, grants: Vec<(Option<String>, Vec<Value>)>) {
        let (cluster, namespaced): (Vec<_>, Vec<_>) =
            grants.into_iter().partition(|g| g.0.is_none());
        self.mock
            .enforce_rbac(cluster.into_iter().flat_map(|(_, rules)| rules).collect());
        for (namespace, rules) in namespaced {
            self.mock
                .enforce_rbac_in(namespace.as_deref().unwrap(), rules);
        }
    }
}
