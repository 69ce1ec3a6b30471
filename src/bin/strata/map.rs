//! `strata map`.

use std::path::PathBuf;

use std::io::Write;

use serde::Serialize;
use strata::qcow2::{Escaped, ExtentKind, Image};

use crate::{OpenArgs, Output};

/// Arguments of `strata map`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    open: OpenArgs,
    /// The image.
    image: PathBuf,
}

/// One extent, with the fields `qemu-img map --output json` uses.
#[derive(Serialize)]
struct ExtentJson {
    start: u64,
    length: u64,
    depth: usize,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

/// Runs `strata map`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let image = Image::open_with_options(&args.image, &args.open.options(None))?;
    let chain = image.chain();
    let extents = image.map(0, image.virtual_size())?;
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            let rows: Vec<ExtentJson> = extents
                .iter()
                .map(|e| {
                    let (depth, offset, compressed) = match e.kind {
                        ExtentKind::Data { depth, host_offset } => {
                            (depth, Some(host_offset.get()), false)
                        }
                        ExtentKind::Compressed { depth, .. } => (depth, None, true),
                        ExtentKind::Zero { depth } => (depth, None, false),
                        ExtentKind::Unallocated | ExtentKind::Beyond { .. } => {
                            (chain.len().saturating_sub(1), None, false)
                        }
                    };
                    ExtentJson {
                        start: e.start.get(),
                        length: e.length,
                        depth,
                        present: !matches!(
                            e.kind,
                            ExtentKind::Unallocated | ExtentKind::Beyond { .. }
                        ),
                        zero: e.kind.is_zero(),
                        data: !e.kind.is_zero(),
                        compressed,
                        offset,
                    }
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        }
        Output::Human => {
            writeln!(
                out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            )?;
            for e in &extents {
                if let ExtentKind::Data { depth, host_offset } = e.kind {
                    let file = Escaped(chain.get(depth).map_or("", |l| l.name.as_str()));
                    writeln!(
                        out,
                        "{:<16}{:<16}{:<16}{file}",
                        format!("{:#x}", e.start),
                        format!("{:#x}", e.length),
                        format!("{host_offset:#x}")
                    )?;
                }
            }
        }
    }
    Ok(())
}
