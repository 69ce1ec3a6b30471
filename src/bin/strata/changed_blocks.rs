//! `strata changed-blocks`: ask the CSI driver's SnapshotMetadata service which ranges of a
//! snapshot changed since a base snapshot (or hold data), and write them as the
//! `--changed-ranges` file of `strata backup`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use strata::csi::metadata::{
    ChangedBlocks, ChangedBlocksRequest, DeltaBase, FetchOptions, ServiceAccountRef,
    changed_blocks, write_changed_ranges,
};

/// List the changed ranges of a VolumeSnapshot through Kubernetes changed-block tracking
/// (the SnapshotMetadata service of its CSI driver), in the cluster of the current kubeconfig
/// or in-cluster config.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Namespace of the snapshots.
    #[arg(long, short = 'n')]
    namespace: String,
    /// The VolumeSnapshot being backed up.
    #[arg(long)]
    snapshot: String,
    /// The VolumeSnapshot the volume's latest backup was taken from. Without it the output
    /// lists the ranges holding data, which is not a change list for an incremental backup.
    #[arg(long, value_name = "NAME")]
    base_snapshot: Option<String>,
    /// The CSI handle of that base snapshot (its VolumeSnapshotContent's
    /// status.snapshotHandle), instead of its name.
    #[arg(long, value_name = "HANDLE", conflicts_with = "base_snapshot")]
    base_snapshot_handle: Option<String>,
    /// Where to write the JSON ranges (written whole or not at all); standard output when unset.
    #[arg(long, short, value_name = "FILE.json")]
    output: Option<PathBuf>,
    /// When the ranges cannot be listed, report why on standard error, write no output file
    /// and succeed, so that `strata backup --changed-ranges FILE --changed-since ID` compares
    /// digests instead.
    #[arg(long, requires = "output")]
    allow_unavailable: bool,
    /// Service account whose token authorizes the calls, as NAMESPACE/NAME; by default the
    /// account this command runs as.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    service_account: Option<String>,
    /// Tuples per message to ask the service for (0: the service chooses).
    #[arg(long, default_value_t = 0)]
    max_results: i32,
    /// Tries of a failing call before giving up.
    #[arg(long, default_value_t = 5)]
    attempts: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let changed = match list(&args) {
        Ok(changed) => changed,
        Err(err) if args.allow_unavailable => {
            if let Some(path) = &args.output {
                remove_stale(path)?;
            }
            eprintln!(
                "strata: changed-block tracking unavailable, the backup will compare digests: {}",
                crate::one_line(&err)
            );
            return Ok(());
        }
        Err(err) => return Err(err),
    };
    match &args.output {
        Some(path) => write_whole(path, &changed)?,
        None => write_changed_ranges(std::io::stdout().lock(), &changed.ranges)?,
    }
    let mut err = std::io::stderr().lock();
    writeln!(
        err,
        "{} range(s), {} bytes of {} changed{}",
        changed.ranges.len(),
        changed.bytes(),
        changed
            .volume_capacity
            .map_or_else(|| "?".to_owned(), |c| c.to_string()),
        if changed.granularity > 1 {
            format!(" (rounded to {} bytes)", changed.granularity)
        } else {
            String::new()
        }
    )?;
    Ok(())
}

fn list(args: &Args) -> anyhow::Result<ChangedBlocks> {
    let mut request = ChangedBlocksRequest::new(&args.namespace, &args.snapshot, None);
    request.base = match (&args.base_snapshot, &args.base_snapshot_handle) {
        (Some(name), _) => Some(DeltaBase::Snapshot(name.clone())),
        (None, Some(handle)) => Some(DeltaBase::Handle(handle.clone())),
        (None, None) => None,
    };
    request.service_account = args
        .service_account
        .as_deref()
        .map(ServiceAccountRef::parse)
        .transpose()?;
    let options = FetchOptions {
        max_results: args.max_results,
        attempts: args.attempts.max(1),
        ..FetchOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the cluster (kubeconfig or in-cluster)")?;
        anyhow::Ok(changed_blocks(&client, &request, &options).await?)
    })
}

/// Write the ranges next to `path` and rename: a reader sees the whole list or no file.
fn write_whole(path: &Path, changed: &ChangedBlocks) -> anyhow::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    write_changed_ranges(file, &changed.ranges)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
}

/// Remove a list left at `path` by an earlier run: it would describe another change.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}
