//! Leader election against an in-memory Lease API server that enforces resourceVersion
//! preconditions, on tokio's paused clock: time moves only when every task waits, so nothing
//! here depends on how fast the machine is.

mod lease_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use lease_server::LeaseServer;
use serde_json::{Value, json};
use strata_operator::leader::{Attempt, Clock, Elector, LeaderElection, LeaderError, LostCause};

const KEY: &str = "strata-system/strata-controller";

fn elector(server: &LeaseServer, clock: Clock, identity: &str) -> Elector {
    Elector::new(
        server.client(),
        LeaderElection::new("strata-system", identity),
    )
    .unwrap()
    .with_clock(clock)
}

fn micro(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn lease_held_by(holder: &str, renewed: Timestamp, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "strata-controller", "namespace": "strata-system" },
        "spec": {
            "holderIdentity": holder, "leaseDurationSeconds": 15,
            "acquireTime": micro(renewed), "renewTime": micro(renewed),
            "leaseTransitions": transitions,
        },
    })
}

fn holder(server: &LeaseServer) -> Value {
    server.lease(KEY).unwrap()["spec"]["holderIdentity"].clone()
}

#[tokio::test(start_paused = true)]
async fn two_electors_racing_to_create_the_lease_exactly_one_leads() {
    let server = LeaseServer::default();
    let clock = Clock::tokio();
    let (mut a, mut b) = (elector(&server, clock, "a"), elector(&server, clock, "b"));
    // Both read "absent" before either writes.
    server.hold_gets_until(2);
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let outcomes = [&ra, &rb];
    assert_eq!(
        outcomes.iter().filter(|r| ***r == Attempt::Leading).count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|r| ***r == Attempt::Conflict)
            .count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(server.conflicts(), 1);
    let (winner, mut loser) = if ra == Attempt::Leading {
        ("a", b)
    } else {
        ("b", a)
    };
    assert_eq!(holder(&server), winner);
    assert_eq!(server.lease(KEY).unwrap()["spec"]["leaseTransitions"], 0);
    server.hold_gets_until(1);
    assert_eq!(
        loser.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy {
            holder: winner.to_owned()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn two_electors_racing_to_take_over_an_expired_lease_exactly_one_leads() {
    let server = LeaseServer::default();
    let clock = Clock::tokio();
    server.put(KEY, lease_held_by("gone", clock.now(), 7));
    tokio::time::advance(Duration::from_secs(60)).await;
    let (mut a, mut b) = (elector(&server, clock, "a"), elector(&server, clock, "b"));
    server.hold_gets_until(2);
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let mut outcomes = [ra.unwrap(), rb.unwrap()];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(outcomes, [Attempt::Conflict, Attempt::Leading]);
    let spec = &server.lease(KEY).unwrap()["spec"];
    assert!(
        spec["holderIdentity"] == "a" || spec["holderIdentity"] == "b",
        "{spec}"
    );
    // One takeover, counted once.
    assert_eq!(spec["leaseTransitions"], 8);
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_renew_time_is_stale_is_taken_over_and_transitions_increment() {
    let server = LeaseServer::default();
    let clock = Clock::tokio();
    server.put(KEY, lease_held_by("old", clock.now(), 3));
    let mut b = elector(&server, clock, "new");
    tokio::time::advance(Duration::from_secs(14)).await;
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy {
            holder: "old".into()
        },
        "14 s after the renewal, a 15 s lease is live"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    let lease = server.lease(KEY).unwrap();
    let spec = &lease["spec"];
    assert_eq!(spec["holderIdentity"], "new");
    assert_eq!(spec["leaseTransitions"], 4);
    assert_eq!(spec["leaseDurationSeconds"], 15);
    assert_eq!(spec["acquireTime"], spec["renewTime"]);
    let acquired: Timestamp = spec["acquireTime"].as_str().unwrap().parse().unwrap();
    assert!(
        acquired.duration_since(clock.now()).abs()
            < k8s_openapi::jiff::SignedDuration::from_millis(1)
    );
    // Renewing keeps acquireTime and the transition count.
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    let renewed = server.lease(KEY).unwrap();
    assert_eq!(renewed["spec"]["acquireTime"], spec["acquireTime"]);
    assert_ne!(renewed["spec"]["renewTime"], spec["renewTime"]);
    assert_eq!(renewed["spec"]["leaseTransitions"], 4);
}

#[tokio::test(start_paused = true)]
async fn a_live_holder_is_not_taken_over() {
    let server = LeaseServer::default();
    let clock = Clock::tokio();
    let mut a = elector(&server, clock, "a");
    let mut b = elector(&server, clock, "b");
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    // a renews every 2 s; b tries for a minute and never gets it.
    for _ in 0..30 {
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
        assert_eq!(
            b.try_acquire_or_renew().await.unwrap(),
            Attempt::HeldBy { holder: "a".into() }
        );
    }
    assert_eq!(holder(&server), "a");
    assert_eq!(server.lease(KEY).unwrap()["spec"]["leaseTransitions"], 0);
    assert_eq!(server.conflicts(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_write_with_a_stale_resource_version_loses_with_409() {
    let server = LeaseServer::default();
    let clock = Clock::tokio();
    let mut a = elector(&server, clock, "a");
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    // The server itself: a replace carrying an old resourceVersion is refused.
    let api: Api<Lease> = Api::namespaced(server.client(), "strata-system");
    let mut stale = api.get("strata-controller").await.unwrap();
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    stale.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
    let err = api
        .replace("strata-controller", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "{err}"
    );
    assert_eq!(holder(&server), "a");
    // The elector: another writer gets in between its read and its write.
    server.before_next_put(|lease| lease["spec"]["holderIdentity"] = json!("intruder"));
    let version = server.lease(KEY).unwrap()["metadata"]["resourceVersion"].clone();
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Conflict);
    let lease = server.lease(KEY).unwrap();
    assert_eq!(
        lease["spec"]["holderIdentity"], "intruder",
        "a's write must not land"
    );
    assert_ne!(lease["metadata"]["resourceVersion"], version);
    assert_eq!(server.conflicts(), 2);
    // Its next round reads the Lease again and sees the other holder.
    assert_eq!(
        a.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy {
            holder: "intruder".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn release_clears_the_holder_and_a_second_elector_acquires_at_once() {
    let server = LeaseServer::default();
    let clock = Clock::tokio();
    let mut a = elector(&server, clock, "a");
    let mut b = elector(&server, clock, "b");
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy { holder: "a".into() }
    );
    // b may not release what a holds.
    assert!(!b.release().await.unwrap());
    assert_eq!(holder(&server), "a");
    assert!(a.release().await.unwrap());
    assert!(holder(&server).is_null(), "{}", server.lease(KEY).unwrap());
    // No time passes: b need not wait for the lease to expire.
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    let spec = &server.lease(KEY).unwrap()["spec"];
    assert_eq!(spec["holderIdentity"], "b");
    assert_eq!(spec["leaseTransitions"], 1);
    assert_eq!(
        a.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy { holder: "b".into() }
    );
}

/// `elector.while_leading(work)`, failing the test (rather than spinning on the paused clock)
/// if the Lease is not lost within ten virtual minutes.
async fn lead_until_lost(elector: &mut Elector, work: impl Future<Output = ()>) -> LeaderError {
    tokio::time::timeout(Duration::from_secs(600), elector.while_leading(work))
        .await
        .expect("the Lease was never lost")
        .expect_err("the work never finishes")
}

/// A future that never finishes and records whether it was dropped.
fn work_until_dropped(dropped: Arc<AtomicBool>) -> impl Future<Output = ()> {
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let guard = SetOnDrop(dropped);
    async move {
        let _guard = guard;
        std::future::pending::<()>().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_lease_is_taken_stops_with_a_lost_lease_error() {
    let server = LeaseServer::default();
    let clock = Clock::tokio();
    let mut a = elector(&server, clock, "a");
    a.acquire().await;
    let dropped = Arc::new(AtomicBool::new(false));
    let usurp = {
        let server = server.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let mut lease = server.lease(KEY).unwrap();
            lease["spec"]["holderIdentity"] = json!("usurper");
            server.put(KEY, lease);
        }
    };
    let started = tokio::time::Instant::now();
    let (err, ()) = tokio::join!(
        lead_until_lost(&mut a, work_until_dropped(dropped.clone())),
        usurp
    );
    assert!(
        matches!(&err, LeaderError::Lost { cause: LostCause::TakenBy { holder }, .. } if holder == "usurper"),
        "{err}"
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the leader's work must be stopped"
    );
    // Renewals at 2 s and 4 s; the one at 6 s conflicts, the one at 8 s sees the new holder.
    assert_eq!(started.elapsed(), Duration::from_secs(8));
    assert_eq!(
        err.to_string(),
        "lost the leader Lease strata-system/strata-controller: usurper holds it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_stops_before_its_lease_expires() {
    let server = LeaseServer::default();
    let clock = Clock::tokio();
    let mut a = elector(&server, clock, "a");
    a.acquire().await;
    let dropped = Arc::new(AtomicBool::new(false));
    let outage = {
        let server = server.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(4500)).await;
            server.refuse_writes(true);
        }
    };
    let started = tokio::time::Instant::now();
    let (err, ()) = tokio::join!(
        lead_until_lost(&mut a, work_until_dropped(dropped.clone())),
        outage
    );
    assert!(
        matches!(&err, LeaderError::Lost { cause: LostCause::RenewDeadline { deadline }, .. }
            if *deadline == Duration::from_secs(10)),
        "{err}"
    );
    assert!(dropped.load(Ordering::SeqCst));
    // The last renewal was at 4 s; the deadline is 10 s after it.
    assert_eq!(started.elapsed(), Duration::from_secs(14));
    // It stopped before anyone may take over: the stored renewTime plus the lease duration
    // is still in the future.
    let renewed: Timestamp = server.lease(KEY).unwrap()["spec"]["renewTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let expires = renewed.checked_add(Duration::from_secs(15)).unwrap();
    assert!(
        clock.now() < expires,
        "stopped at {} but the lease expired at {expires}",
        clock.now()
    );
    let mut b = elector(&server, clock, "b");
    server.refuse_writes(false);
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy { holder: "a".into() }
    );
    tokio::time::sleep_until(started + Duration::from_secs(4 + 15)).await;
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
}

#[tokio::test(start_paused = true)]
async fn work_that_finishes_while_leading_returns_its_output() {
    let server = LeaseServer::default();
    let mut a = elector(&server, Clock::tokio(), "a");
    a.acquire().await;
    let output = a
        .while_leading(async {
            tokio::time::sleep(Duration::from_secs(7)).await;
            42
        })
        .await
        .unwrap();
    assert_eq!(output, 42);
    // It renewed meanwhile (at 2, 4 and 6 s): the Lease was written four times in all.
    assert_eq!(
        server.lease(KEY).unwrap()["metadata"]["resourceVersion"],
        "4"
    );
}

#[test]
fn settings_that_break_client_go_rules_are_refused() {
    let mut settings = LeaderElection::new("ns", "me");
    assert!(settings.validate().is_ok());
    settings.renew_deadline = settings.lease_duration;
    let err = settings.validate().unwrap_err();
    assert_eq!(
        err.to_string(),
        "leader election settings: the lease duration must be longer than the renew deadline"
    );
    settings = LeaderElection::new("ns", "me");
    settings.retry_period = settings.renew_deadline;
    assert!(matches!(
        settings.validate(),
        Err(LeaderError::Settings { .. })
    ));
    settings = LeaderElection::new("ns", "");
    assert!(matches!(
        settings.validate(),
        Err(LeaderError::Settings { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_elector_reports_its_rounds_to_the_probes_and_the_leader_gauge() {
    let server = LeaseServer::default();
    let clock = Clock::tokio();
    let metrics = strata_operator::metrics::Metrics::new();
    let health = Arc::new(strata_operator::endpoint::Health::new(&metrics));
    let mut a = elector(&server, clock, "a").with_health(health.clone());
    let mut b = elector(&server, clock, "b");
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    assert_eq!(
        a.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy { holder: "b".into() }
    );
    assert_eq!(health.ready(), Ok("standing by, another replica leads"));
    assert!(metrics.encode().contains("strata_controller_leader 0\n"));
    assert!(b.release().await.unwrap());
    a.acquire().await;
    assert_eq!(health.ready(), Err("leading, watches not started yet"));
    assert!(metrics.encode().contains("strata_controller_leader 1\n"));
    // The loop beats each round: alive 2 lease durations after the last one, not later.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(health.live().is_ok());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(health.live().is_err());
    let mut lease = server.lease(KEY).unwrap();
    // b takes it over with a fresh renewal (an expired one a would take back).
    lease["spec"]["holderIdentity"] = json!("b");
    lease["spec"]["renewTime"] = json!(micro(clock.now()));
    server.put(KEY, lease);
    let err = lead_until_lost(&mut a, std::future::pending()).await;
    assert!(matches!(err, LeaderError::Lost { .. }), "{err}");
    assert!(metrics.encode().contains("strata_controller_leader 0\n"));
    assert!(health.live().is_ok());
}
