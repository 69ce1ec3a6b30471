//! `strata-controller`: the Backup and Restore controller, a thin `main` around
//! `strata::operator::controller::run`.
//!
//! Runs in the cluster (service account credentials) or outside it (`KUBECONFIG`):
//!
//! ```text
//! cargo run --features cli,kubernetes --bin strata-controller -- \
//!     --datamover-image registry.example/strata:0.1.0
//! ```

use std::time::Duration;

use clap::Parser;
use kube::Client;

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
    /// Seconds between looks at snapshots and Jobs in progress.
    #[arg(long, default_value_t = 5)]
    poll_seconds: u64,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::try_default().await?;
    let client_for_id = client.clone();
    let mut ctx = strata::operator_context(client, args.datamover_image);
    ctx.datamover_service_account = args.datamover_service_account;
    ctx.poll = Duration::from_secs(args.poll_seconds.max(1));
    ctx.host_folder_targets = args.allow_host_folder_targets;
    ctx.cluster_id = match (args.cluster_id, args.no_cluster_id) {
        (_, true) => None,
        (Some(id), false) => Some(id),
        (None, false) => Some(strata::operator::cluster_uid(&client_for_id).await?),
    };
    strata::operator::controller::run(ctx, args.namespace.as_deref()).await;
    Ok(())
}
