//! Against a real cluster (`KUBECONFIG`): the CRDs install and are served, and the samples are
//! accepted by the API server's own validation (server-side dry run).
//!
//! ```text
//! KUBECONFIG=~/.kube/config cargo test --test operator_cluster -- --ignored
//! ```

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use serde_json::Value;

async fn client() -> Client {
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

#[tokio::test]
#[ignore = "needs a cluster"]
async fn crds_install_and_samples_pass_server_validation() {
    let client = client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("strata-test").force();
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
            &PatchParams::apply("strata-test").dry_run(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|e| panic!("{sample} refused by the API server: {e}"));
    }
}
