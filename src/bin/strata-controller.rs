//! `strata-controller`: the Backup and Restore controller, a thin `main` around
//! `strata::operator::controller::run`, with leader election (`strata::operator::leader`) and
//! an HTTP endpoint for probes and metrics (`strata::operator::endpoint`).
//!
//! Runs in the cluster (service account credentials) or outside it (`KUBECONFIG`):
//!
//! ```text
//! cargo run --features cli,kubernetes --bin strata-controller -- \
//!     --datamover-image registry.example/strata:0.1.0
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::Client;
use strata::operator::leader::{self, Elector, LeaderElection};
use strata::operator::policy::{GroupResource, NamespaceGrant};
use strata::operator::{controller, endpoint};

/// Reconcile strata.io Backups and Restores.
#[derive(Parser)]
#[command(name = "strata-controller", version, about)]
struct Args {
    /// Image of the datamover Jobs (it must contain the `strata` binary).
    #[arg(long)]
    datamover_image: String,
    /// Service account of the datamover pods (the namespace default when absent).
    #[arg(long)]
    datamover_service_account: Option<String>,
    /// Watch only this namespace (all namespaces when absent).
    #[arg(long)]
    namespace: Option<String>,
    /// Seconds between looks at what no watch reports (a restored claim's binding).
    #[arg(long, default_value_t = 5)]
    poll_seconds: u64,
    /// Seconds after which a run waiting for a watched change (its snapshots, Jobs, claims,
    /// another Backup) is looked at anyway: a safety net against a missed event.
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
    /// At most this many datamover pods on one node at once, across all runs (0: no bound).
    #[arg(long, default_value_t = 2)]
    max_datamovers_per_node: usize,
    /// This cluster's name in every target's layout (a DNS label), so clusters sharing a target
    /// keep apart; by default the uid of the `kube-system` namespace, which lives as long as
    /// the cluster.
    #[arg(long)]
    cluster_id: Option<String>,
    /// Write at each target's URL itself, with no cluster part (the layout of earlier
    /// versions, for a target only this cluster uses).
    #[arg(long, conflicts_with = "cluster_id")]
    no_cluster_id: bool,
    /// Accept folder Targets without an NFS export (a controller and datamovers on one
    /// machine; never in a cluster).
    #[arg(long)]
    allow_host_folder_targets: bool,
    /// Reconcile only while holding the leader Lease, so that replicas do not race.
    #[arg(long)]
    leader_elect: bool,
    /// Namespace of the leader Lease (`POD_NAMESPACE`, else the client's namespace).
    #[arg(long)]
    leader_election_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, default_value = leader::DEFAULT_LEASE_NAME)]
    lease_name: String,
    /// Seconds after the leader's last renewal before another replica may take over.
    #[arg(long, default_value_t = leader::DEFAULT_LEASE_DURATION.as_secs())]
    lease_duration_seconds: u64,
    /// Seconds the leader keeps trying to renew before it stops (and exits).
    #[arg(long, default_value_t = leader::DEFAULT_RENEW_DEADLINE.as_secs())]
    renew_deadline_seconds: u64,
    /// Seconds between two attempts to acquire or renew the Lease.
    #[arg(long, default_value_t = leader::DEFAULT_RETRY_PERIOD.as_secs())]
    retry_period_seconds: u64,
    /// A kind Restores may create besides the usual application kinds (`RESOURCE.GROUP`, as
    /// RBAC names it; repeat for each). The controller's ClusterRole must grant it too.
    #[arg(long = "restore-kind", value_name = "RESOURCE.GROUP")]
    restore_kinds: Vec<GroupResource>,
    /// Let Restores in namespace FROM write into namespace INTO (a name, a prefix ending in
    /// `*`, or `*`); by default a Restore writes only into its own namespace (repeat for each).
    #[arg(long = "restore-into", value_name = "FROM=INTO")]
    restore_into: Vec<NamespaceGrant>,
    /// Address of the HTTP endpoint: /healthz, /readyz, /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_bind_address: SocketAddr,
}

/// SIGTERM (what the kubelet sends) or Ctrl-C.
async fn terminated() {
    let sigterm = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = sigterm => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::try_default().await?;
    let mut ctx = strata::operator_context(client.clone(), args.datamover_image);
    ctx.datamover_service_account = args.datamover_service_account;
    ctx.poll = Duration::from_secs(args.poll_seconds.max(1));
    ctx.resync = Duration::from_secs(args.resync_seconds.max(1));
    ctx.max_datamovers_per_node = args.max_datamovers_per_node;
    ctx.host_folder_targets = args.allow_host_folder_targets;
    ctx.restore_policy.kinds.extend(args.restore_kinds);
    ctx.restore_policy.namespaces = args.restore_into;
    ctx.cluster_id = match (args.cluster_id, args.no_cluster_id) {
        (_, true) => None,
        (Some(id), false) => Some(id),
        (None, false) => Some(strata::operator::cluster_uid(&client).await?),
    };
    let listener = tokio::net::TcpListener::bind(args.metrics_bind_address)
        .await
        .with_context(|| format!("binding {}", args.metrics_bind_address))?;
    let server = endpoint::serve(listener, ctx.metrics.clone(), ctx.health.clone());
    tokio::spawn(async move {
        if let Err(err) = server.await {
            eprintln!("HTTP endpoint: {err}");
        }
    });
    let namespace = args.namespace.as_deref();
    if !args.leader_elect {
        ctx.health.set_leading(true);
        controller::run(ctx, namespace).await;
        return Ok(());
    }
    let lease_namespace = args
        .leader_election_namespace
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty())
        })
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let mut settings = LeaderElection::new(lease_namespace, leader::identity());
    settings.lease_name = args.lease_name;
    settings.lease_duration = Duration::from_secs(args.lease_duration_seconds);
    settings.renew_deadline = Duration::from_secs(args.renew_deadline_seconds);
    settings.retry_period = Duration::from_secs(args.retry_period_seconds);
    let mut elector = Elector::new(client, settings)?.with_health(ctx.health.clone());
    let identity = elector.settings().identity.clone();
    tokio::select! {
        () = elector.acquire() => {}
        // A standby asked to stop has nothing to hand over.
        () = terminated() => return Ok(()),
    }
    eprintln!("leading as {identity}");
    match elector.while_leading(controller::run(ctx, namespace)).await {
        // The run loop stopped on SIGTERM: hand the Lease over at once, so the successor does
        // not wait for it to expire.
        Ok(()) => {
            match elector.release().await {
                Ok(_) => eprintln!("released the leader Lease"),
                Err(err) => eprintln!("releasing the leader Lease: {err}"),
            }
            Ok(())
        }
        // The Lease is lost: another replica may already be reconciling. `while_leading` has
        // dropped the run loop; exiting (non-zero, so the Deployment restarts this pod as a
        // fresh candidate) also ends whatever it had spawned, and starts the next term with
        // fresh watch caches rather than a half-stopped controller.
        Err(lost) => {
            eprintln!("{lost}");
            std::process::exit(1);
        }
    }
}
