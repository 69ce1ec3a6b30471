//! `strata serve` and `strata serve-image`: a backup point or a local chain over NBD.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;
use strata::nbd::{Overlay, Server};
use strata::qcow2::Image;
use strata::target::{BackupId, VolumeName};

use crate::OpenArgs;

/// Where and under which name to serve.
#[derive(clap::Args)]
pub struct ListenArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Export name (default: the volume name, or the image's file name).
    #[arg(long)]
    export: Option<String>,
    /// Accept writes, keeping them in this local copy-on-write file (created if missing; it
    /// remembers the backup point it belongs to). The backup is never written.
    #[arg(long)]
    writable_overlay: Option<PathBuf>,
}

/// Arguments of `strata serve`.
#[derive(clap::Args)]
pub struct Args {
    /// The backup target (folder, file://, s3://, memory://).
    #[arg(long)]
    target: String,
    /// The volume whose backup to serve.
    #[arg(long)]
    volume: String,
    /// The backup point (default: the latest backup).
    #[arg(long)]
    backup: Option<String>,
    #[command(flatten)]
    listen: ListenArgs,
}

/// Arguments of `strata serve-image`.
#[derive(clap::Args)]
pub struct ImageArgs {
    #[command(flatten)]
    open: OpenArgs,
    /// The image (the top of a local QCOW2 chain, or a raw file).
    image: PathBuf,
    #[command(flatten)]
    listen: ListenArgs,
}

/// Runs `strata serve`: serves a backup point straight from its target, read-only or over a
/// writable overlay.
pub fn run(args: Args) -> anyhow::Result<()> {
    let target = crate::volumes::open_target(&args.target)?;
    let volume = VolumeName::new(args.volume.clone())?;
    let id = args.backup.clone().map(BackupId::new).transpose()?;
    // Verified: a read of a cluster that fails its checksum gets an error reply naming the
    // backup and the guest offset, never the damaged bytes.
    // Recorded as a reader for as long as it serves: gc keeps what a fold supersedes.
    let (manifest, image, _lease) = strata::open_backup_leased(&target, &volume, id.as_ref())?;
    let owner = format!("backup {} of volume {volume}", manifest.id);
    let name = args.listen.export.clone().unwrap_or(args.volume);
    listen_and_serve(&args.listen, name, image, &owner)
}

/// Runs `strata serve-image`: serves a local chain, read-only or over a writable overlay.
pub fn run_image(args: ImageArgs) -> anyhow::Result<()> {
    let image = Image::open_with_options(&args.image, &args.open.options(None))
        .with_context(|| format!("opening {}", args.image.display()))?;
    let name = match args.listen.export.clone() {
        Some(name) => name,
        None => args
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let path = std::fs::canonicalize(&args.image)
        .with_context(|| format!("resolving {}", args.image.display()))?;
    let owner = format!("image {}", path.display());
    listen_and_serve(&args.listen, name, image, &owner)
}

/// Serves `image` under `name`; `owner` names what a writable overlay belongs to.
fn listen_and_serve(
    args: &ListenArgs,
    name: String,
    image: Image,
    owner: &str,
) -> anyhow::Result<()> {
    let server = match &args.writable_overlay {
        Some(path) => {
            let overlay = Overlay::open_or_create(path, image.virtual_size(), owner)
                .with_context(|| format!("opening overlay {}", path.display()))?;
            Server::with_overlay(name, image, overlay)?
        }
        None => Server::new(name, image)?,
    };
    let listen = &args.listen;
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    let export = server.export_name();
    println!("serving {export} on nbd://{addr}/{export}");
    std::io::stdout().flush()?;
    server.serve(&listener)?;
    Ok(())
}
