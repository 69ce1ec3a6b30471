//! Target health (issue 16, deliverable 3): the controller opens each Target, reads its
//! repository and writes a probe, and says what it found in the Target's status.

mod kube_mock;

use std::io::Write;

use kube_mock::Mock;
use serde_json::json;
use strata::operator::crd::{Target as TargetResource, TargetStatus};
use strata::operator::reconcile_target;
use strata::target::{Target, VolumeName};

const TARGET: &str = "/apis/strata.io/v1alpha1/namespaces/shop/targets/local";

fn with_url(url: &str) -> Mock {
    let mock = Mock::default();
    mock.put(
        TARGET,
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Target",
               "metadata": {"name": "local", "namespace": "shop", "generation": 2},
               "spec": {"url": url}}),
    );
    mock
}

async fn checked(mock: &Mock, ctx: &strata::operator::Context) -> TargetStatus {
    let target: TargetResource = serde_json::from_value(mock.get(TARGET).unwrap()).unwrap();
    let action = reconcile_target(&target, ctx).await.unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(ctx.target_check_interval)
    );
    let stored: TargetResource = serde_json::from_value(mock.get(TARGET).unwrap()).unwrap();
    stored.status.expect("a status")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_target_is_reachable_writable_and_counts_its_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("target");
    let mock = with_url(folder.to_str().unwrap());
    let mut ctx = mock.context();
    // Check on every call: these tests change the world between checks.
    ctx.target_check_interval = std::time::Duration::ZERO;
    let status = checked(&mock, &ctx).await;
    assert_eq!(status.reachable, Some(true), "{status:?}");
    assert_eq!(status.writable, Some(true), "{status:?}");
    assert_eq!(status.format.as_deref(), Some("strata-target/1"));
    assert_eq!(status.volumes, Some(0));
    assert_eq!(status.observed_generation, Some(2));
    assert!(status.last_check.is_some() && status.message.is_none());
    assert!(
        std::fs::read_dir(folder.join("probes"))
            .unwrap()
            .next()
            .is_none(),
        "the probe is deleted"
    );

    let mut device = tempfile::NamedTempFile::new().unwrap();
    device.write_all(&[7u8; 1 << 16]).unwrap();
    let target = Target::open(folder.to_str().unwrap()).unwrap();
    let folder_clone = folder.clone();
    tokio::task::spawn_blocking(move || {
        strata::backup_volume(
            &target,
            &VolumeName::new("shop.data").unwrap(),
            &strata::open_volume(device.path()).unwrap(),
            &Default::default(),
            &mut |_| {},
        )
        .unwrap();
        drop(folder_clone);
    })
    .await
    .unwrap();
    assert_eq!(checked(&mock, &ctx).await.volumes, Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_refusing_writes_is_reachable_but_not_writable() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("target");
    let mock = with_url(folder.to_str().unwrap());
    let mut ctx = mock.context();
    // Check on every call: these tests change the world between checks.
    ctx.target_check_interval = std::time::Duration::ZERO;
    assert_eq!(checked(&mock, &ctx).await.writable, Some(true));
    // A file where the probes go: no write can succeed there, not even root's.
    let _ = std::fs::remove_dir(folder.join("probes"));
    std::fs::write(folder.join("probes"), b"in the way").unwrap();
    let status = checked(&mock, &ctx).await;
    assert_eq!(status.reachable, Some(true), "{status:?}");
    assert_eq!(status.writable, Some(false), "{status:?}");
    let message = status.message.unwrap();
    assert!(message.contains("write a probe"), "{message}");
    // Writable again: the message of the failed check goes (a merge patch naming no message
    // would keep it).
    std::fs::remove_file(folder.join("probes")).unwrap();
    let status = checked(&mock, &ctx).await;
    assert_eq!(status.writable, Some(true), "{status:?}");
    assert_eq!(status.message, None, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_target_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let mock = with_url(blocker.join("target").to_str().unwrap());
    let mut ctx = mock.context();
    // Check on every call: these tests change the world between checks.
    ctx.target_check_interval = std::time::Duration::ZERO;
    let status = checked(&mock, &ctx).await;
    assert_eq!(status.reachable, Some(false), "{status:?}");
    assert_eq!(status.writable, None);
    assert!(status.message.unwrap().contains("a-file"));

    // In a cluster a folder Target needs the NFS export that brings it to the pods.
    let mut cluster = ctx.clone();
    cluster.host_folder_targets = false;
    let status = checked(&mock, &cluster).await;
    assert_eq!(status.reachable, Some(false));
    assert!(status.message.unwrap().contains("spec.nfs"));
}

/// The status write is a change the controller's watch reports: a fresh check of the same
/// generation is not repeated (no write, no probe) until the interval is up.
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_check_is_not_repeated_when_its_own_write_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mock = with_url(dir.path().join("target").to_str().unwrap());
    let ctx = mock.context();
    checked(&mock, &ctx).await;
    let writes = |mock: &Mock| {
        mock.requests()
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.ends_with("/targets/local/status"))
            .count()
    };
    assert_eq!(writes(&mock), 1);
    let target: TargetResource = serde_json::from_value(mock.get(TARGET).unwrap()).unwrap();
    let action = reconcile_target(&target, &ctx).await.unwrap();
    assert_eq!(writes(&mock), 1, "no second check");
    // Looks again later (at most one interval on), not at once and not never.
    use kube::runtime::controller::Action;
    assert_ne!(action, Action::await_change());
    assert_ne!(action, Action::requeue(std::time::Duration::ZERO));
}
