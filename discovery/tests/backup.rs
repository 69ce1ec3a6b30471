//! Sanitizing, restore order and the metadata archive, on the sample application.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use strata_discovery::restore::{RestoreOrder, RestorePlan, TargetedPatch, Transforms};
use strata_discovery::{AppSpec, Error, MetadataBackup, ObjectRef, sanitize};

fn whole_app() -> AppSpec {
    AppSpec {
        namespace: "shop".into(),
        helm_releases: vec!["db".into()],
        operators: vec!["cache.example.com/RedisCluster/sessions".parse().unwrap()],
        selectors: vec!["app.kubernetes.io/part-of=shop".parse().unwrap()],
        include_operators: true,
    }
}

fn backup() -> MetadataBackup {
    MetadataBackup::from_application(&discover_sample(whole_app()), &RestoreOrder::default())
        .unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name}"))
}

fn position(refs: &[ObjectRef], kind: &str, name: &str) -> usize {
    refs.iter()
        .position(|r| r.kind == kind && r.name == name)
        .unwrap_or_else(|| panic!("{kind} {name} not in plan"))
}

#[test]
fn sanitizing_removes_cluster_state() {
    let b = backup();
    for o in &b.objects {
        assert!(o.get("status").is_none(), "{}", o["metadata"]["name"]);
        for field in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
            "selfLink",
        ] {
            assert!(
                o["metadata"].get(field).is_none(),
                "{field} left on {}",
                o["metadata"]["name"]
            );
        }
    }
    let svc = find(&b.objects, "Service", "db-postgresql");
    assert!(svc["spec"].get("clusterIP").is_none() && svc["spec"].get("clusterIPs").is_none());
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/instance"], "db",
        "the rest of the spec stays"
    );
    let headless = find(&b.objects, "Service", "db-postgresql-hl");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
    let web = find(&b.objects, "Service", "web");
    assert!(web["spec"]["ports"][0].get("nodePort").is_none());
    assert_eq!(web["spec"]["ports"][0]["port"], 8080);
    let pvc = find(&b.objects, "PersistentVolumeClaim", "data-db-postgresql-0");
    assert!(pvc["spec"].get("volumeName").is_none());
    assert!(
        pvc["metadata"].get("annotations").is_none(),
        "only binding annotations were there: {}",
        pvc["metadata"]
    );
    assert_eq!(pvc["spec"]["storageClassName"], "standard");
    let sts = find(&b.objects, "StatefulSet", "sessions-redis");
    assert_eq!(
        sts["metadata"]["ownerReferences"][0]["name"], "sessions",
        "ownerReferences are kept for the restore to rebind"
    );
    let record = find(&b.objects, "Secret", "sh.helm.release.v1.db.v2");
    assert_eq!(record["type"], "helm.sh/release.v1");
    assert_eq!(record["metadata"]["labels"]["status"], "deployed");
}

#[test]
fn sanitizing_pods_jobs_and_service_accounts() {
    let source = sample_source();
    let get = |kind: &str, name: &str| {
        source
            .objects()
            .iter()
            .find(|o| {
                o.types.as_ref().unwrap().kind == kind && o.metadata.name.as_deref() == Some(name)
            })
            .unwrap()
    };
    let pod = sanitize(get("Pod", "db-postgresql-0")).unwrap();
    assert!(pod["spec"].get("nodeName").is_none());
    assert_eq!(pod["spec"]["hostname"], "db-postgresql-0");
    let job = sanitize(get("Job", "web-migrate-29120")).unwrap();
    assert!(
        job["spec"].get("selector").is_none(),
        "the generated selector carries the old uid"
    );
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"],
        json!({"job-name": "web-migrate-29120"})
    );
    assert!(job["metadata"]["labels"].get("controller-uid").is_none());
    let sa = sanitize(get("ServiceAccount", "default")).unwrap();
    assert_eq!(
        sa["secrets"],
        json!([]),
        "references to generated tokens go"
    );
}

#[test]
fn restore_order_follows_the_table() {
    let refs = backup().references().unwrap();
    let p = |kind, name| position(&refs, kind, name);
    assert_eq!(
        p(
            "CustomResourceDefinition",
            "redisclusters.cache.example.com"
        ),
        0
    );
    assert!(p("Namespace", "shop") < p("PersistentVolumeClaim", "data-db-postgresql-0"));
    assert!(p("PersistentVolumeClaim", "data-db-postgresql-0") < p("StatefulSet", "db-postgresql"));
    assert!(p("ServiceAccount", "db-postgresql") < p("StatefulSet", "db-postgresql"));
    assert!(p("ClusterRole", "redis-operator") < p("ClusterRoleBinding", "redis-operator"));
    assert!(p("Secret", "db-postgresql") < p("StatefulSet", "db-postgresql"));
    assert!(p("ConfigMap", "web-config") < p("Deployment", "web"));
    assert!(
        p("Service", "redis-operator-webhook")
            < p("ValidatingWebhookConfiguration", "redis-operator")
    );
    assert!(
        p("Deployment", "redis-operator") < p("ValidatingWebhookConfiguration", "redis-operator"),
        "webhook after its backend"
    );
    assert!(p("ValidatingWebhookConfiguration", "redis-operator") < p("RedisCluster", "sessions"));
    assert!(
        p("RedisCluster", "sessions") < p("StatefulSet", "sessions-redis"),
        "owned objects follow their owner"
    );
    assert!(p("RedisCluster", "sessions") < p("Service", "sessions-redis"));
    assert!(
        p("PersistentVolumeClaim", "data-sessions-redis-0") < p("RedisCluster", "sessions"),
        "PVCs never move"
    );
    assert!(
        p("Secret", "sessions-auth") < p("StatefulSet", "sessions-redis"),
        "waiting objects keep the table order"
    );
    assert_eq!(refs.last().map(|r| r.kind.as_str()), Some("StatefulSet"));
}

#[test]
fn callers_can_override_the_order() {
    let order = RestoreOrder::parse("# data first\nSecret\nConfigMap\n*\ncustom-resources\n");
    let b = MetadataBackup::from_application(&discover_sample(whole_app()), &order).unwrap();
    let refs = b.references().unwrap();
    assert_eq!(refs[0].kind, "Secret");
    let first_non_secret = refs.iter().position(|r| r.kind != "Secret").unwrap();
    assert_eq!(refs[first_non_secret].kind, "ConfigMap");
    assert!(position(&refs, "Deployment", "web") < position(&refs, "RedisCluster", "sessions"));
}

#[test]
fn transforms_map_namespaces_classes_labels_and_patch() {
    let b = backup();
    let transforms = Transforms {
        namespaces: [
            ("shop".to_owned(), "shop-restored".to_owned()),
            ("operators".to_owned(), "ops".to_owned()),
        ]
        .into(),
        storage_classes: [("standard".to_owned(), "fast-ssd".to_owned())].into(),
        set_labels: [("restored-by".to_owned(), "strata".to_owned())].into(),
        remove_annotations: vec!["deployment.kubernetes.io/revision".into()],
        patches: vec![TargetedPatch {
            kind: Some("Deployment".into()),
            name: Some("web".into()),
            patch: serde_json::from_value(
                json!([{"op": "replace", "path": "/spec/replicas", "value": 0}]),
            )
            .unwrap(),
        }],
        ..Default::default()
    };
    let plan = RestorePlan::new(b.objects.clone(), &RestoreOrder::default(), &transforms).unwrap();
    let ns = find(&plan.objects, "Namespace", "shop-restored");
    assert_eq!(
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "shop-restored"
    );
    let pvc = find(
        &plan.objects,
        "PersistentVolumeClaim",
        "data-db-postgresql-1",
    );
    assert_eq!(pvc["metadata"]["namespace"], "shop-restored");
    assert_eq!(pvc["spec"]["storageClassName"], "fast-ssd");
    assert_eq!(pvc["metadata"]["labels"]["restored-by"], "strata");
    let sts = find(&plan.objects, "StatefulSet", "sessions-redis");
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"],
        "fast-ssd"
    );
    let web = find(&plan.objects, "Deployment", "web");
    assert_eq!(web["spec"]["replicas"], 0);
    assert!(
        web["metadata"]["annotations"]
            .get("deployment.kubernetes.io/revision")
            .is_none()
    );
    let binding = find(&plan.objects, "ClusterRoleBinding", "redis-operator");
    assert_eq!(binding["subjects"][0]["namespace"], "ops");
    let svc = find(&plan.objects, "Service", "db-postgresql");
    assert_eq!(
        svc["metadata"]["annotations"]["meta.helm.sh/release-namespace"],
        "shop-restored"
    );
    // The Helm record itself now says the new namespace, so `helm -n shop-restored history db` works.
    let record: kube::api::DynamicObject =
        serde_json::from_value(find(&plan.objects, "Secret", "sh.helm.release.v1.db.v2").clone())
            .unwrap();
    let decoded = strata_discovery::helm::read_record(&record)
        .unwrap()
        .unwrap();
    assert_eq!(decoded.release.namespace, "shop-restored");
    assert_eq!(decoded.release.version, 2);
    // So do the objects it rendered (the chart sets their namespace): `helm uninstall` of the
    // copy must not reach the source's objects.
    let rendered = decoded.release.manifest_objects().unwrap();
    assert!(
        rendered
            .iter()
            .any(|r| r.namespace.as_deref() == Some("shop-restored")),
        "{rendered:?}"
    );
    assert!(
        rendered
            .iter()
            .all(|r| r.namespace.as_deref() != Some("shop")),
        "{rendered:?}"
    );
}

#[test]
fn a_patch_that_does_not_apply_is_a_typed_error() {
    let transforms = Transforms {
        patches: vec![TargetedPatch {
            kind: None,
            name: None,
            patch: serde_json::from_value(json!([{"op": "remove", "path": "/spec/nothing"}]))
                .unwrap(),
        }],
        ..Default::default()
    };
    let err =
        RestorePlan::new(backup().objects, &RestoreOrder::default(), &transforms).unwrap_err();
    assert!(matches!(err, Error::Patch { .. }), "{err}");
}

#[test]
fn archive_round_trips_and_is_deterministic() {
    let b = backup();
    let bytes = b.write_archive(Vec::new()).unwrap();
    assert_eq!(
        bytes,
        b.write_archive(Vec::new()).unwrap(),
        "equal backups are equal bytes"
    );
    let back = MetadataBackup::read_archive(bytes.as_slice()).unwrap();
    assert_eq!(back, b);
}

#[test]
fn archive_reads_with_system_tar() {
    let b = backup();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.tar.gz");
    std::fs::write(&path, b.write_archive(Vec::new()).unwrap()).unwrap();
    let out = std::process::Command::new("tar")
        .arg("tzf")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines[0], "strata-metadata.json");
    assert_eq!(
        lines[1],
        "objects/0000-apiextensions.k8s.io-CustomResourceDefinition-_-redisclusters.cache.example.com.yaml"
    );
    assert_eq!(lines.len(), b.objects.len() + 1);
    let out = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&path)
        .arg("-C")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let sts = std::fs::read_to_string(
        std::fs::read_dir(dir.path().join("objects"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.to_string_lossy()
                    .ends_with("-apps-StatefulSet-shop-db-postgresql.yaml")
            })
            .unwrap(),
    )
    .unwrap();
    assert!(sts.contains("kind: StatefulSet"), "{sts}");
}

#[test]
fn archive_without_index_or_with_stray_entries_is_rejected() {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut header = tar::Header::new_old();
    header.set_size(2);
    header.set_mode(0o644);
    // The tar crate refuses to write `..`; hostile archives have it anyway.
    header.as_old_mut().name[..12].copy_from_slice(b"../evil.yaml");
    header.set_cksum();
    tar.append(&header, &b"{}"[..]).unwrap();
    let bytes = tar.into_inner().unwrap().finish().unwrap();
    let err = MetadataBackup::read_archive(bytes.as_slice()).unwrap_err();
    assert!(
        matches!(&err, Error::Archive { entry, .. } if entry == "../evil.yaml"),
        "{err}"
    );

    let empty = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ))
    .into_inner()
    .unwrap()
    .finish()
    .unwrap();
    let err = MetadataBackup::read_archive(empty.as_slice()).unwrap_err();
    assert!(
        matches!(&err, Error::Archive { entry, .. } if entry == "strata-metadata.json"),
        "{err}"
    );
}

#[test]
fn hand_made_token_secrets_lose_data_and_the_old_account_uid() {
    let secret: kube::api::DynamicObject = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ci-bot-token", "namespace": "shop", "annotations": {
            "kubernetes.io/service-account.name": "ci-bot", "kubernetes.io/service-account.uid": "0b1c", "team": "ci"}},
        "type": "kubernetes.io/service-account-token", "data": {"token": "ZXlK"}}))
    .unwrap();
    let inventory = strata_discovery::Inventory::from_objects(vec![secret.clone()], vec![]);
    assert_eq!(
        strata_discovery::exclusion(&inventory, &secret),
        None,
        "not a generated <sa>-token-xxxxx name"
    );
    let clean = sanitize(&secret).unwrap();
    assert!(clean.get("data").is_none());
    assert_eq!(
        clean["metadata"]["annotations"],
        json!({"kubernetes.io/service-account.name": "ci-bot", "team": "ci"})
    );
}

/// A tar.gz of `entries` (path, bytes), as a hostile writer of the target would make one.
fn hostile_archive(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::best(),
    ));
    for (path, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, data.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

#[test]
fn an_index_naming_one_document_many_times_is_refused() {
    // 600,000 mentions of one small document: 14 KB of archive that read as 600,000 objects.
    let index = json!({
        "format": strata_discovery::FORMAT,
        "objects": vec!["objects/a"; 600_000],
        "volumes": [],
    });
    let doc =
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: shop\n".to_vec();
    let bytes = hostile_archive(&[
        ("strata-metadata.json", serde_json::to_vec(&index).unwrap()),
        ("objects/a", doc),
    ]);
    let err = MetadataBackup::read_archive(bytes.as_slice()).unwrap_err();
    assert!(
        matches!(&err, Error::Archive { entry, reason } if entry == "objects/a"
            && reason == "listed in the index more than once"),
        "{err}"
    );
}

#[test]
fn an_archive_whose_text_passes_the_budget_is_refused_before_it_is_held() {
    // 40 entries of 16 MiB of one byte: 650 KB of gzip that would hold 640 MiB of text.
    let big = vec![b'#'; 16 << 20];
    let index = json!({"format": strata_discovery::FORMAT, "objects": [], "volumes": []});
    let names: Vec<String> = (0..40).map(|i| format!("objects/{i}")).collect();
    let mut entries = vec![("strata-metadata.json", serde_json::to_vec(&index).unwrap())];
    for name in &names {
        entries.push((name.as_str(), big.clone()));
    }
    let bytes = hostile_archive(&entries);
    drop(entries);
    let err = MetadataBackup::read_archive(bytes.as_slice()).unwrap_err();
    assert!(
        matches!(&err, Error::Limit { what, limit } if what == "metadata archive size"
            && *limit == strata_discovery::MAX_TOTAL_BYTES),
        "{err}"
    );
}

#[test]
fn an_archive_is_cleaned_again_as_it_is_read() {
    // A claim as a hostile writer would put it back: bound to a chosen volume, provisioned
    // from a snapshot, with a status and a uid.
    let claim = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": "shop", "uid": "1234", "resourceVersion": "9"},
        "spec": {
            "volumeName": "someone-elses-pv",
            "selector": {"matchLabels": {"disk": "chosen"}},
            "dataSource": {"kind": "VolumeSnapshot", "name": "old", "apiGroup": "snapshot.storage.k8s.io"},
            "dataSourceRef": {"kind": "VolumeSnapshot", "name": "old", "apiGroup": "snapshot.storage.k8s.io"},
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
        },
        "status": {"phase": "Bound"},
    });
    let index = json!({
        "format": strata_discovery::FORMAT,
        "objects": ["objects/0000-core-PersistentVolumeClaim-shop-data.yaml"],
        "volumes": [],
    });
    let bytes = hostile_archive(&[
        ("strata-metadata.json", serde_json::to_vec(&index).unwrap()),
        (
            "objects/0000-core-PersistentVolumeClaim-shop-data.yaml",
            serde_json::to_vec(&claim).unwrap(),
        ),
    ]);
    let back = MetadataBackup::read_archive(bytes.as_slice()).unwrap();
    let object = &back.objects[0];
    for gone in [
        "/spec/volumeName",
        "/spec/selector",
        "/spec/dataSource",
        "/spec/dataSourceRef",
        "/status",
        "/metadata/uid",
        "/metadata/resourceVersion",
    ] {
        assert!(object.pointer(gone).is_none(), "{gone} is back: {object}");
    }
    assert_eq!(
        object.pointer("/spec/resources/requests/storage"),
        Some(&json!("1Gi"))
    );
}

/// A valid archive of one ConfigMap whose document is `name`, with `before` appended ahead of
/// that document (a record a hostile writer slips in).
fn archive_with(
    name: &str,
    before: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<Vec<u8>>>),
) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let append = |tar: &mut tar::Builder<_>, path: &str, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, data).unwrap();
    };
    let index = json!({"format": strata_discovery::FORMAT, "objects": [name], "volumes": []});
    append(
        &mut tar,
        "strata-metadata.json",
        &serde_json::to_vec(&index).unwrap(),
    );
    before(&mut tar);
    let doc = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: shop\n";
    append(&mut tar, name, doc);
    tar.into_inner().unwrap().finish().unwrap()
}

#[test]
fn records_the_writer_never_makes_are_refused_and_names_are_bounded() {
    // The archive reads as it is.
    let plain = archive_with("objects/a", |_| {});
    assert_eq!(
        MetadataBackup::read_archive(plain.as_slice())
            .unwrap()
            .objects
            .len(),
        1
    );
    // A PAX record: its `size` would stand for the header's, past every size check.
    let pax = archive_with("objects/a", |tar| {
        tar.append_pax_extensions([("comment", &b"x"[..])]).unwrap();
    });
    let err = MetadataBackup::read_archive(pax.as_slice()).unwrap_err();
    assert!(
        matches!(&err, Error::Archive { reason, .. } if reason.contains("XHeader")),
        "{err}"
    );
    // A name longer than any object's path (a long-name record is read whole).
    let long = format!("objects/{}", "a".repeat(5000));
    let bytes = archive_with(&long, |_| {});
    let err = MetadataBackup::read_archive(bytes.as_slice()).unwrap_err();
    assert!(
        matches!(&err, Error::Archive { entry, .. } if entry == "a long-name record"),
        "{err}"
    );
    // A long name within the bound reads.
    let fine = format!("objects/{}", "b".repeat(300));
    let bytes = archive_with(&fine, |_| {});
    assert_eq!(
        MetadataBackup::read_archive(bytes.as_slice())
            .unwrap()
            .objects
            .len(),
        1
    );
}

#[test]
fn an_object_named_with_two_dots_round_trips() {
    let mut b = backup();
    b.objects.push(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "a..b"}, "rules": []}),
    );
    let bytes = b.write_archive(Vec::new()).unwrap();
    let back = MetadataBackup::read_archive(bytes.as_slice()).unwrap();
    assert_eq!(back, b);
}

#[test]
fn the_documents_of_ten_thousand_objects_sort_in_restore_order() {
    let objects: Vec<Value> = (0..10_001)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": format!("c{i}"), "namespace": "shop"}})
        })
        .collect();
    let b = MetadataBackup {
        objects,
        volumes: vec![],
    };
    let bytes = b.write_archive(Vec::new()).unwrap();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
    let written: Vec<String> = tar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .filter(|p| p.starts_with("objects/"))
        .collect();
    let mut sorted = written.clone();
    sorted.sort();
    assert_eq!(sorted, written, "file order is restore order");
    assert!(written[0].starts_with("objects/00000-"), "{}", written[0]);
}
