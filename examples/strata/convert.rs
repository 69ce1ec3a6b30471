//! `strata convert`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use anyhow::Context;
use strata::qcow2::{Format, Image, hydrate};

use crate::OpenArgs;

/// Arguments of `strata convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Source format (probed from the magic when absent).
    #[arg(short = 'f', value_parser = ["raw", "qcow2"])]
    source_format: Option<String>,
    /// Output format.
    #[arg(short = 'O', value_parser = ["raw"], default_value = "raw")]
    output_format: String,
    #[command(flatten)]
    open: OpenArgs,
    /// The source image.
    source: PathBuf,
    /// The destination: a regular file (created or truncated, written sparse) or a block
    /// device (written in place).
    dest: PathBuf,
}

/// Runs `strata convert`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let format = args.source_format.as_deref().and_then(Format::parse);
    let image = Image::open_with_options(&args.source, &args.open.options(format))?;
    let dest = open_dest(&args.dest)?;
    hydrate(&image, &dest, &args.dest.to_string_lossy())?;
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
