//! The controller's HTTP endpoint (`--metrics-bind-address`, `0.0.0.0:8080` by default), on
//! hyper 1's HTTP/1 server:
//!
//! - `/healthz`, the liveness probe: 200 while the process's loop is alive, that is while this
//!   server answers and, with leader election, the elector has run a round recently (within
//!   twice the lease duration); 500 otherwise, so the kubelet restarts a wedged process.
//! - `/readyz`, the readiness probe: 200 when the replica does its part. The leader (or the
//!   controller without election) is ready once its watches have started; a standby once its
//!   last election round reached the API server and found a live leader. 503 before that,
//!   with the reason as the body.
//! - `/metrics`: [`Metrics`] in the OpenMetrics text format.
//!
//! A standby counts as ready so that `kubectl rollout status` and a rolling update of a
//! two-replica Deployment finish: were only the leader ready, a Deployment could never have
//! all its replicas available, so the rollout would never complete and kube-prometheus'
//! `KubeDeploymentReplicasMismatch` would fire forever.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::leader::Attempt;
use crate::metrics::Metrics;

/// What the probes report: whether the loop is alive and the replica ready.
#[derive(Debug)]
pub struct Health {
    leader: Gauge,
    leading: AtomicBool,
    standby: AtomicBool,
    watching: AtomicBool,
    /// The last heartbeat and how old it may get.
    heartbeat: Mutex<Option<(Instant, Duration)>>,
}

impl Health {
    /// Not leading, not watching, no heartbeat yet; the leader gauge is `metrics`'.
    pub fn new(metrics: &Metrics) -> Self {
        Health {
            leader: metrics.leader().clone(),
            leading: AtomicBool::new(false),
            standby: AtomicBool::new(false),
            watching: AtomicBool::new(false),
            heartbeat: Mutex::new(None),
        }
    }

    /// This replica leads (or runs without election, which is leading alone) or not.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
        self.leader.set(i64::from(leading));
    }

    /// An election round ended: `Some(attempt)`, or `None` when it failed on an API error.
    pub fn election_round(&self, attempt: Option<&Attempt>) {
        match attempt {
            Some(Attempt::Leading) => {
                self.set_leading(true);
                self.standby.store(false, Ordering::SeqCst);
            }
            Some(Attempt::HeldBy { .. }) => {
                self.set_leading(false);
                self.standby.store(true, Ordering::SeqCst);
            }
            // A conflict changes nothing yet; a failed call makes a standby unready, while a
            // leader keeps leading until its renew deadline.
            Some(Attempt::Conflict) => {}
            None => self.standby.store(false, Ordering::SeqCst),
        }
    }

    /// The controllers' watches have listed their resources.
    pub fn watches_started(&self) {
        self.watching.store(true, Ordering::SeqCst);
    }

    /// The loop is alive; it must beat again within `stale_after`.
    pub fn beat(&self, stale_after: Duration) {
        let mut heartbeat = self.heartbeat.lock().unwrap_or_else(|p| p.into_inner());
        *heartbeat = Some((Instant::now(), stale_after));
    }

    /// `Ok` when alive, else why not.
    pub fn live(&self) -> Result<(), String> {
        let heartbeat = *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner());
        match heartbeat {
            Some((at, stale_after)) if at.elapsed() > stale_after => Err(format!(
                "no election round for {:?} (allowed {stale_after:?})",
                at.elapsed()
            )),
            _ => Ok(()),
        }
    }

    /// `Ok` when ready, else why not.
    pub fn ready(&self) -> Result<&'static str, &'static str> {
        if self.leading.load(Ordering::SeqCst) {
            if self.watching.load(Ordering::SeqCst) {
                Ok("leading, watches started")
            } else {
                Err("leading, watches not started yet")
            }
        } else if self.standby.load(Ordering::SeqCst) {
            Ok("standing by, another replica leads")
        } else {
            Err("no successful election round yet")
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

const PLAIN: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn route(request: &Request<Incoming>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "GET only\n".to_owned(),
        );
    }
    match request.uri().path() {
        "/healthz" => match health.live() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ok\n".to_owned()),
            Err(why) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{why}\n")),
        },
        "/readyz" => match health.ready() {
            Ok(why) => text(StatusCode::OK, PLAIN, format!("{why}\n")),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{why}\n")),
        },
        "/metrics" => text(StatusCode::OK, OPENMETRICS, metrics.encode()),
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".to_owned()),
    }
}

/// Serve `/healthz`, `/readyz` and `/metrics` on `listener` until the future is dropped; each
/// connection is served on its own task. Fails only if accepting fails.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    loop {
        let (stream, _peer) = listener.accept().await?;
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = route(&request, &metrics, &health);
                async move { Ok::<_, Infallible>(response) }
            });
            // A client that hangs up mid-request is its own problem.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
