//! `controller`: the Backup and Restore controller, a thin kube-runtime wrapper around
//! `strata::operator::{reconcile_backup, reconcile_restore}`.
//!
//! Runs in the cluster (service account credentials) or outside it (`KUBECONFIG`):
//!
//! ```text
//! cargo run --example controller -- --datamover-image registry.example/strata:0.1.0
//! ```

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client};
use strata::operator::crd::{Backup, Restore};
use strata::operator::reconcile::error_chain;
use strata::operator::{Context, Error, reconcile_backup, reconcile_restore};

/// Reconcile strata.io Backups and Restores.
#[derive(Parser)]
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
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Transient errors (the API server, the target) are retried after a pause.
fn retry<K>(_object: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    eprintln!("retrying: {}", error_chain(err));
    Action::requeue(ctx.poll * 2)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::try_default().await?;
    let mut ctx = Context::new(client.clone(), args.datamover_image);
    ctx.datamover_service_account = args.datamover_service_account;
    ctx.poll = Duration::from_secs(args.poll_seconds.max(1));
    let ctx = Arc::new(ctx);
    let namespace = args.namespace.as_deref();

    let backups = Controller::new(
        api::<Backup>(&client, namespace),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(
        |backup, ctx: Arc<Context>| async move { reconcile_backup(&backup, &ctx).await },
        retry,
        ctx.clone(),
    )
    .for_each(|result| async move {
        match result {
            Ok((backup, _)) => eprintln!("reconciled Backup {backup}"),
            Err(err) => eprintln!("Backup controller: {err}"),
        }
    });
    let restores = Controller::new(
        api::<Restore>(&client, namespace),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(
        |restore, ctx: Arc<Context>| async move { reconcile_restore(&restore, &ctx).await },
        retry,
        ctx,
    )
    .for_each(|result| async move {
        match result {
            Ok((restore, _)) => eprintln!("reconciled Restore {restore}"),
            Err(err) => eprintln!("Restore controller: {err}"),
        }
    });
    futures::join!(backups, restores);
    Ok(())
}
