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
    let dest = open_dest(&args.dest)?;
    let mut options = HydrateOptions::default();
    options.target_is_zero = args.target_is_zero;
    hydrate_with(
        &image,
        &dest,
        &args.dest.to_string_lossy(),
        &options,
        &mut |_| {},
    )?;
    Ok(())
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
fn open_dest(path: &PathBuf) -> anyhow::Result<File> {
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
