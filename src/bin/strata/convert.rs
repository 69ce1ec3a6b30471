//! `strata convert`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use strata::qcow2::{Format, HydrateOptions, Image, hydrate_with};

use crate::OpenArgs;

/// Arguments of `strata convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Source format (probed from the magic when absent).
    #[arg(short = 'f', value_parser = ["raw", "qcow2"])]
    source_format: Option<String>,
    /// Output format.
    #[arg(short = 'O', value_parser = ["raw", "qcow2"], default_value = "raw")]
    output_format: String,
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    qcow2: crate::convert_qcow2::Args,
    /// The destination block device already reads as zeros (a freshly provisioned thin
    /// volume): zero ranges are not zeroed again. Regular files are always sparse.
    #[arg(long)]
    target_is_zero: bool,
    /// The source image.
    source: PathBuf,
    /// The destination: a regular file (created or truncated, written sparse) or a block
    /// device (written in place).
    dest: PathBuf,
}

/// Runs `strata convert`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.output_format == "qcow2" {
        let format = args.source_format.as_deref();
        return crate::convert_qcow2::run(args.qcow2, args.open, format, &args.source, &args.dest);
    }
    let format = args.source_format.as_deref().and_then(Format::parse);
    let image = Image::open_with_options(&args.source, &args.open.options(format))?;
    let mut inputs = vec![args.source.clone()];
    inputs.extend(
        image
            .chain()
            .into_iter()
            .map(|layer| PathBuf::from(layer.name)),
    );
    refuse_overwriting(&args.dest, &inputs)?;
    let mut options = HydrateOptions::default();
    options.target_is_zero = args.target_is_zero;
    write_replacing(&args.dest, |written| {
        let dest = open_dest(written)?;
        hydrate_with(
            &image,
            &dest,
            &written.to_string_lossy(),
            &options,
            &mut |_| {},
        )?;
        Ok(())
    })
}

/// Runs `write` on where a conversion into `dest` writes: a block device in place; a regular
/// file as `DEST.partial`, synced and renamed over `DEST` once `write` succeeded, and removed
/// when it failed. A failed conversion (a damaged source, a full disk) so leaves no
/// half-written file that looks converted, and an earlier `DEST` as it was.
pub fn write_replacing(
    dest: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    // A link is followed: the file it names is replaced, the link kept.
    let linked = std::fs::symlink_metadata(dest).is_ok_and(|m| m.file_type().is_symlink());
    let resolved;
    let dest = match linked {
        true => {
            resolved = std::fs::canonicalize(dest)
                .with_context(|| format!("{}: cannot follow the link", dest.display()))?;
            resolved.as_path()
        }
        false => dest,
    };
    let existing = std::fs::metadata(dest).ok();
    match existing.as_ref().map(std::fs::Metadata::file_type) {
        Some(kind) if kind.is_block_device() => return write(dest),
        Some(kind) if !kind.is_file() => anyhow::bail!(
            "{}: the destination is neither a regular file nor a block device",
            dest.display()
        ),
        _ => {}
    }
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let written = write(&partial).and_then(|()| {
        // A replaced file keeps its permissions.
        if let Some(old) = &existing {
            std::fs::set_permissions(&partial, old.permissions())
                .with_context(|| format!("{}: cannot set its permissions", partial.display()))?;
        }
        File::open(&partial)
            .and_then(|file| file.sync_all())
            .with_context(|| format!("{}: cannot sync it", partial.display()))?;
        std::fs::rename(&partial, dest)
            .with_context(|| format!("{}: cannot rename it into place", dest.display()))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Refuses a destination that is one of the `inputs` (the same file, by device and inode,
/// whatever the path): truncating it would destroy what is being converted.
pub fn refuse_overwriting(dest: &Path, inputs: &[PathBuf]) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(dest) else {
        return Ok(());
    };
    for input in inputs {
        if let Ok(meta) = std::fs::metadata(input)
            && (meta.dev(), meta.ino()) == (target.dev(), target.ino())
        {
            anyhow::bail!(
                "{}: the destination is {}, an input of the conversion; write elsewhere",
                dest.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Opens a block device in place, or creates/truncates a regular file.
fn open_dest(path: &Path) -> anyhow::Result<File> {
    let is_device = std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let mut options = OpenOptions::new();
    options.write(true);
    if !is_device {
        options.create(true).truncate(true);
    }
    options
        .open(path)
        .with_context(|| format!("{}: cannot open the destination", path.display()))
}
