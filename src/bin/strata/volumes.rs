//! `strata backup`, `restore`, `list` and `verify`: volume backups in a target.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use strata::datamover::{BackupInvocation, RestoreInvocation};
use strata::target::{BackupId, Notices, Target, TargetOptions, VolumeName};

use crate::Output;

/// Arguments of `strata backup`.
#[derive(clap::Args)]
pub struct BackupArgs {
    /// What a datamover Job sets (shared with the Job builder).
    #[command(flatten)]
    pub(crate) job: BackupInvocation,
    /// Digests of a new chain: `blake3` (cryptographic, the default) or `xxh3` (XXH3-128 with a
    /// random seed, several times faster, for volumes whose writers are trusted). Incrementals
    /// keep their chain's (a note on stderr says so when this asks for another).
    #[arg(long, value_enum)]
    digests: Option<DigestChoice>,
    /// Cluster size of a new chain in bytes (a power of two from 512 to 2 MiB; 64 KiB by
    /// default). Incrementals keep their chain's.
    #[arg(long, value_name = "BYTES")]
    cluster_size: Option<u64>,
    /// The longest chain (base included) an incremental may make; the backup that would
    /// exceed it is taken full instead (and says so).
    #[arg(long, value_name = "N", default_value_t = strata::DEFAULT_MAX_CHAIN_LENGTH)]
    max_chain_length: usize,
    /// On object storage, how long this writer's lease lasts without a renewal (`30s`, `2m`):
    /// were it killed, the volume's next backup waits about this long before taking over.
    /// At most 10m: other writers honour no longer lease.
    #[arg(long, value_name = "DURATION", value_parser = parse_lease, default_value = "30s")]
    lease: Duration,
    /// Compression of the stored clusters: `none`, `zlib[:LEVEL]` (0-9) or `zstd[:LEVEL]`
    /// (1-22; the default is zstd at level 1). Clusters that do not shrink are stored raw.
    #[arg(long, value_name = "METHOD", value_parser = parse_compression, default_value = "zstd:1")]
    compress: Compression,
    /// Hide the progress bar.
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

/// The digest algorithms `strata backup --digests` offers.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DigestChoice {
    /// BLAKE3-128.
    Blake3,
    /// XXH3-128 with a random seed.
    Xxh3,
}

/// Arguments of `strata restore`.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// What a datamover Job sets (shared with the Job builder).
    #[command(flatten)]
    pub(crate) job: RestoreInvocation,
    /// The destination block device already reads as zeros (a freshly provisioned thin
    /// volume): its zero ranges are not zeroed again. Files are always written sparse.
    #[arg(long)]
    pub(crate) target_is_zero: bool,
    /// From object storage: the largest range GET (`8M`, `16MiB`, bytes without a unit).
    /// The chain's data is fetched in parts up to this size, `--fetch-parallel` at once.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "8M")]
    fetch_part_size: usize,
    /// From object storage: parts fetched or waiting to be written at once. Memory holds up
    /// to this many parts.
    #[arg(long, value_name = "N", default_value_t = 8)]
    fetch_parallel: usize,
    /// From object storage: gaps up to this size between needed ranges of an image are
    /// fetched with them rather than costing another request.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1M")]
    fetch_gap: usize,
    /// Hide the progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// Arguments of `strata list`.
#[derive(clap::Args)]
pub struct ListArgs {
    /// The target.
    #[arg(long)]
    target: String,
    /// Only this volume.
    #[arg(long)]
    volume: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

/// Arguments of `strata verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The target.
    #[arg(long)]
    target: String,
    /// Only this volume.
    #[arg(long)]
    volume: Option<String>,
    /// Only this backup.
    #[arg(long)]
    backup: Option<String>,
}

/// Opens a repository that must exist (list, verify, prune, gc, serve): a mistyped target is
/// an error, not a new empty repository. Its notices are printed on stderr.
pub fn open_target(url: &str) -> anyhow::Result<Target> {
    open_target_with(url, existing_only())
}

/// Default options that open only an existing repository.
pub fn existing_only() -> TargetOptions {
    let mut options = TargetOptions::default();
    options.create = false;
    options
}

/// Opens the target with `options`, its notices (a wait for a lapsing lease, a takeover)
/// printed on stderr.
fn open_target_with(url: &str, mut options: TargetOptions) -> anyhow::Result<Target> {
    options.notices = Notices::new(|line| eprintln!("strata: {line}"));
    Target::open_with(url, options).with_context(|| format!("opening target {url}"))
}

/// A `--compress` choice: the method (`None` for raw) and its level.
#[derive(Debug, Clone, Copy)]
pub struct Compression(Option<(strata::qcow2::CompressionType, Option<i32>)>);

/// Parses `none`, `zlib`, `zstd`, optionally with `:LEVEL`.
pub fn parse_compression(text: &str) -> Result<Compression, String> {
    use strata::qcow2::CompressionType;
    let (name, level) = match text.split_once(':') {
        Some((name, level)) => (
            name,
            Some(
                level
                    .parse::<i32>()
                    .map_err(|_| format!("{text:?}: {level:?} is not a level"))?,
            ),
        ),
        None => (text, None),
    };
    let method = match name {
        "none" if level.is_none() => return Ok(Compression(None)),
        "zlib" | "deflate" => CompressionType::Deflate,
        "zstd" => CompressionType::Zstd,
        _ => {
            return Err(format!(
                "{text:?}: expected none, zlib[:LEVEL] or zstd[:LEVEL]"
            ));
        }
    };
    // Checked here, so a bad level fails before the target is touched.
    strata::qcow2::ClusterCompressor::new(method, level, strata::qcow2::MIN_CLUSTER_SIZE)
        .map_err(|_| format!("{text:?}: not a level of {}", method.name()))?;
    Ok(Compression(Some((method, level))))
}

/// Parses a duration: a number with `ms`, `s` (the default), `m`, `h` or `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 15m or 2h"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// Parses `--lease`: a duration of at most 10 minutes, the longest lease other writers honour
/// (a longer one would be renewed less often than they watch it, and a live writer taken over).
fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = parse_duration(text)?;
    match lease > Duration::from_secs(600) {
        true => Err(format!("{text:?} is longer than the longest lease, 10m")),
        false => Ok(lease),
    }
}

/// Parses a size in bytes: a number with `K`, `M` or `G` (powers of 1024, `KiB`... too).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let shift = match unit.trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (K, M or G)")),
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text:?} is not a size such as 8M or 65536"))
}

/// A progress bar over `total` bytes, hidden when stderr is not a terminal or `quiet`.
pub fn bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Whether the ranges file at `path` describes the change since the volume's latest backup:
/// always without `since` (the caller vouches for it); with it, when the file exists and
/// `since` is the latest backup. Otherwise says on stderr why digests are compared instead.
fn usable_ranges(
    target: &Target,
    volume: &VolumeName,
    path: &std::path::Path,
    since: Option<&str>,
) -> anyhow::Result<bool> {
    let Some(since) = since else {
        return Ok(true);
    };
    let why = if !path.exists() {
        format!("no changed ranges at {}", path.display())
    } else {
        match target.latest_readable(volume)? {
            Some(latest) if latest.id.as_str() == since => return Ok(true),
            Some(latest) => format!(
                "the ranges are since {since}, the latest backup is {}",
                latest.id
            ),
            None => format!("the ranges are since {since}, the volume has no backup"),
        }
    };
    eprintln!("strata: {why}; comparing digests");
    Ok(false)
}

/// Runs `strata backup`; prints the new backup's id as the last line.
pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let mut target_options = TargetOptions::default();
    target_options.lease = args.lease;
    let target = open_target_with(&args.job.target, target_options)?;
    let volume = VolumeName::new(&args.job.volume)?;
    let changed_ranges = match &args.job.changed_ranges {
        Some(path) if usable_ranges(&target, &volume, path, args.job.changed_since.as_deref())? => {
            let read =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            // Ranges that do not parse only make the backup compare digests: slower, as
            // exact.
            match strata::chain::parse_changed_ranges(&read) {
                Ok(ranges) => Some(ranges),
                Err(e) => {
                    eprintln!(
                        "strata: the changed ranges at {} do not read ({e}); comparing digests",
                        path.display()
                    );
                    None
                }
            }
        }
        _ => None,
    };
    if let Some(asked) = args.digests.filter(|_| !args.job.full) {
        if target.latest_readable(&volume)?.is_some() {
            eprintln!(
                "strata: an incremental keeps its chain's digests; --digests {} applies to the \
                 next --full backup",
                clap::ValueEnum::to_possible_value(&asked)
                    .map_or_else(String::new, |v| v.get_name().to_owned())
            );
        }
    }
    let options = strata::BackupOptions {
        full: args.job.full,
        changed_ranges,
        changed_since: args
            .job
            .changed_since
            .as_deref()
            .map(BackupId::new)
            .transpose()?,
        cluster_size: args.cluster_size,
        digests: match args.digests.unwrap_or(DigestChoice::Blake3) {
            DigestChoice::Blake3 => strata::chain::DigestAlgorithm::Blake3,
            DigestChoice::Xxh3 => strata::chain::DigestAlgorithm::xxh3_random()?,
        },
        max_chain_length: args.max_chain_length,
        compression: args.compress.0.map(|(method, _)| method),
        compression_level: args.compress.0.and_then(|(_, level)| level),
    };
    let source: Box<dyn strata::qcow2::VolumeRead> =
        match args.job.source.to_str().filter(|s| s.starts_with("nbd://")) {
            Some(url) => Box::new(
                strata::nbd::Client::open(url).with_context(|| format!("connecting to {url}"))?,
            ),
            None => Box::new(strata::open_volume(&args.job.source)?),
        };
    let bar = bar(0, args.quiet);
    let manifest = strata::backup_volume(&target, &volume, &*source, &options, &mut |p| {
        bar.set_length(p.total_bytes);
        bar.set_position(p.scanned_bytes);
        bar.set_message(format!("{} clusters changed", p.changed_clusters));
    })?;
    bar.finish_and_clear();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} backup of {} ({} bytes image)",
        if manifest.parent.is_some() {
            "incremental"
        } else {
            "full"
        },
        manifest.volume,
        manifest.image.size
    )?;
    if let Some(reason) = &manifest.full_reason {
        writeln!(out, "full because {reason}")?;
    }
    writeln!(out, "{}", manifest.id)?;
    Ok(())
}

/// Runs `strata restore`.
pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let mut target_options = existing_only();
    target_options.fetch_part_size = args.fetch_part_size;
    target_options.fetch_concurrency = args.fetch_parallel;
    target_options.fetch_gap = args.fetch_gap;
    let target = open_target_with(&args.job.target, target_options)?;
    let volume = VolumeName::new(&args.job.volume)?;
    let id = args.job.backup.as_deref().map(BackupId::new).transpose()?;
    let bar = bar(0, args.quiet);
    let mut options = strata::qcow2::HydrateOptions::default();
    options.target_is_zero = args.target_is_zero;
    let (manifest, stats) = strata::restore_volume_with(
        &target,
        &volume,
        id.as_ref(),
        &args.job.dest,
        &options,
        &mut |p| {
            bar.set_length(p.total_bytes);
            bar.set_position(p.scanned_bytes);
        },
    )?;
    bar.finish_and_clear();
    writeln!(
        std::io::stdout().lock(),
        "restored {} of {} into {} ({} bytes of data)",
        manifest.id,
        manifest.volume,
        args.job.dest.display(),
        stats.data_bytes
    )?;
    Ok(())
}

#[derive(Serialize)]
struct ListEntry {
    id: String,
    parent: Option<String>,
    volume: String,
    created: String,
    virtual_size: u64,
    image_size: u64,
}

/// Runs `strata list`.
pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let target = open_target(&args.target)?;
    let volume = args.volume.as_deref().map(VolumeName::new).transpose()?;
    // A manifest that does not read hides no other backup: it is named on stderr, one line
    // each, and the others are listed (`strata verify` reports it as damage).
    let (listed, unreadable) = strata::list_readable(&target, volume.as_ref())?;
    for damaged in &unreadable {
        eprintln!("strata: warning: {}", strata::chain_text(&damaged.error));
    }
    let entries: Vec<ListEntry> = listed
        .into_iter()
        .map(|m| ListEntry {
            id: m.id.to_string(),
            parent: m.parent.map(|p| p.to_string()),
            volume: m.volume.to_string(),
            created: m.created.to_rfc3339(),
            virtual_size: m.virtual_size,
            image_size: m.image.size,
        })
        .collect();
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&entries)?)?,
        Output::Human => {
            writeln!(
                out,
                "{:<28} {:<28} {:<16} {:>14} {:>14}",
                "ID", "PARENT", "VOLUME", "VIRTUAL", "IMAGE"
            )?;
            for e in &entries {
                writeln!(
                    out,
                    "{:<28} {:<28} {:<16} {:>14} {:>14}",
                    e.id,
                    e.parent.as_deref().unwrap_or("-"),
                    e.volume,
                    e.virtual_size,
                    e.image_size
                )?;
            }
        }
    }
    Ok(())
}

/// Runs `strata verify`; fails when anything is damaged.
pub fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let target = open_target(&args.target)?;
    let volume = args.volume.as_deref().map(VolumeName::new).transpose()?;
    let id = args.backup.as_deref().map(BackupId::new).transpose()?;
    let reports = strata::verify(&target, volume.as_ref(), id.as_ref())?;
    let mut out = std::io::stdout().lock();
    let mut damaged = 0;
    for report in &reports {
        if report.damage.is_empty() {
            writeln!(out, "{}/{}: ok", report.volume, report.id)?;
        }
        for d in &report.damage {
            damaged += 1;
            let at = d
                .guest_offset
                .map(|offset| format!(" at guest offset {offset:#x}"))
                .unwrap_or_default();
            writeln!(
                out,
                "{}/{}: DAMAGED{at}: {}",
                report.volume, report.id, d.problem
            )?;
        }
    }
    if reports.is_empty() {
        match (&id, &volume) {
            (Some(id), Some(volume)) => anyhow::bail!("backup {volume}/{id} not found"),
            (Some(id), None) => anyhow::bail!("backup {id} not found"),
            (None, Some(volume)) => anyhow::bail!("volume {volume} has no backups to verify"),
            (None, None) => anyhow::bail!("no backups to verify"),
        }
    }
    if damaged > 0 {
        anyhow::bail!("{damaged} problems found in {} backups", reports.len());
    }
    Ok(())
}

/// Arguments of `strata prune`.
#[derive(clap::Args)]
pub struct PruneArgs {
    /// The target.
    #[arg(long)]
    target: String,
    /// The volume: keep its newest backups, folding older ones into their children.
    #[arg(long, required_unless_present = "app", conflicts_with = "app")]
    volume: Option<String>,
    /// The application: keep its newest application backups, expire the older ones and
    /// remove the volume backups no remaining application backup names.
    #[arg(long)]
    app: Option<String>,
    /// How many of the newest backups to keep.
    #[arg(long)]
    keep_last: usize,
}

/// Runs `strata prune`.
pub fn prune(args: PruneArgs) -> anyhow::Result<()> {
    let target = open_target(&args.target)?;
    let mut out = std::io::stdout().lock();
    if let Some(app) = &args.app {
        let app = strata::target::AppName::new(app)?;
        let expiry = strata::expire_app_backups(&target, &app, args.keep_last)?;
        for id in &expiry.expired {
            writeln!(out, "expired application backup {app}/{id}")?;
        }
        for (volume, id) in &expiry.removed {
            writeln!(out, "removed volume backup {volume}/{id}")?;
        }
        writeln!(
            out,
            "{} application backups expired, {} kept; {} volume backups removed",
            expiry.expired.len(),
            expiry.kept.len(),
            expiry.removed.len()
        )?;
        return Ok(());
    }
    let volume = VolumeName::new(args.volume.as_deref().unwrap_or_default())?;
    let pruned = strata::prune(&target, &volume, args.keep_last)?;
    for id in &pruned.removed {
        writeln!(out, "removed {id}")?;
    }
    for id in &pruned.being_read {
        eprintln!(
            "strata: kept {volume}/{id}: a restore or an export is reading it; prune again once it is done"
        );
    }
    writeln!(
        out,
        "{} backups removed, {} kept",
        pruned.removed.len(),
        strata::list(&target, Some(&volume))?.len()
    )?;
    // Done what it could (the other older backups are removed); the damage fails the run.
    if !pruned.damaged.is_empty() {
        let said: Vec<&str> = pruned
            .damaged
            .iter()
            .map(|(_, said)| said.as_str())
            .collect();
        anyhow::bail!(
            "{}; marked damaged (the next backup starts a new chain) and kept: delete it, or \
             restore from a later point",
            said.join("; ")
        );
    }
    Ok(())
}

/// Arguments of `strata gc`.
#[derive(clap::Args)]
pub struct GcArgs {
    /// The target.
    #[arg(long)]
    target: String,
    /// Leave leftovers younger than this (`15m`, `2h`, `0`); a live writer's objects are kept
    /// whatever their age.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "15m")]
    grace: Duration,
}

/// Runs `strata gc`: removes what killed or abandoned writers left, and says what it removed.
pub fn gc(args: GcArgs) -> anyhow::Result<()> {
    let target = open_target(&args.target)?;
    let report = target.gc(args.grace)?;
    let mut out = std::io::stdout().lock();
    for key in &report.removed {
        writeln!(out, "removed {key}")?;
    }
    writeln!(out, "{} objects removed", report.removed.len())?;
    if !target.is_folder() {
        writeln!(
            out,
            "note: incomplete multipart uploads cannot be listed here; a bucket lifecycle rule \
             that aborts them after a day removes those of killed writers"
        )?;
    }
    Ok(())
}
