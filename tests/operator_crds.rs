//! The CRDs `strata crds` prints pass `kubernetes-validate` (the Kubernetes 1.33 schemas the
//! workspace's k8s-openapi feature targets), and the samples shipped in `deploy/samples`
//! validate against the CRDs' openAPIV3Schema.

mod strata_bin;
use strata_bin::strata_command as strata;
use strata_bin::{assert_valid_manifests, kubernetes_validate};

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

fn crds_text() -> String {
    let out = strata().arg("crds").output().expect("run strata crds");
    assert!(
        out.status.success(),
        "strata crds: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 YAML")
}

fn documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_str_multiple::<Value, _>(text).expect("YAML stream")
}

#[test]
fn strata_crds_prints_three_crds_that_pass_kubernetes_validate() {
    let text = crds_text();
    let docs = documents(&text);
    let names: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "targets.strata.io",
            "backups.strata.io",
            "restores.strata.io"
        ]
    );
    for doc in &docs {
        assert_eq!(doc["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(doc["spec"]["versions"][0]["name"], "v1alpha1");
    }
    assert_valid_manifests(&text, 3);

    // The validator does check: a CRD without its names is refused.
    let mut broken = docs[1].clone();
    broken["spec"]["names"] = json!({"plural": 7});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, serde_json::to_string(&broken).unwrap()).unwrap();
    assert!(!kubernetes_validate(&file).status.success());
}

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/samples")
}

fn sample(name: &str) -> Value {
    let text = std::fs::read_to_string(samples().join(name)).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// The errors of `object` against the openAPIV3Schema of the CRD of its kind.
fn schema_errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().expect("kind");
    let crd = strata::operator::crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD of kind {kind}"));
    let version = &crd.spec.versions[0];
    assert_eq!(
        object["apiVersion"],
        format!("{}/{}", crd.spec.group, version.name)
    );
    let schema = serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("openAPIV3Schema"),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn samples_validate_against_the_generated_schemas() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(samples()).unwrap() {
        let path = entry.unwrap().path();
        let object = sample(path.file_name().unwrap().to_str().unwrap());
        assert_eq!(schema_errors(&object), Vec::<String>::new(), "{path:?}");
        seen.push(object["kind"].as_str().unwrap().to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["Backup", "Restore", "Target"]);
}

#[test]
fn wrong_samples_are_refused_by_the_schemas() {
    let mut backup = sample("backup.yaml");
    backup["spec"]["mode"] = json!("Sometimes");
    backup["spec"]["retention"]["keepLast"] = json!(0);
    backup["spec"]["deletionPolicy"] = json!("Purge");
    let errors = schema_errors(&backup);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors.iter().any(|e| e.starts_with("/spec/deletionPolicy")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("/spec/mode")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("/spec/retention/keepLast")),
        "{errors:?}"
    );

    let mut restore = sample("restore.yaml");
    restore["spec"].as_object_mut().unwrap().remove("backupRef");
    let errors = schema_errors(&restore);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("backupRef"), "{errors:?}");

    let mut target = sample("target.yaml");
    target["spec"]["url"] = json!(42);
    assert_eq!(schema_errors(&target).len(), 1);
}
