//! Tests against a real cluster, run when `KUBECONFIG` points at one:
//! `cargo test -p strata-discovery --test cluster -- --ignored`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use strata_discovery::{Inventory, LiveSource, ObjectSource};

#[tokio::test]
#[ignore = "needs a cluster"]
async fn discovers_kinds_and_lists_kube_system() {
    let client = kube::Client::try_default()
        .await
        .expect("kubeconfig or in-cluster config");
    let source = LiveSource::new(client);
    let kinds = source.kinds().await.unwrap();
    assert!(
        kinds
            .iter()
            .any(|k| k.group == "apps" && k.kind == "Deployment" && k.namespaced)
    );
    assert!(
        kinds
            .iter()
            .any(|k| k.group.is_empty() && k.kind == "Namespace" && !k.namespaced)
    );
    let inventory = Inventory::collect(&source, &["kube-system".to_owned()])
        .await
        .unwrap();
    assert!(
        inventory
            .objects()
            .iter()
            .any(|o| o.metadata.namespace.as_deref() == Some("kube-system"))
    );
    assert!(
        !inventory
            .objects()
            .iter()
            .any(|o| o.types.as_ref().is_some_and(|t| t.kind == "Event"))
    );
}
