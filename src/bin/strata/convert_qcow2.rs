//! `strata convert -O qcow2`: a raw volume into a QCOW2 image, or into an overlay with `-B`.

use std::path::Path;

use anyhow::Context;
use strata::qcow2::{FileSink, Format, Image, WriterOptions, convert_raw, convert_raw_file};

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

/// Converts `source` into QCOW2 `dest`: a raw file or device, or (as qemu-img converts any
/// format) a QCOW2 image, whose chain is read as the volume it stands for. The format is
/// probed from the magic unless `-f` names it.
pub fn run(
    args: Args,
    open: OpenArgs,
    source_format: Option<&str>,
    source: &Path,
    dest: &Path,
) -> anyhow::Result<()> {
    let mut options = WriterOptions::default();
    if let Some(list) = &args.options {
        options.parse_qemu_options(list)?;
    }
    if args.compress {
        options.compress();
    }
    // A QCOW2 source is read through its chain: its bytes are not the volume's.
    let image = match source_format {
        Some("raw") => None,
        _ => {
            let format = source_format.and_then(Format::parse);
            let image = Image::open_with_options(source, &open.options(format))
                .with_context(|| format!("{}: cannot open the source", source.display()))?;
            (image.format() != Format::Raw).then_some(image)
        }
    };
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
    for chain in image.iter().chain(&chain) {
        inputs.extend(crate::convert::chain_inputs(chain));
    }
    crate::convert::refuse_overwriting(dest, &inputs)?;
    let backing = chain.as_ref().map(|chain| chain as _);
    crate::convert::write_replacing(dest, |written| {
        match &image {
            Some(image) => {
                let sink = FileSink::create(written)
                    .with_context(|| format!("{}: cannot create it", written.display()))?;
                convert_raw(image, sink, &options, backing).map(|_| ())
            }
            None => convert_raw_file(source, written, &options, backing).map(|_| ()),
        }
        .with_context(|| format!("{}: conversion failed", dest.display()))
    })
}
