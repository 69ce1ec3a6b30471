//! The datamover's command line as one type: what a datamover Job asks `strata` to do.
//!
//! A datamover Job (strata-csi's `datamover::job`) runs `strata backup ...` or
//! `strata restore ...` in its container. Both ends use the types of this crate: the Job
//! builder renders an [`Invocation`] with [`Invocation::args`], and the `strata` CLI's clap
//! parser flattens [`BackupInvocation`] and [`RestoreInvocation`] into its `backup` and
//! `restore` arguments. A renamed flag is thus renamed at both ends, and the CLI's test that
//! parses what the Job builder emits fails if the two ever disagree.
//!
//! ```
//! use strata_datamover::{Invocation, RestoreInvocation};
//!
//! let restore = Invocation::Restore(RestoreInvocation {
//!     target: "s3://backups/prod".into(),
//!     volume: "shop.data".into(),
//!     backup: Some("b-7".into()),
//!     dest: "/dev/xvda".into(),
//! });
//! assert_eq!(
//!     restore.args(),
//!     ["strata", "restore", "--target=s3://backups/prod", "--volume=shop.data",
//!      "--backup=b-7", "--", "/dev/xvda"]
//! );
//! ```
//!
//! Crate features: none. The only dependency is clap (for the derive the CLI flattens).

use std::path::{Path, PathBuf};

/// What the datamover runs: `strata backup` or `strata restore`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invocation {
    /// `strata backup`.
    Backup(BackupInvocation),
    /// `strata restore`.
    Restore(RestoreInvocation),
}

/// The arguments of `strata backup` that a datamover Job sets.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct BackupInvocation {
    /// The target: a folder, `file://`, `s3://bucket/prefix` or `memory://`.
    #[arg(long)]
    pub target: String,
    /// The volume's name in the target.
    #[arg(long)]
    pub volume: String,
    /// Changed ranges from changed-block tracking: a JSON array of `{"offset", "length"}`.
    #[arg(long)]
    pub changed_ranges: Option<PathBuf>,
    /// The backup the changed ranges are relative to. With it, a missing ranges file or a
    /// volume whose latest backup is another makes the backup compare digests instead.
    #[arg(long, value_name = "ID", requires = "changed_ranges")]
    pub changed_since: Option<String>,
    /// Take a full base image even when the volume has backups.
    #[arg(long)]
    pub full: bool,
    /// The volume: a raw file, a block device, or an NBD export (`nbd://HOST:PORT/EXPORT`).
    pub source: PathBuf,
}

/// The arguments of `strata restore` that a datamover Job sets.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct RestoreInvocation {
    /// The target.
    #[arg(long)]
    pub target: String,
    /// The volume's name in the target.
    #[arg(long)]
    pub volume: String,
    /// The backup to restore (the latest when absent).
    #[arg(long)]
    pub backup: Option<String>,
    /// Where to: a file (created sparse) or a block device.
    pub dest: PathBuf,
}

impl Invocation {
    /// The command line, starting with the program name `strata` (a container's `args`).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["strata".to_owned()];
        match self {
            Invocation::Backup(backup) => {
                args.push("backup".to_owned());
                if backup.full {
                    args.push("--full".to_owned());
                }
                option(&mut args, "--target", Some(&backup.target));
                option(&mut args, "--volume", Some(&backup.volume));
                let ranges = backup.changed_ranges.as_deref().map(text);
                option(&mut args, "--changed-ranges", ranges.as_deref());
                option(
                    &mut args,
                    "--changed-since",
                    backup.changed_since.as_deref(),
                );
                args.extend(["--".to_owned(), text(&backup.source)]);
            }
            Invocation::Restore(restore) => {
                args.push("restore".to_owned());
                option(&mut args, "--target", Some(&restore.target));
                option(&mut args, "--volume", Some(&restore.volume));
                option(&mut args, "--backup", restore.backup.as_deref());
                args.extend(["--".to_owned(), text(&restore.dest)]);
            }
        }
        args
    }
}

/// Appends `flag=value` when there is a value: as one argument, a value that starts with `-`
/// (names may) is not taken for a flag.
fn option(args: &mut Vec<String>, flag: &str, value: Option<&str>) {
    if let Some(value) = value {
        args.push(format!("{flag}={value}"));
    }
}

/// A path as a container argument (the paths a Job names are UTF-8: its own mount points and
/// file names it chose).
fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Backup {
        #[command(flatten)]
        args: BackupInvocation,
    }

    #[derive(Parser)]
    struct Restore {
        #[command(flatten)]
        args: RestoreInvocation,
    }

    /// Names may start with `-` (a volume `-db`, a backup `-1`): each argument parses back to
    /// the invocation it came from rather than as a flag.
    #[test]
    fn values_starting_with_a_dash_parse_back_as_values() {
        let backup = BackupInvocation {
            target: "-target".into(),
            volume: "-db".into(),
            changed_ranges: Some("-ranges".into()),
            changed_since: Some("-1".into()),
            full: true,
            source: "-dev".into(),
        };
        let args = Invocation::Backup(backup.clone()).args();
        let parsed = Backup::try_parse_from(args.iter().skip(1)).unwrap();
        assert_eq!(parsed.args, backup);
        let restore = RestoreInvocation {
            target: "/t".into(),
            volume: "-db".into(),
            backup: Some("-1".into()),
            dest: "-out".into(),
        };
        let args = Invocation::Restore(restore.clone()).args();
        let parsed = Restore::try_parse_from(args.iter().skip(1)).unwrap();
        assert_eq!(parsed.args, restore);
    }
}
