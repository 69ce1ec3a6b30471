//! Helm storage records: decoding what Helm (here an independent gzip/base64 encoder) wrote,
//! encoding records Helm can read, and resolving a release with a failed upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use strata_discovery::helm::{self, Driver, Info, Release};
use strata_discovery::{Error, ObjectRef};

fn sample_release(version: u32, status: &str) -> Release {
    Release {
        name: "cache".into(),
        info: Info { status: status.into(), extra: serde_json::from_value(serde_json::json!({"description": "Install complete"})).unwrap() },
        chart: Some(serde_json::json!({"metadata": {"name": "redis", "version": "20.1.0"}})),
        config: Some(serde_json::json!({"replica": {"replicaCount": 1}})),
        manifest: "---\n# Source: redis/templates/cm.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cache-redis\n".into(),
        hooks: None,
        version,
        namespace: "shop".into(),
        extra: Default::default(),
    }
}

#[test]
fn decodes_secret_records_written_by_an_independent_encoder() {
    let inventory = sample_inventory();
    let release = helm::release(&inventory, "shop", "db").unwrap();
    let versions: Vec<(u32, &str)> = release
        .records
        .iter()
        .map(|r| (r.release.version, r.release.info.status.as_str()))
        .collect();
    assert_eq!(
        versions,
        [(1, "superseded"), (2, "deployed"), (3, "failed")]
    );
    assert!(release.undecodable.is_empty());
    assert!(release.records.iter().all(|r| r.driver == Driver::Secret));
    let current = release.current().unwrap();
    assert_eq!(
        current.release.version, 2,
        "a failed upgrade leaves the previous revision deployed"
    );
    assert_eq!(current.reference.name, "sh.helm.release.v1.db.v2");
    assert!(
        !current.release.extra.contains_key("chart"),
        "chart is a named field, not extra"
    );
    assert_eq!(
        current.release.chart.as_ref().unwrap()["metadata"]["version"],
        "16.2.1"
    );
}

#[test]
fn secret_encoding_round_trips_and_has_helm_shape() {
    let release = sample_release(4, "deployed");
    let secret = helm::secret_record(&release).unwrap();
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("sh.helm.release.v1.cache.v4")
    );
    let labels = secret.metadata.labels.clone().unwrap();
    assert_eq!(labels["owner"], "helm");
    assert_eq!(labels["name"], "cache");
    assert_eq!(labels["status"], "deployed");
    assert_eq!(labels["version"], "4");
    assert_eq!(secret.data["type"], helm::SECRET_TYPE);
    // Secret data is base64 of Helm's text, which is base64 of gzip.
    let outer = secret.data["data"]["release"].as_str().unwrap();
    let helm_text = STANDARD.decode(outer).unwrap();
    let gz = STANDARD.decode(&helm_text).unwrap();
    assert_eq!(&gz[..3], &helm::GZIP_MAGIC);
    let record = helm::read_record(&secret).unwrap().unwrap();
    assert_eq!(record.release, release);
    assert_eq!(record.driver, Driver::Secret);
}

#[test]
fn configmap_encoding_has_one_base64_layer() {
    let release = sample_release(1, "deployed");
    let cm = helm::configmap_record(&release).unwrap();
    let text = cm.data["data"]["release"].as_str().unwrap();
    assert_eq!(&STANDARD.decode(text).unwrap()[..3], &helm::GZIP_MAGIC);
    let record = helm::read_record(&cm).unwrap().unwrap();
    assert_eq!(record.driver, Driver::ConfigMap);
    assert_eq!(record.release, release);
}

#[test]
fn uncompressed_records_from_old_helm_are_accepted() {
    let release = sample_release(1, "deployed");
    let plain = STANDARD.encode(serde_json::to_vec(&release).unwrap());
    assert_eq!(helm::decode_release(&plain, "test").unwrap(), release);
}

#[test]
fn unknown_release_fields_survive_a_round_trip() {
    let json = serde_json::json!({"name": "x", "version": 1, "namespace": "n", "info": {"status": "deployed", "notes": "hi"},
        "labels": {"team": "a"}, "apply_method": "ssa"});
    let release: Release = serde_json::from_value(json.clone()).unwrap();
    let back = helm::decode_release(&helm::encode_release(&release).unwrap(), "t").unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), json);
}

#[test]
fn corrupt_records_fail_with_the_record_name() {
    match helm::decode_release("not base64!!", "shop/sh.helm.release.v1.x.v1") {
        Err(Error::HelmRecord { record, reason }) => {
            assert_eq!(record, "shop/sh.helm.release.v1.x.v1");
            assert!(reason.contains("base64"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let truncated_gzip = STANDARD.encode([0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 3, 1, 2]);
    assert!(
        matches!(helm::decode_release(&truncated_gzip, "r"), Err(Error::HelmRecord { reason, .. }) if reason.contains("gzip"))
    );
    let not_json = STANDARD.encode(b"{\"name\": ");
    assert!(
        matches!(helm::decode_release(&not_json, "r"), Err(Error::HelmRecord { reason, .. }) if reason.contains("JSON"))
    );
}

#[test]
fn release_resolves_to_its_objects_and_keeps_history() {
    let inventory = sample_inventory();
    let release = helm::release(&inventory, "shop", "db").unwrap();
    let resolved = helm::resolve(&inventory, &release).unwrap();
    let mut names: Vec<String> = resolved
        .objects
        .iter()
        .map(|k| {
            format!(
                "{}/{}/{}",
                k.kind,
                k.namespace.as_deref().unwrap_or(""),
                k.name
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ConfigMap/shop/db-postgresql-configuration",
            "Secret/shop/db-postgresql",
            "Service/shop/db-postgresql",
            "Service/shop/db-postgresql-hl",
            // created by the failed revision 3, still annotated as the release's
            "Service/shop/db-postgresql-metrics",
            "ServiceAccount/shop/db-postgresql",
            "StatefulSet/shop/db-postgresql",
        ]
    );
    assert!(resolved.missing.is_empty(), "{:?}", resolved.missing);
    let records: Vec<&ObjectRef> = release.record_refs().collect();
    assert_eq!(records.len(), 3);
}

#[test]
fn unknown_release_is_not_found() {
    let inventory = sample_inventory();
    assert!(
        matches!(helm::release(&inventory, "shop", "nope"), Err(Error::NotFound { what }) if what.contains("nope"))
    );
}

#[test]
fn configmap_driver_releases_are_found_and_resolved() {
    let mut objects: Vec<kube::api::DynamicObject> = Vec::new();
    let mut rev1 = sample_release(1, "superseded");
    rev1.manifest
        .push_str("---\napiVersion: v1\nkind: Service\nmetadata:\n  name: gone\n");
    let rev2 = sample_release(2, "deployed");
    objects.push(helm::configmap_record(&rev1).unwrap());
    objects.push(helm::configmap_record(&rev2).unwrap());
    objects.push(
        serde_json::from_value(serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cache-redis", "namespace": "shop"}, "data": {"a": "b"}}))
        .unwrap(),
    );
    let inventory = strata_discovery::Inventory::from_objects(objects, vec![]);
    let releases = helm::releases(&inventory, "shop");
    assert_eq!(releases.len(), 1);
    let release = &releases[0];
    assert_eq!(
        release.records.iter().map(|r| r.driver).collect::<Vec<_>>(),
        [Driver::ConfigMap, Driver::ConfigMap]
    );
    let resolved = helm::resolve(&inventory, release).unwrap();
    assert_eq!(
        resolved.objects.len(),
        1,
        "only the deployed revision's manifest counts"
    );
    assert_eq!(resolved.objects[0].name, "cache-redis");
    assert!(resolved.missing.is_empty());
}

#[test]
fn an_undecodable_record_is_kept_and_reported() {
    let mut broken = helm::secret_record(&sample_release(3, "failed")).unwrap();
    broken.data["data"]["release"] = serde_json::Value::String(STANDARD.encode("H4sI-not-really"));
    let good = helm::secret_record(&sample_release(2, "deployed")).unwrap();
    let inventory = strata_discovery::Inventory::from_objects(vec![good, broken], vec![]);
    let release = helm::release(&inventory, "shop", "cache").unwrap();
    assert_eq!(release.records.len(), 1);
    assert_eq!(release.undecodable.len(), 1);
    assert_eq!(release.undecodable[0].0.name, "sh.helm.release.v1.cache.v3");
    assert_eq!(
        release.record_refs().count(),
        2,
        "both records are backed up"
    );
}
