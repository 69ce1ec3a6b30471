//! The live source and server-side apply against an in-memory API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::mock::{MockServer, sample_kinds};
use common::*;
use strata_discovery::restore::{
    ApplyOptions, ExistingPolicy, RestoreOrder, RestorePlan, Transforms, apply,
};
use strata_discovery::{AppSpec, Inventory, LiveSource, MetadataBackup, ObjectSource, discover};

fn sample_server() -> MockServer {
    let objects = sample_source()
        .objects()
        .iter()
        .map(|o| serde_json::to_value(o).unwrap())
        .collect();
    MockServer::new(sample_kinds(), objects)
}

#[tokio::test]
async fn live_discovery_finds_every_listable_kind() {
    let server = sample_server();
    let source = LiveSource::new(server.client());
    let kinds = source.kinds().await.unwrap();
    assert_eq!(kinds.len(), sample_kinds().len());
    let redis = kinds.iter().find(|k| k.kind == "RedisCluster").unwrap();
    assert_eq!(
        (
            redis.group.as_str(),
            redis.version.as_str(),
            redis.plural.as_str(),
            redis.namespaced
        ),
        ("cache.example.com", "v1", "redisclusters", true)
    );
    let sc = kinds.iter().find(|k| k.kind == "StorageClass").unwrap();
    assert!(!sc.namespaced);
}

#[tokio::test]
async fn live_source_discovers_the_same_application_as_the_dump() {
    let server = sample_server();
    server.state.lock().unwrap().page = 3; // force several pages per list
    let source = LiveSource::new(server.client());
    let namespaces = ["shop".to_owned(), "operators".to_owned()];
    let inventory = Inventory::collect(&source, &namespaces).await.unwrap();
    let spec = AppSpec {
        namespace: "shop".into(),
        helm_releases: vec!["db".into()],
        operators: vec!["cache.example.com/RedisCluster/sessions".parse().unwrap()],
        include_operators: true,
        ..Default::default()
    };
    let live = discover(&inventory, &spec).unwrap();
    let offline = discover(&sample_inventory_async().await, &spec).unwrap();
    assert_eq!(names(&live), names(&offline));
    assert_eq!(live.volumes, offline.volumes);
    let requests = server.requests();
    assert!(
        requests.iter().all(|r| r.method == "GET"),
        "discovery only reads"
    );
    assert!(
        !requests.iter().any(|r| r.path.ends_with("/events")),
        "events are never listed"
    );
    assert!(
        !requests.iter().any(|r| r.path == "/api/v1/nodes"),
        "nodes are never listed"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/api/v1/namespaces/shop/secrets" && r.query.contains("continue=3")),
        "paging followed"
    );
}

#[tokio::test]
async fn apply_restores_in_order_with_server_side_apply_and_rebinds_owners() {
    // The target cluster: empty but for the kinds it serves.
    let target = MockServer::new(sample_kinds(), vec![]);
    let spec = AppSpec {
        namespace: "shop".into(),
        operators: vec!["cache.example.com/RedisCluster/sessions".parse().unwrap()],
        ..Default::default()
    };
    let backup = MetadataBackup::from_application(
        &discover(&sample_inventory_async().await, &spec).unwrap(),
        &RestoreOrder::default(),
    )
    .unwrap();
    let transforms = Transforms {
        namespaces: [("shop".to_owned(), "shop2".to_owned())].into(),
        ..Default::default()
    };
    let plan = RestorePlan::new(backup.objects, &RestoreOrder::default(), &transforms).unwrap();
    let report = apply(&target.client(), &plan, &ApplyOptions::default())
        .await
        .unwrap();
    assert_eq!(report.applied.len(), plan.objects.len());
    assert!(report.skipped.is_empty());

    let patches: Vec<_> = target
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), plan.objects.len());
    assert!(
        patches
            .iter()
            .all(|p| p.content_type == "application/apply-patch+yaml")
    );
    assert!(
        patches
            .iter()
            .all(|p| p.query.contains("fieldManager=strata") && p.query.contains("force=true"))
    );
    let order: Vec<&str> = patches.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        order[0],
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/redisclusters.cache.example.com"
    );
    assert_eq!(order[1], "/api/v1/namespaces/shop2");
    let cr = target
        .find("RedisCluster", Some("shop2"), "sessions")
        .unwrap();
    let sts = target
        .find("StatefulSet", Some("shop2"), "sessions-redis")
        .unwrap();
    assert_eq!(
        sts["metadata"]["ownerReferences"][0]["uid"], cr["metadata"]["uid"],
        "owner uid points at the restored owner"
    );
    assert!(
        cr["metadata"]["uid"]
            .as_str()
            .unwrap()
            .starts_with("restored-")
    );
}

#[tokio::test]
async fn existing_objects_are_skipped_or_updated_by_policy() {
    let existing = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "web-config", "namespace": "shop", "uid": "u1"}, "data": {"SHOP_DB_HOST": "old"}});
    let plan = RestorePlan {
        objects: vec![serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "web-config", "namespace": "shop"}, "data": {"SHOP_DB_HOST": "new"}})],
    };
    let target = MockServer::new(sample_kinds(), vec![existing]);
    let report = apply(&target.client(), &plan, &ApplyOptions::default())
        .await
        .unwrap();
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(
        target
            .find("ConfigMap", Some("shop"), "web-config")
            .unwrap()["data"]["SHOP_DB_HOST"],
        "old"
    );

    let options = ApplyOptions {
        existing: ExistingPolicy::Update,
        ..Default::default()
    };
    let report = apply(&target.client(), &plan, &options).await.unwrap();
    assert_eq!(report.applied.len(), 1);
    assert_eq!(
        target
            .find("ConfigMap", Some("shop"), "web-config")
            .unwrap()["data"]["SHOP_DB_HOST"],
        "new"
    );
}

#[tokio::test]
async fn a_kind_the_target_does_not_serve_fails_after_the_timeout() {
    let target = MockServer::new(
        sample_kinds()
            .into_iter()
            .filter(|k| k.kind != "RedisCluster")
            .collect(),
        vec![],
    );
    let plan = RestorePlan {
        objects: vec![
            serde_json::json!({"apiVersion": "cache.example.com/v1", "kind": "RedisCluster",
            "metadata": {"name": "sessions", "namespace": "shop"}}),
        ],
    };
    let options = ApplyOptions {
        definition_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let err = apply(&target.client(), &plan, &options).await.unwrap_err();
    assert!(
        matches!(&err, strata_discovery::Error::NotFound { what } if what.contains("RedisCluster")),
        "{err}"
    );
}
