//! `strata info`.

use std::path::PathBuf;

use std::io::Write;

use serde::Serialize;
use strata::qcow2::{Escaped, Image, LayerInfo};

use crate::{OpenArgs, Output};

/// Arguments of `strata info`.
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

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct LayerJson {
    filename: String,
    format: &'static str,
    virtual_size: u64,
    actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format_specific: Option<Qcow2Json>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Qcow2Json {
    compat: &'static str,
    version: u32,
    compression_type: &'static str,
    lazy_refcounts: bool,
    refcount_bits: u32,
    corrupt: bool,
    dirty: bool,
    extended_l2: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_file: Option<String>,
    snapshots: u32,
    bitmaps: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct InfoJson {
    #[serde(flatten)]
    top: LayerJson,
    backing_chain: Vec<LayerJson>,
}

fn layer_json(layer: &LayerInfo) -> LayerJson {
    let q = layer.qcow2.as_ref();
    LayerJson {
        filename: layer.name.clone(),
        format: layer.format.name(),
        virtual_size: layer.virtual_size,
        actual_size: layer.file_length,
        cluster_size: q.map(|q| q.cluster_size),
        backing_filename: q.and_then(|q| q.backing_file.clone()),
        backing_filename_format: q.and_then(|q| q.backing_format.clone()),
        format_specific: q.map(|q| Qcow2Json {
            compat: if q.version >= 3 { "1.1" } else { "0.10" },
            version: q.version,
            compression_type: q.compression_type,
            lazy_refcounts: q.lazy_refcounts,
            refcount_bits: q.refcount_bits,
            corrupt: q.corrupt,
            dirty: q.dirty,
            extended_l2: q.extended_l2,
            data_file: q.data_file.clone(),
            snapshots: q.snapshots,
            bitmaps: q.bitmaps,
        }),
    }
}

/// Runs `strata info`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let image = Image::open_with_options(&args.image, &args.open.options(None))?;
    let chain = image.chain();
    let mut layers = chain.iter().map(layer_json);
    let Some(top) = layers.next() else {
        anyhow::bail!("{}: empty chain", args.image.display());
    };
    let info = InfoJson {
        top,
        backing_chain: layers.collect(),
    };
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?,
        Output::Human => print_human(&mut out, &info)?,
    }
    Ok(())
}

fn print_human(out: &mut impl Write, info: &InfoJson) -> std::io::Result<()> {
    let mut first = true;
    for layer in std::iter::once(&info.top).chain(&info.backing_chain) {
        if !first {
            writeln!(out)?;
        }
        first = false;
        // Names come from the image: escaped, so that none moves the
        // cursor or recolours the terminal (the JSON output escapes them as JSON does).
        writeln!(out, "image: {}", Escaped(&layer.filename))?;
        writeln!(out, "file format: {}", layer.format)?;
        writeln!(out, "virtual size: {} bytes", layer.virtual_size)?;
        writeln!(out, "file size: {} bytes", layer.actual_size)?;
        if let Some(cluster) = layer.cluster_size {
            writeln!(out, "cluster_size: {cluster}")?;
        }
        if let Some(backing) = &layer.backing_filename {
            let backing = Escaped(backing);
            match &layer.backing_filename_format {
                Some(format) => {
                    let format = Escaped(format);
                    writeln!(out, "backing file: {backing} (format: {format})")?;
                }
                None => writeln!(out, "backing file: {backing}")?,
            }
        }
        if let Some(q) = &layer.format_specific {
            writeln!(out, "compat: {}", q.compat)?;
            writeln!(out, "compression type: {}", q.compression_type)?;
            writeln!(out, "lazy refcounts: {}", q.lazy_refcounts)?;
            writeln!(out, "refcount bits: {}", q.refcount_bits)?;
            writeln!(out, "corrupt: {}", q.corrupt)?;
            writeln!(out, "dirty: {}", q.dirty)?;
            writeln!(out, "extended l2: {}", q.extended_l2)?;
            if let Some(data_file) = &q.data_file {
                writeln!(out, "data file: {}", Escaped(data_file))?;
            }
        }
    }
    Ok(())
}
