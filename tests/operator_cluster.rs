//! Against a real cluster (`KUBECONFIG`): the CRDs install and the samples pass the API
//! server's own validation, and the flows `tests/operator_sim.rs` runs on the simulator run on
//! the cluster's real API server, Job controller, kubelet, snapshot controller and provisioner:
//! a backup and an incremental restored byte for byte into a mapped namespace, a datamover pod
//! killed mid-copy, a datamover that cannot start, a missing Target, a Backup deleted while
//! running, and a Restore the policy refuses. The controller runs in the test process under the
//! RBAC `strata install` generates (the client impersonates its ServiceAccount), so a missing
//! verb fails these tests too.
//!
//! ```text
//! KUBECONFIG=~/.kube/config \
//! STRATA_CLUSTER_IMAGE=registry.example/strata:0.1.0 \
//! STRATA_CLUSTER_STORAGE_CLASS=csi-hostpath-sc \
//! STRATA_CLUSTER_S3_URL=s3://bucket/prefix STRATA_CLUSTER_S3_ENDPOINT=http://minio.minio:9000 \
//! AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
//! cargo test --features cli,kubernetes --test operator_cluster -- --ignored --test-threads 1
//! ```
//!
//! The storage class must be a CSI driver's with a VolumeSnapshotClass (the csi-hostpath driver
//! of kind or minikube will do) and Block volume support; the endpoint must be reachable from
//! the cluster's pods and from this process. `STRATA_CLUSTER_TOOLS_IMAGE` (default
//! `busybox:1.36`) writes and checksums the volumes. Each test makes its own namespaces and
//! deletes them at the end.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams,
};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use serde_json::{Value, json};
use strata::operator::crd::{Backup, Restore};
use strata::operator::install::{CONTROLLER, DATAMOVER, Install};
use strata::operator::status::Phase;

/// Volumes are this large; the tests write the first 8 MiB.
const VOLUME: &str = "64Mi";
const MANAGER: &str = "strata-cluster-test";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("set {name} (see this file's header)"))
}

async fn admin() -> Client {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "set KUBECONFIG to the cluster to test against"
    );
    Client::try_default().await.expect("client from KUBECONFIG")
}

async fn established(api: &Api<CustomResourceDefinition>, name: &str) -> bool {
    let Ok(crd) = api.get(name).await else {
        return false;
    };
    crd.status
        .and_then(|s| s.conditions)
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Established" && c.status == "True")
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    for crd in strata::operator::crd::crds() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap();
        let mut waited = 0;
        while !established(&crds, &name).await {
            assert!(waited < 60, "{name} not Established after 30 s");
            tokio::time::sleep(Duration::from_millis(500)).await;
            waited += 1;
        }
    }
}

/// The API resource of an object's `apiVersion` and `kind` (plural guessed, as for every kind
/// these tests apply).
fn resource_of(object: &Value) -> ApiResource {
    let api_version = object["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap();
    ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(group, version, kind))
}

/// Server-side apply `object` (namespaced when it names a namespace).
async fn apply(client: &Client, object: &Value) {
    let resource = resource_of(object);
    let name = object["metadata"]["name"].as_str().unwrap();
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {} {name}: {e}", resource.kind));
}

#[tokio::test]
#[ignore = "needs a cluster"]
async fn crds_install_and_samples_pass_server_validation() {
    let client = admin().await;
    install_crds(&client).await;
    for sample in ["target.yaml", "backup.yaml", "restore.yaml"] {
        let path = format!("{}/deploy/samples/{sample}", env!("CARGO_MANIFEST_DIR"));
        let object: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let kind = object["kind"].as_str().unwrap();
        let resource = ApiResource {
            group: "strata.io".into(),
            version: "v1alpha1".into(),
            api_version: "strata.io/v1alpha1".into(),
            kind: kind.into(),
            plural: format!("{}s", kind.to_lowercase()),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
        let mut object: DynamicObject = serde_json::from_value(object).unwrap();
        object.metadata.namespace = Some("default".into());
        let name = object.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).dry_run(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|e| panic!("{sample} refused by the API server: {e}"));
    }
}

/// One test's corner of the cluster: application namespace `ns` (and `ns-copy` for restores),
/// installed as `strata install --namespace NS --restore-into NS=NS-copy` sets them up, and the
/// controller's client impersonating the installed ServiceAccount.
struct Cluster {
    admin: Client,
    controller: Client,
    ns: String,
    copy: String,
    image: String,
    tools: String,
    storage_class: String,
}

impl Cluster {
    async fn new(test: &str) -> Self {
        let admin = admin().await;
        install_crds(&admin).await;
        let ns = format!("strata-e2e-{test}-{}", std::process::id() % 100_000);
        let copy = format!("{ns}-copy");
        let image = env("STRATA_CLUSTER_IMAGE");
        let mut install = Install::new(&image);
        install.namespace = format!("{ns}-system");
        install.app_namespaces.push(ns.clone());
        install
            .restore_into
            .push(format!("{ns}={copy}").parse().unwrap());
        // Block datamovers run as root: Pod Security "baseline" is what they need.
        for name in [&ns, &copy] {
            apply(
                &admin,
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name,
                    "labels": {"pod-security.kubernetes.io/enforce": "baseline"}}}),
            )
            .await;
        }
        let objects = strata::operator::install::controller_objects(&install)
            .into_iter()
            .chain(strata::operator::install::datamover_objects(&ns))
            // The controller runs in this process, not as the Deployment.
            .filter(|o| o["kind"] != "Deployment");
        for object in objects {
            apply(&admin, &object).await;
        }
        let mut config = kube::Config::infer().await.expect("KUBECONFIG");
        config.auth_info.impersonate = Some(format!(
            "system:serviceaccount:{}:{CONTROLLER}",
            install.namespace
        ));
        config.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{}", install.namespace),
            "system:authenticated".to_owned(),
        ]);
        let controller = Client::try_from(config).expect("impersonating client");
        let cluster = Cluster {
            admin,
            controller,
            ns,
            copy,
            image,
            tools: std::env::var("STRATA_CLUSTER_TOOLS_IMAGE")
                .unwrap_or_else(|_| "busybox:1.36".to_owned()),
            storage_class: env("STRATA_CLUSTER_STORAGE_CLASS"),
        };
        cluster.add_target("s3").await;
        cluster
    }

    /// The controller's context, as `strata-controller` builds it from the installed
    /// Deployment's flags, with short waits for the tests.
    fn context(&self) -> strata::operator::Context {
        let mut ctx = strata::operator_context(self.controller.clone(), &self.image);
        ctx.datamover_service_account = Some(DATAMOVER.to_owned());
        ctx.datamover_start_timeout = Duration::from_secs(90);
        ctx.cluster_id = Some(format!("e2e-{}", std::process::id()));
        ctx.restore_policy
            .namespaces
            .push(format!("{}={}", self.ns, self.copy).parse().unwrap());
        ctx
    }

    /// Run the controller on this test's namespaces until the returned handle is dropped.
    fn run_controller(&self, ctx: strata::operator::Context) -> tokio::task::JoinHandle<()> {
        ctx.health.set_leading(true);
        tokio::spawn(async move { strata::operator::controller::run(ctx, None).await })
    }

    /// Target `name` on the S3 store the environment names, with its credentials Secret.
    async fn add_target(&self, name: &str) {
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "strata-e2e-s3", "namespace": self.ns},
        "stringData": {
            "AWS_ACCESS_KEY_ID": env("AWS_ACCESS_KEY_ID"),
            "AWS_SECRET_ACCESS_KEY": env("AWS_SECRET_ACCESS_KEY"),
        }});
        apply(&self.admin, &secret).await;
        let mut options = json!({"aws_region": std::env::var("AWS_REGION")
            .unwrap_or_else(|_| "us-east-1".to_owned())});
        if let Ok(endpoint) = std::env::var("STRATA_CLUSTER_S3_ENDPOINT") {
            options["aws_endpoint"] = json!(endpoint);
            options["aws_allow_http"] = json!("true");
            options["aws_virtual_hosted_style_request"] = json!("false");
        }
        apply(
            &self.admin,
            &json!({"apiVersion": "strata.io/v1alpha1", "kind": "Target",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {"url": format!("{}/{}", env("STRATA_CLUSTER_S3_URL"), self.ns),
                         "credentialsSecretRef": {"name": "strata-e2e-s3"},
                         "options": options}}),
        )
        .await;
    }

    /// Block PVC `name` labelled `app=db` in the application namespace.
    async fn add_volume(&self, name: &str) {
        apply(
            &self.admin,
            &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "namespace": self.ns, "labels": {"app": "db"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                         "storageClassName": self.storage_class,
                         "resources": {"requests": {"storage": VOLUME}}}}),
        )
        .await;
    }

    /// Run `script` in a root pod with PVC `pvc` of `ns` as block device `/dev/vol`, to its
    /// end; its log.
    async fn tool(&self, ns: &str, pvc: &str, script: &str) -> String {
        let name = format!(
            "tool-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % 1_000_000_000
        );
        let job: Job = serde_json::from_value(json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "tool", "image": self.tools,
                    "command": ["sh", "-c", script],
                    "securityContext": {"runAsUser": 0},
                    "volumeDevices": [{"name": "vol", "devicePath": "/dev/vol"}]}],
                "volumes": [{"name": "vol", "persistentVolumeClaim": {"claimName": pvc}}]}}}
        }))
        .unwrap();
        let jobs: Api<Job> = Api::namespaced(self.admin.clone(), ns);
        jobs.create(&PostParams::default(), &job).await.unwrap();
        let done = wait(Duration::from_secs(300), || async {
            let job = jobs.get(&name).await.ok()?;
            let status = job.status?;
            (status.succeeded.unwrap_or(0) > 0 || status.failed.unwrap_or(0) > 0)
                .then_some(status.succeeded.unwrap_or(0) > 0)
        })
        .await;
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), ns);
        let pod = pods
            .list(&ListParams::default().labels(&format!("job-name={name}")))
            .await
            .unwrap()
            .items
            .remove(0);
        let log = pods
            .logs(pod.metadata.name.as_deref().unwrap(), &LogParams::default())
            .await
            .unwrap();
        assert!(done, "tool job {name} failed: {log}");
        jobs.delete(
            &name,
            &DeleteParams {
                propagation_policy: Some(kube::api::PropagationPolicy::Background),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        log
    }

    /// Write 8 MiB of random data at the start of `pvc`; their SHA-256.
    async fn fill(&self, pvc: &str) -> String {
        let log = self
            .tool(
                &self.ns,
                pvc,
                "head -c 8388608 /dev/urandom > /tmp/d && dd if=/tmp/d of=/dev/vol bs=1M conv=fsync \
                 2>/dev/null && sha256sum < /tmp/d",
            )
            .await;
        log.split_whitespace().next().unwrap().to_owned()
    }

    /// SHA-256 of the first 8 MiB of PVC `pvc` of `ns`.
    async fn checksum(&self, ns: &str, pvc: &str) -> String {
        let log = self
            .tool(ns, pvc, "head -c 8388608 /dev/vol | sha256sum")
            .await;
        log.split_whitespace().next().unwrap().to_owned()
    }

    fn backups(&self) -> Api<Backup> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    fn restores(&self) -> Api<Restore> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    async fn add_backup(&self, name: &str, mode: &str, target: &str) {
        apply(
            &self.admin,
            &json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": target},
                         "mode": mode}}),
        )
        .await;
    }

    async fn add_restore(&self, name: &str, backup: &str, into: &str) {
        apply(
            &self.admin,
            &json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {"backupRef": {"name": backup}, "namespaceMapping": {&self.ns: into}}}),
        )
        .await;
    }

    /// The Backup once its phase is final.
    async fn finished_backup(&self, name: &str, timeout: Duration) -> Backup {
        let backups = self.backups();
        wait(timeout, || async {
            let backup = backups.get(name).await.ok()?;
            let phase = backup.status.as_ref()?.phase?;
            phase.is_final().then_some(backup)
        })
        .await
    }

    async fn finished_restore(&self, name: &str, timeout: Duration) -> Restore {
        let restores = self.restores();
        wait(timeout, || async {
            let restore = restores.get(name).await.ok()?;
            let phase = restore.status.as_ref()?.phase?;
            phase.is_final().then_some(restore)
        })
        .await
    }

    /// Remove the test's namespaces (and with them everything in them).
    async fn tear_down(self) {
        let namespaces: Api<Namespace> = Api::all(self.admin.clone());
        for name in [&self.ns, &self.copy, &format!("{}-system", self.ns)] {
            let _ = namespaces.delete(name, &DeleteParams::default()).await;
        }
    }
}

/// Poll `probe` every two seconds until it gives a value; panics after `timeout`.
async fn wait<T, F, Fut>(timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing after {}s",
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn condition<'a>(
    conditions: &'a [strata::operator::status::Condition],
    type_: &str,
) -> Option<&'a strata::operator::status::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// A full backup, an incremental after more writes, and a restore of each into the granted
/// namespace, byte for byte (operator_sim's first test and the mapped restore).
#[tokio::test]
#[ignore = "needs a cluster"]
async fn a_full_and_an_incremental_backup_restore_byte_for_byte_into_a_mapped_namespace() {
    let cluster = Cluster::new("flow").await;
    cluster.add_volume("data").await;
    let first = cluster.fill("data").await;
    let controller = cluster.run_controller(cluster.context());
    cluster.add_backup("full", "Full", "s3").await;
    let full = cluster
        .finished_backup("full", Duration::from_secs(600))
        .await;
    assert_eq!(
        full.status.as_ref().unwrap().phase,
        Some(Phase::Completed),
        "{full:?}"
    );
    let second = cluster.fill("data").await;
    cluster.add_backup("incremental", "Incremental", "s3").await;
    let incremental = cluster
        .finished_backup("incremental", Duration::from_secs(600))
        .await;
    assert_eq!(
        incremental.status.as_ref().unwrap().phase,
        Some(Phase::Completed),
        "{incremental:?}"
    );
    for (backup, sum) in [("full", &first), ("incremental", &second)] {
        let name = format!("from-{backup}");
        cluster.add_restore(&name, backup, &cluster.copy).await;
        let restore = cluster
            .finished_restore(&name, Duration::from_secs(600))
            .await;
        assert_eq!(
            restore.status.as_ref().unwrap().phase,
            Some(Phase::Completed),
            "{restore:?}"
        );
        assert_eq!(
            &cluster.checksum(&cluster.copy, "data").await,
            sum,
            "{backup}"
        );
        // The next restore recreates the claim.
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(cluster.admin.clone(), &cluster.copy);
        claims
            .delete("data", &DeleteParams::default())
            .await
            .unwrap();
        wait(Duration::from_secs(120), || async {
            claims.get_opt("data").await.ok()?.is_none().then_some(())
        })
        .await;
    }
    // The per-run credentials and account in the mapped namespace are gone.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(cluster.admin.clone(), &cluster.copy);
    let left = secrets.list(&ListParams::default()).await.unwrap();
    assert!(
        left.items.iter().all(|s| !s
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .starts_with("strata-access-")),
        "credentials left behind"
    );
    controller.abort();
    cluster.tear_down().await;
}

/// A datamover pod deleted while it copies (as an eviction or OOM kill ends it) is replaced by
/// its Job, and the Backup completes and restores.
#[tokio::test]
#[ignore = "needs a cluster"]
async fn a_datamover_pod_killed_mid_copy_is_retried_and_the_backup_completes() {
    let cluster = Cluster::new("kill").await;
    cluster.add_volume("data").await;
    let sum = cluster.fill("data").await;
    let controller = cluster.run_controller(cluster.context());
    cluster.add_backup("full", "Full", "s3").await;
    let pods: Api<Pod> = Api::namespaced(cluster.admin.clone(), &cluster.ns);
    let selector = "app.kubernetes.io/managed-by=strata";
    let running = wait(Duration::from_secs(300), || async {
        let list = pods
            .list(&ListParams::default().labels(selector))
            .await
            .ok()?;
        list.items
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
    })
    .await;
    pods.delete(
        running.metadata.name.as_deref().unwrap(),
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let full = cluster
        .finished_backup("full", Duration::from_secs(900))
        .await;
    assert_eq!(
        full.status.as_ref().unwrap().phase,
        Some(Phase::Completed),
        "{full:?}"
    );
    cluster.add_restore("back", "full", &cluster.copy).await;
    let restore = cluster
        .finished_restore("back", Duration::from_secs(600))
        .await;
    assert_eq!(
        restore.status.as_ref().unwrap().phase,
        Some(Phase::Completed)
    );
    assert_eq!(cluster.checksum(&cluster.copy, "data").await, sum);
    controller.abort();
    cluster.tear_down().await;
}

/// Without the datamover's ServiceAccount the Job's pods are never created: the Backup says so
/// in `DatamoversStarted`, then fails at the start timeout and releases its PVC Leases.
#[tokio::test]
#[ignore = "needs a cluster"]
async fn a_datamover_that_cannot_start_is_reported_and_fails_the_backup() {
    let cluster = Cluster::new("nostart").await;
    cluster.add_volume("data").await;
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(cluster.admin.clone(), &cluster.ns);
    accounts
        .delete(DATAMOVER, &DeleteParams::default())
        .await
        .unwrap();
    let controller = cluster.run_controller(cluster.context());
    cluster.add_backup("full", "Full", "s3").await;
    let backups = cluster.backups();
    let waiting = wait(Duration::from_secs(300), || async {
        let backup = backups.get("full").await.ok()?;
        let status = backup.status?;
        let started = condition(&status.conditions, "DatamoversStarted")?;
        (started.status == strata::operator::status::ConditionStatus::False)
            .then(|| started.message.clone())
    })
    .await;
    assert!(waiting.contains("serviceaccount"), "{waiting}");
    let failed = cluster
        .finished_backup("full", Duration::from_secs(300))
        .await;
    assert_eq!(failed.status.as_ref().unwrap().phase, Some(Phase::Failed));
    // The locks go right after the final status is written.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(cluster.admin.clone(), &cluster.ns);
    wait(Duration::from_secs(60), || async {
        let left = leases.list(&ListParams::default()).await.ok()?;
        left.items.is_empty().then_some(())
    })
    .await;
    controller.abort();
    cluster.tear_down().await;
}

/// A Backup naming a Target that does not exist stalls with condition `Stalled`, reason
/// `TargetNotFound`, and a Warning Event; creating the Target lets it complete.
#[tokio::test]
#[ignore = "needs a cluster"]
async fn a_missing_target_stalls_with_a_condition_and_an_event_until_it_exists() {
    let cluster = Cluster::new("notarget").await;
    cluster.add_volume("data").await;
    let controller = cluster.run_controller(cluster.context());
    cluster.add_backup("full", "Full", "later").await;
    let backups = cluster.backups();
    let reason = wait(Duration::from_secs(120), || async {
        let status = backups.get("full").await.ok()?.status?;
        condition(&status.conditions, "Stalled").map(|c| c.reason.clone())
    })
    .await;
    assert_eq!(reason, "TargetNotFound");
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.admin.clone(), &cluster.ns);
    let warned = wait(Duration::from_secs(60), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("TargetNotFound"))
    })
    .await;
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
    cluster.add_target("later").await;
    let done = cluster
        .finished_backup("full", Duration::from_secs(900))
        .await;
    assert_eq!(done.status.as_ref().unwrap().phase, Some(Phase::Completed));
    controller.abort();
    cluster.tear_down().await;
}

/// Deleting a running Backup stops its Job and removes its clone PVCs and snapshots before the
/// finalizer lets the Backup go.
#[tokio::test]
#[ignore = "needs a cluster"]
async fn deleting_a_running_backup_removes_its_job_and_temporaries() {
    let cluster = Cluster::new("delete").await;
    cluster.add_volume("data").await;
    cluster.fill("data").await;
    let controller = cluster.run_controller(cluster.context());
    cluster.add_backup("doomed", "Full", "s3").await;
    let jobs: Api<Job> = Api::namespaced(cluster.admin.clone(), &cluster.ns);
    let selector = "app.kubernetes.io/managed-by=strata";
    wait(Duration::from_secs(300), || async {
        let list = jobs
            .list(&ListParams::default().labels(selector))
            .await
            .ok()?;
        (!list.items.is_empty()).then_some(())
    })
    .await;
    cluster
        .backups()
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    let backups = cluster.backups();
    wait(Duration::from_secs(300), || async {
        backups
            .get_opt("doomed")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.admin.clone(), &cluster.ns);
    wait(Duration::from_secs(120), || async {
        let jobs_left = jobs
            .list(&ListParams::default().labels(selector))
            .await
            .ok()?;
        let claims_left = claims
            .list(&ListParams::default().labels(selector))
            .await
            .ok()?;
        (jobs_left.items.is_empty() && claims_left.items.is_empty()).then_some(())
    })
    .await;
    controller.abort();
    cluster.tear_down().await;
}

/// A Restore into a namespace no grant names fails with reason NotAuthorized and creates
/// nothing there.
#[tokio::test]
#[ignore = "needs a cluster"]
async fn a_restore_into_an_ungranted_namespace_is_refused() {
    let cluster = Cluster::new("policy").await;
    cluster.add_volume("data").await;
    let controller = cluster.run_controller(cluster.context());
    cluster.add_backup("full", "Full", "s3").await;
    let full = cluster
        .finished_backup("full", Duration::from_secs(600))
        .await;
    assert_eq!(full.status.as_ref().unwrap().phase, Some(Phase::Completed));
    let elsewhere = format!("{}-elsewhere", cluster.ns);
    cluster.add_restore("refused", "full", &elsewhere).await;
    let refused = cluster
        .finished_restore("refused", Duration::from_secs(120))
        .await;
    let status = refused.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Failed));
    let failed = condition(&status.conditions, "Failed").expect("Failed condition");
    assert_eq!(failed.reason, "NotAuthorized");
    assert!(failed.message.contains(&elsewhere), "{}", failed.message);
    let namespaces: Api<Namespace> = Api::all(cluster.admin.clone());
    assert!(namespaces.get_opt(&elsewhere).await.unwrap().is_none());
    controller.abort();
    cluster.tear_down().await;
}
