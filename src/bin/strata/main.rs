//! `strata`: qemu-img-like commands over Strata's libraries.
//!
//! Every command exits 0 on success; on an error it prints one line naming the problem on
//! stderr and exits 1.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(feature = "kubernetes")]
mod changed_blocks;
mod convert;
mod convert_qcow2;
#[cfg(feature = "kubernetes")]
mod crds;
#[cfg(feature = "kubernetes")]
mod discover;
mod info;
#[cfg(feature = "kubernetes")]
mod install;
mod map;
mod serve;
mod volumes;

/// Block-level backup and restore as QCOW2 chains.
#[derive(Parser)]
#[command(name = "strata", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show an image's format, sizes and backing chain.
    Info(info::Args),
    /// Convert an image (hydrate a chain into a raw file or device).
    Convert(convert::Args),
    /// Show where each guest range of an image is stored.
    Map(map::Args),
    /// List an application's objects (in restore order) and volumes, from a dump or a cluster.
    #[cfg(feature = "kubernetes")]
    Discover(discover::Args),
    /// Back up a volume into a target (full, or incremental on the latest backup).
    Backup(volumes::BackupArgs),
    /// Restore a backup point of a volume into a file or block device.
    Restore(volumes::RestoreArgs),
    /// List the backups in a target.
    List(volumes::ListArgs),
    /// Verify backups without restoring them.
    Verify(volumes::VerifyArgs),
    /// Keep the newest backups of a volume, folding older ones into their children.
    Prune(volumes::PruneArgs),
    /// Remove what killed or abandoned backups left behind (partial images, stale claims).
    Gc(volumes::GcArgs),
    /// Serve a backup point from a target over NBD (read-only, or copy-on-write).
    Serve(serve::Args),
    /// Serve a local image or chain over NBD (read-only, or copy-on-write).
    ServeImage(serve::ImageArgs),
    /// List a snapshot's changed ranges via CSI changed-block tracking, for `backup --changed-ranges`.
    #[cfg(feature = "kubernetes")]
    ChangedBlocks(changed_blocks::Args),
    /// Print the Target, Backup and Restore CRDs for `kubectl apply -f -`.
    #[cfg(feature = "kubernetes")]
    Crds(crds::Args),
    /// Print every manifest a cluster needs (CRDs, controller, RBAC, datamover accounts).
    #[cfg(feature = "kubernetes")]
    Install(install::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = exit_on_termination() {
        eprintln!("strata: cannot handle termination signals: {err}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Info(args) => info::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Map(args) => map::run(args),
        #[cfg(feature = "kubernetes")]
        Command::Discover(args) => discover::run(args),
        Command::Backup(args) => volumes::backup(args),
        Command::Restore(args) => volumes::restore(args),
        Command::List(args) => volumes::list(args),
        Command::Verify(args) => volumes::verify(args),
        Command::Prune(args) => volumes::prune(args),
        Command::Gc(args) => volumes::gc(args),
        Command::Serve(args) => serve::run(args),
        Command::ServeImage(args) => serve::run_image(args),
        #[cfg(feature = "kubernetes")]
        Command::ChangedBlocks(args) => changed_blocks::run(args),
        #[cfg(feature = "kubernetes")]
        Command::Crds(args) => crds::run(args),
        #[cfg(feature = "kubernetes")]
        Command::Install(args) => install::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("strata: {}{}", one_line(&err), hint(&err));
            ExitCode::FAILURE
        }
    }
}

/// Ends the process at once on SIGTERM, SIGINT or SIGHUP, with status 128 + the signal.
///
/// Evicting a pod or deleting its Job sends SIGTERM, then SIGKILL once the grace period is
/// over. In a container `strata` runs as PID 1, and the kernel drops any signal PID 1 has no
/// handler for: without this, a datamover the controller cancelled would go on writing (and
/// could commit) for the whole grace period. Ending at once is what SIGKILL does, so what a
/// stopped backup, restore or prune leaves behind is what the fault tests already cover:
/// nothing committed is lost and the next run takes the interrupted one's records over. The
/// handlers are in place before this returns.
fn exit_on_termination() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let mut signals = runtime.block_on(async {
        Ok::<_, std::io::Error>([
            (15, signal(SignalKind::terminate())?),
            (2, signal(SignalKind::interrupt())?),
            (1, signal(SignalKind::hangup())?),
        ])
    })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let number = runtime.block_on(async {
                let [(t, term), (i, int), (h, hup)] = &mut signals;
                tokio::select! {
                    _ = term.recv() => *t,
                    _ = int.recv() => *i,
                    _ = hup.recv() => *h,
                }
            });
            let name = match number {
                15 => "SIGTERM",
                2 => "SIGINT",
                _ => "SIGHUP",
            };
            eprintln!("strata: stopped by {name}");
            std::process::exit(128 + number);
        })?;
    Ok(())
}

/// What the user can do about an error, when the CLI has a flag for it.
fn hint(err: &anyhow::Error) -> &'static str {
    let refused = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<strata::qcow2::Error>(),
            Some(strata::qcow2::Error::PathRefused { .. })
        )
    });
    if refused {
        " (pass --trust-backing to follow it, for images you trust)"
    } else {
        ""
    }
}

/// The error and its causes on one line, each said once: many errors print their source in
/// their own message, so a cause already in the text before it is left out. A newline becomes
/// a space and any other control character its escape (`\r`, `\u{1b}`): messages carry text
/// from images and servers, which must not move the cursor or recolour the terminal.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
    }
    let mut line = String::new();
    for c in parts.join(": ").chars() {
        match c {
            '\n' => line.push(' '),
            c if c.is_control() => line.extend(c.escape_debug()),
            c => line.push(c),
        }
    }
    line
}

/// Options shared by commands that open images.
#[derive(clap::Args, Clone, Copy)]
pub struct OpenArgs {
    /// Follow absolute backing names and names that climb out of the image's folder
    /// (only for images you trust).
    #[arg(long)]
    pub trust_backing: bool,
}

impl OpenArgs {
    /// Reader options for these flags and an optional forced format.
    pub fn options(self, format: Option<strata::qcow2::Format>) -> strata::qcow2::OpenOptions {
        strata::qcow2::OpenOptions {
            policy: if self.trust_backing {
                strata::qcow2::BackingPolicy::Permissive
            } else {
                strata::qcow2::BackingPolicy::Confined
            },
            format,
            ..Default::default()
        }
    }
}

/// `--output human|json`.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// Text for people.
    #[default]
    Human,
    /// JSON for programs.
    Json,
}

#[cfg(test)]
mod error_line {
    #[test]
    fn one_line_escapes_control_characters_and_joins_lines() {
        let err = anyhow::anyhow!("x\r\u{1b}[2K\u{1b}[32mOK\tdone\nnext").context("restoring");
        assert_eq!(
            super::one_line(&err),
            r"restoring: x\r\u{1b}[2K\u{1b}[32mOK\tdone next"
        );
    }
}

/// What the datamover Jobs run parses with this CLI's parser into what the Job builder meant:
/// the Job's container args go through `Cli::try_parse_from`, and the flattened invocation
/// comes back equal to the builder's (so a flag renamed on one side only fails here).
#[cfg(all(test, feature = "kubernetes"))]
mod datamover_jobs {
    use clap::Parser;
    use strata::csi::VolumeKey;
    use strata::csi::datamover::{self, Attach, DatamoverSpec, Step};
    use strata::datamover::Invocation;

    use super::{Cli, Command};

    fn spec(attach: Attach) -> DatamoverSpec {
        DatamoverSpec::new(
            VolumeKey::new("run", "shop", "data"),
            "registry.example/strata:0.1",
            "strata-volume-data-0123",
            attach,
            "s3://bucket/prefix",
            "shop.data",
        )
    }

    /// The Job's container args, parsed by the CLI.
    fn parsed(spec: &DatamoverSpec, step: &Step) -> Command {
        let job = datamover::job(spec, step).expect("job");
        let pod = job.spec.and_then(|s| s.template.spec).expect("pod spec");
        let args = pod.containers[0].args.clone().expect("container args");
        match Cli::try_parse_from(&args) {
            Ok(cli) => cli.command,
            Err(err) => panic!("the CLI refuses the Job's {args:?}: {err}"),
        }
    }

    #[test]
    fn every_datamover_step_parses_into_the_invocation_the_job_builder_meant() {
        let steps = [
            Step::Backup {
                full: false,
                changed_ranges: None,
                changed_since: None,
            },
            Step::Backup {
                full: true,
                changed_ranges: None,
                changed_since: None,
            },
            Step::Backup {
                full: false,
                changed_ranges: Some("/scratch/ranges.json".into()),
                changed_since: Some("20260101T000000Z-0a1b2c3d".into()),
            },
            Step::Restore { backup: None },
            Step::Restore {
                backup: Some("20260101T000000Z-0a1b2c3d".into()),
            },
        ];
        for attach in [Attach::Block, Attach::Filesystem] {
            let spec = spec(attach);
            for step in &steps {
                let meant = datamover::invocation(&spec, step);
                match (parsed(&spec, step), &meant) {
                    (Command::Backup(args), Invocation::Backup(meant)) => {
                        assert_eq!(&args.job, meant, "{step:?} on {attach:?}");
                        // The CLI's own options keep their defaults in a Job.
                        assert!(!args.quiet);
                    }
                    (Command::Restore(args), Invocation::Restore(meant)) => {
                        assert_eq!(&args.job, meant, "{step:?} on {attach:?}");
                        assert!(!args.target_is_zero);
                    }
                    _ => panic!("{step:?} parsed as another command"),
                }
            }
        }
    }

    #[test]
    fn a_flag_the_cli_does_not_know_is_refused() {
        // The check above can fail: an args list the CLI does not define is an error.
        let mut args =
            datamover::command_line(&spec(Attach::Block), &Step::Restore { backup: None });
        args.insert(2, "--no-such-flag".to_owned());
        assert!(Cli::try_parse_from(&args).is_err());
    }
}
