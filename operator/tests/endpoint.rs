//! The controller's HTTP endpoint on a real socket: probes and metrics as a kubelet and a
//! Prometheus scraper see them.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use strata_operator::crd::{Backup, BackupStatus};
use strata_operator::endpoint::{Health, serve};
use strata_operator::leader::Attempt;
use strata_operator::metrics::{Kind, Metrics, Outcome};
use strata_operator::status::{Phase, Progress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `GET path` over HTTP/1.1: the status code and the body.
async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

async fn start() -> (std::net::SocketAddr, Arc<Metrics>, Arc<Health>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(&metrics));
    tokio::spawn(serve(listener, metrics.clone(), health.clone()));
    (address, metrics, health)
}

fn completed_backup() -> Backup {
    serde_json::from_value(json!({
        "apiVersion": "strata.io/v1alpha1", "kind": "Backup",
        "metadata": { "name": "shop-1", "namespace": "shop" },
        "spec": { "application": {}, "targetRef": { "name": "t" } },
        "status": {
            "phase": "Completed", "applicationName": "webshop",
            "conditions": [{ "type": "Committed", "status": "True", "reason": "Committed",
                             "message": "", "lastTransitionTime": "2026-11-25T10:00:00Z" }],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn probes_follow_leadership_and_the_watches() {
    let (address, _metrics, health) = start().await;
    assert_eq!(get(address, "/healthz").await.0, 200);
    let (code, body) = get(address, "/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "no successful election round yet\n")
    );
    health.election_round(Some(&Attempt::Leading));
    let (code, body) = get(address, "/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "leading, watches not started yet\n")
    );
    health.watches_started();
    assert_eq!(
        get(address, "/readyz").await,
        (200, "leading, watches started\n".into())
    );
    assert_eq!(get(address, "/nothing").await.0, 404);
}

#[tokio::test]
async fn a_standby_that_reached_the_api_server_is_ready_and_one_that_did_not_is_not() {
    let (address, metrics, health) = start().await;
    health.election_round(Some(&Attempt::HeldBy {
        holder: "other".into(),
    }));
    assert_eq!(get(address, "/readyz").await.0, 200);
    assert!(metrics.encode().contains("strata_controller_leader 0\n"));
    health.election_round(None);
    assert_eq!(get(address, "/readyz").await.0, 503);
}

#[tokio::test]
async fn metrics_carry_help_and_type_lines_and_the_counts_of_a_reconcile() {
    let (address, metrics, health) = start().await;
    health.set_leading(true);
    // A reconcile that moved a Backup from nothing to Completed, and one that failed.
    metrics.reconciled(Kind::Backup, Outcome::Success, Duration::from_millis(30));
    metrics.reconciled(Kind::Restore, Outcome::Error, Duration::from_secs(1));
    let after = BackupStatus {
        phase: Some(Phase::Completed),
        progress: Some(Progress {
            volumes_done: 2,
            volumes_total: 2,
            bytes_done: 3 << 30,
            bytes_total: 3 << 30,
        }),
        ..BackupStatus::default()
    };
    metrics.backup_status_written(&BackupStatus::default(), &after);
    // Written again unchanged (a repeated status write): counted once.
    metrics.backup_status_written(&after, &after);
    metrics.backup_seen(&completed_backup());
    let (code, text) = get(address, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "# HELP strata_reconciles Reconciles by kind and outcome.",
        "# TYPE strata_reconciles counter",
        "strata_reconciles_total{kind=\"Backup\",outcome=\"Success\"} 1",
        "strata_reconciles_total{kind=\"Restore\",outcome=\"Error\"} 1",
        "# TYPE strata_reconcile_duration_seconds histogram",
        "strata_reconcile_duration_seconds_bucket{le=\"0.04\",kind=\"Backup\"} 1",
        "strata_reconcile_duration_seconds_bucket{le=\"0.01\",kind=\"Backup\"} 0",
        "strata_reconcile_duration_seconds_count{kind=\"Restore\"} 1",
        "# TYPE strata_backups counter",
        "strata_backups_total{event=\"Attempted\"} 1",
        "strata_backups_total{event=\"Succeeded\"} 1",
        "strata_backup_volume_bytes_total 3221225472",
        "# TYPE strata_last_successful_backup_timestamp_seconds gauge",
        "strata_last_successful_backup_timestamp_seconds{namespace=\"shop\",application=\"webshop\"} 1795600800",
        "# TYPE strata_controller_leader gauge",
        "strata_controller_leader 1",
        "# EOF",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    assert!(!text.contains("event=\"Failed\""), "{text}");
}

#[tokio::test]
async fn an_older_completed_backup_does_not_move_the_last_success_back() {
    let metrics = Metrics::new();
    metrics.backup_seen(&completed_backup());
    let mut older = completed_backup();
    older.status.as_mut().unwrap().conditions[0].last_transition_time =
        "2026-11-24T10:00:00Z".into();
    metrics.backup_seen(&older);
    assert!(
        metrics
            .encode()
            .contains("application=\"webshop\"} 1795600800\n")
    );
}

#[tokio::test(start_paused = true)]
async fn liveness_fails_once_the_election_loop_stops_beating() {
    let metrics = Metrics::new();
    let health = Health::new(&metrics);
    assert!(
        health.live().is_ok(),
        "no loop registered yet: the server answering is enough"
    );
    health.beat(Duration::from_secs(30));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(health.live().is_ok());
    tokio::time::advance(Duration::from_secs(1)).await;
    let err = health.live().unwrap_err();
    assert!(err.starts_with("no election round for 31s"), "{err}");
    health.beat(Duration::from_secs(30));
    assert!(health.live().is_ok());
}
