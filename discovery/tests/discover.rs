//! Discovery over the shipped sample dump: Helm release, operator instance, shared labels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use strata_discovery::{AppSpec, DumpSource, Exclusion, Inventory, OperatorRef, Volume, discover};

fn helm_spec() -> AppSpec {
    AppSpec {
        namespace: "shop".into(),
        helm_releases: vec!["db".into()],
        ..Default::default()
    }
}

#[test]
fn helm_release_brings_objects_records_and_volumes() {
    let app = discover_sample(helm_spec());
    assert_eq!(
        names(&app),
        [
            "ConfigMap/shop/db-postgresql-configuration",
            "Namespace/shop",
            "PersistentVolumeClaim/shop/data-db-postgresql-0",
            "PersistentVolumeClaim/shop/data-db-postgresql-1",
            "Secret/shop/db-postgresql",
            "Secret/shop/sh.helm.release.v1.db.v1",
            "Secret/shop/sh.helm.release.v1.db.v2",
            "Secret/shop/sh.helm.release.v1.db.v3",
            "Service/shop/db-postgresql",
            "Service/shop/db-postgresql-hl",
            "Service/shop/db-postgresql-metrics",
            "ServiceAccount/shop/db-postgresql",
            "StatefulSet/shop/db-postgresql",
        ]
    );
    assert_eq!(app.helm_releases.len(), 1);
    assert!(app.missing.is_empty());
    assert_eq!(app.volumes.len(), 2);
    let v0 = &app.volumes[0];
    assert_eq!(
        (
            v0.namespace.as_str(),
            v0.pvc.as_str(),
            v0.storage_class.as_deref(),
            v0.size.as_deref(),
            v0.volume_mode.as_str()
        ),
        (
            "shop",
            "data-db-postgresql-0",
            Some("standard"),
            Some("8Gi"),
            "Filesystem"
        )
    );
    assert_eq!(v0.access_modes, ["ReadWriteOnce"]);
    let pv = v0.persistent_volume.as_ref().expect("bound PV");
    assert!(pv.name.starts_with("pvc-"));
    assert_eq!(pv.csi_driver.as_deref(), Some("rbd.csi.ceph.com"));
    assert_eq!(pv.capacity.as_deref(), Some("8Gi"));
}

#[test]
fn operator_instance_brings_crd_owned_objects_and_claims() {
    let spec = AppSpec {
        namespace: "shop".into(),
        operators: vec!["cache.example.com/RedisCluster/sessions".parse().unwrap()],
        ..Default::default()
    };
    let app = discover_sample(spec);
    assert_eq!(
        names(&app),
        [
            "CustomResourceDefinition/redisclusters.cache.example.com",
            "Namespace/shop",
            "PersistentVolumeClaim/shop/data-sessions-redis-0",
            "RedisCluster/shop/sessions",
            "Secret/shop/sessions-auth",
            "Service/shop/sessions-redis",
            "StatefulSet/shop/sessions-redis",
        ]
    );
    // The StatefulSet's pod is owned transitively but recreated by its controller; the
    // Service's EndpointSlice is derived from the Service.
    let excluded: Vec<(String, Exclusion)> = app
        .excluded
        .iter()
        .map(|(r, e)| (short(r), e.clone()))
        .collect();
    assert!(excluded.contains(&(
        "Pod/shop/sessions-redis-0".into(),
        Exclusion::ControllerManaged {
            owner_kind: "StatefulSet".into()
        }
    )));
    assert!(excluded.contains(&(
        "EndpointSlice/shop/sessions-redis-x7k2p".into(),
        Exclusion::ServiceEndpoints
    )));
    assert_eq!(app.volumes.len(), 1);
    assert_eq!(app.volumes[0].volume_mode, "Block");
    assert_eq!(app.volumes[0].size.as_deref(), Some("2Gi"));
}

#[test]
fn operator_itself_is_found_through_rbac_and_its_webhook() {
    let spec = AppSpec {
        namespace: "shop".into(),
        operators: vec![OperatorRef {
            group: "cache.example.com".into(),
            kind: "RedisCluster".into(),
            name: "sessions".into(),
        }],
        include_operators: true,
        ..Default::default()
    };
    let names = names(&discover_sample(spec));
    for expected in [
        "Deployment/operators/redis-operator",
        "Namespace/operators",
        "ServiceAccount/operators/redis-operator",
        "ClusterRole/redis-operator",
        "ClusterRoleBinding/redis-operator",
        "Service/operators/redis-operator-webhook",
        "ValidatingWebhookConfiguration/redis-operator",
    ] {
        assert!(
            names.contains(&expected.to_owned()),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        !names.contains(&"ClusterRole/view".to_owned()),
        "unrelated RBAC stays out"
    );
}

#[test]
fn shared_labels_select_both_apps_with_their_dependencies() {
    let spec = AppSpec {
        namespace: "shop".into(),
        selectors: vec!["app.kubernetes.io/part-of=shop".parse().unwrap()],
        ..Default::default()
    };
    let app = discover_sample(spec);
    assert_eq!(
        names(&app),
        [
            "ConfigMap/shop/web-config",
            "Deployment/shop/web",
            "Deployment/shop/worker",
            "Namespace/shop",
            "PersistentVolumeClaim/shop/web-uploads",
            "Secret/shop/registry-creds",
            "Secret/shop/web-tls",
            "Service/shop/web",
            "ServiceAccount/shop/web",
        ]
    );
    let excluded: Vec<(String, Exclusion)> = app
        .excluded
        .iter()
        .map(|(r, e)| (short(r), e.clone()))
        .collect();
    assert!(excluded.contains(&("Job/shop/web-migrate-29120".into(), Exclusion::CompletedJob)));
    assert!(excluded.contains(&(
        "Pod/shop/web-migrate-29120-q8v7n".into(),
        Exclusion::CompletedPod
    )));
    assert!(excluded.contains(&(
        "ReplicaSet/shop/web-7d9c5b8f6".into(),
        Exclusion::ControllerManaged {
            owner_kind: "Deployment".into()
        }
    )));
    assert_eq!(
        app.volumes,
        [Volume {
            namespace: "shop".into(),
            pvc: "web-uploads".into(),
            storage_class: Some("nfs".into()),
            size: Some("20Gi".into()),
            access_modes: vec!["ReadWriteMany".into()],
            volume_mode: "Filesystem".into(),
            persistent_volume: app.volumes[0].persistent_volume.clone(),
        }]
    );
}

#[test]
fn set_based_selector_narrows_to_one_app() {
    let spec = AppSpec {
        namespace: "shop".into(),
        selectors: vec![
            "app.kubernetes.io/part-of=shop,app.kubernetes.io/component notin (web)"
                .parse()
                .unwrap(),
        ],
        ..Default::default()
    };
    assert_eq!(
        names(&discover_sample(spec)),
        [
            "ConfigMap/shop/web-config",
            "Deployment/shop/worker",
            "Namespace/shop"
        ]
    );
}

#[test]
fn generated_tokens_events_and_service_endpoints_are_left_out() {
    let spec = AppSpec {
        namespace: "shop".into(),
        selectors: vec!["".parse().unwrap()],
        ..Default::default()
    };
    let app = discover_sample(spec);
    let names = names(&app);
    assert!(names.contains(&"ServiceAccount/shop/default".to_owned()));
    assert!(
        !names.iter().any(|n| n.starts_with("Event/")),
        "events are never read"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("Endpoints/")),
        "{names:?}"
    );
    assert!(!names.contains(&"Secret/shop/default-token-5xq2m".to_owned()));
    let excluded: Vec<(String, Exclusion)> = app
        .excluded
        .iter()
        .map(|(r, e)| (short(r), e.clone()))
        .collect();
    assert!(excluded.contains(&(
        "Secret/shop/default-token-5xq2m".into(),
        Exclusion::GeneratedToken
    )));
    assert!(excluded.contains(&(
        "Endpoints/shop/db-postgresql".into(),
        Exclusion::ServiceEndpoints
    )));
}

#[test]
fn unknown_operator_instance_is_not_found() {
    let spec = AppSpec {
        namespace: "shop".into(),
        operators: vec!["cache.example.com/RedisCluster/nope".parse().unwrap()],
        ..Default::default()
    };
    let err = discover(&sample_inventory(), &spec).unwrap_err();
    assert!(
        matches!(err, strata_discovery::Error::NotFound { .. }),
        "{err}"
    );
}

#[test]
fn a_folder_of_yaml_documents_reads_like_the_json_dump() {
    let dir = tempfile::tempdir().unwrap();
    let source = sample_source();
    // Split the dump into one multi-document YAML file per namespace, as `kubectl get -o yaml` would.
    let mut files: std::collections::BTreeMap<String, String> = Default::default();
    for o in source.objects() {
        let ns = o
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "cluster".into());
        let yaml = serde_saphyr::to_string(&serde_json::to_value(o).unwrap()).unwrap();
        let text = files.entry(ns).or_default();
        text.push_str("---\n");
        text.push_str(&yaml);
    }
    for (ns, text) in &files {
        std::fs::write(dir.path().join(format!("{ns}.yaml")), text).unwrap();
    }
    let folder = DumpSource::from_path(dir.path()).unwrap();
    assert_eq!(folder.objects().len(), source.objects().len());
    let inventory = block_on(Inventory::collect(&folder, &["shop".to_owned()])).unwrap();
    let app = discover(&inventory, &helm_spec()).unwrap();
    assert_eq!(names(&app), names(&discover_sample(helm_spec())));
}

#[test]
fn api_server_lists_without_item_kinds_are_accepted() {
    let text = r#"{"kind": "SecretList", "apiVersion": "v1", "metadata": {}, "items": [{"metadata": {"name": "a", "namespace": "n"}, "type": "Opaque"}]}"#;
    let source = DumpSource::from_json_reader(text.as_bytes(), "list").unwrap();
    let types = source.objects()[0].types.clone().unwrap();
    assert_eq!(
        (types.api_version.as_str(), types.kind.as_str()),
        ("v1", "Secret")
    );
}

#[test]
fn a_dump_item_without_a_name_is_an_error() {
    let text = r#"{"kind": "List", "apiVersion": "v1", "items": [{"apiVersion": "v1", "kind": "Secret", "metadata": {}}]}"#;
    let err = DumpSource::from_json_reader(text.as_bytes(), "list").unwrap_err();
    assert!(
        matches!(
            err,
            strata_discovery::Error::MissingField {
                field: "metadata.name",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn olm_installed_operator_brings_subscription_csv_and_operator_group() {
    let json = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app"}},
        {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "kafkas.kafka.example.io"},
         "spec": {"group": "kafka.example.io", "names": {"kind": "Kafka", "plural": "kafkas"}, "scope": "Namespaced"}},
        {"apiVersion": "kafka.example.io/v1", "kind": "Kafka", "metadata": {"name": "events", "namespace": "app", "uid": "k1"}},
        {"apiVersion": "operators.coreos.com/v1alpha1", "kind": "ClusterServiceVersion",
         "metadata": {"name": "kafka-operator.v0.45.0", "namespace": "olm-ops", "uid": "csv1"},
         "spec": {"customresourcedefinitions": {"owned": [{"name": "kafkas.kafka.example.io", "kind": "Kafka", "version": "v1"}]},
                  "install": {"strategy": "deployment", "spec": {"deployments": [{"name": "kafka-operator"}],
                              "clusterPermissions": [{"serviceAccountName": "kafka-operator", "rules": []}]}}}},
        {"apiVersion": "operators.coreos.com/v1alpha1", "kind": "Subscription", "metadata": {"name": "kafka", "namespace": "olm-ops"},
         "spec": {"name": "kafka-operator", "channel": "stable"}, "status": {"installedCSV": "kafka-operator.v0.45.0"}},
        {"apiVersion": "operators.coreos.com/v1alpha1", "kind": "Subscription", "metadata": {"name": "other", "namespace": "olm-ops"},
         "status": {"installedCSV": "other.v1"}},
        {"apiVersion": "operators.coreos.com/v1", "kind": "OperatorGroup", "metadata": {"name": "global", "namespace": "olm-ops"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "kafka-operator", "namespace": "olm-ops", "uid": "d1",
         "ownerReferences": [{"apiVersion": "operators.coreos.com/v1alpha1", "kind": "ClusterServiceVersion",
                              "name": "kafka-operator.v0.45.0", "uid": "csv1", "controller": false}]},
         "spec": {"template": {"spec": {"serviceAccountName": "kafka-operator", "containers": []}}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kafka-operator", "namespace": "olm-ops"}}
    ]});
    let source = DumpSource::from_json_reader(json.to_string().as_bytes(), "olm").unwrap();
    let inventory = block_on(Inventory::collect(
        &source,
        &["app".to_owned(), "olm-ops".to_owned()],
    ))
    .unwrap();
    let spec = AppSpec {
        namespace: "app".into(),
        operators: vec!["kafka.example.io/Kafka/events".parse().unwrap()],
        include_operators: true,
        ..Default::default()
    };
    assert_eq!(
        names(&discover(&inventory, &spec).unwrap()),
        [
            "ClusterServiceVersion/olm-ops/kafka-operator.v0.45.0",
            "CustomResourceDefinition/kafkas.kafka.example.io",
            "Deployment/olm-ops/kafka-operator",
            "Kafka/app/events",
            "Namespace/app",
            "OperatorGroup/olm-ops/global",
            "ServiceAccount/olm-ops/kafka-operator",
            "Subscription/olm-ops/kafka",
        ]
    );
}
