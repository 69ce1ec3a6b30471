//! `strata convert -O qcow2`: a raw volume into a QCOW2 image, or into an overlay with `-B`.

use std::path::Path;

use anyhow::{Context, bail};
use strata::qcow2::{Format, Image, WriterOptions, convert_raw_file};

use crate::OpenArgs;

/// Options of `strata convert` that only apply to QCOW2 output.
#[derive(clap::Args)]
#[group(id = "qcow2_output")]
pub struct Args {
    /// QCOW2 options, as qemu-img takes them:
    /// `cluster_size=N,compat=0.10|1.1,compression_type=zlib|zstd`.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Option<String>,
    /// Compress the data clusters.
    #[arg(short = 'c')]
    compress: bool,
    /// Write an overlay on BACKING (stored as given, relative to the destination's folder),
    /// holding only the clusters whose content differs from what BACKING's chain reads.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of BACKING (probed when absent).
    #[arg(short = 'F', value_parser = ["raw", "qcow2"], requires = "backing")]
    backing_format: Option<String>,
}

/// Converts raw `source` into QCOW2 `dest`.
pub fn run(
    args: Args,
    open: OpenArgs,
    source_format: Option<&str>,
    source: &Path,
    dest: &Path,
) -> anyhow::Result<()> {
    if source_format.is_some_and(|format| format != "raw") {
        bail!("-O qcow2 converts raw sources only (-f raw)");
    }
    let mut options = WriterOptions::default();
    if let Some(list) = &args.options {
        options.parse_qemu_options(list)?;
    }
    if args.compress {
        options.compress();
    }
    let chain = match &args.backing {
        None => None,
        Some(name) => {
            let folder = dest.parent().unwrap_or(Path::new("."));
            let format = args.backing_format.as_deref().and_then(Format::parse);
            let chain = Image::open_with_options(folder.join(name), &open.options(format))
                .with_context(|| format!("{name}: cannot open the backing file"))?;
            options.backing_file = Some(name.clone());
            options.backing_format = chain.format().name().to_owned();
            Some(chain)
        }
    };
    let mut inputs = vec![source.to_path_buf()];
    if let Some(chain) = &chain {
        inputs.extend(chain.chain().into_iter().map(|layer| layer.name.into()));
    }
    crate::convert::refuse_overwriting(dest, &inputs)?;
    convert_raw_file(
        source,
        dest,
        &options,
        chain.as_ref().map(|chain| chain as _),
    )
    .with_context(|| format!("{}: conversion failed", dest.display()))?;
    Ok(())
}
