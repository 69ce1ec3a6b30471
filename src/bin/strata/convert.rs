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
    inputs.extend(chain_inputs(&image));
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

/// Runs `write` on where a conversion into `dest` writes, and puts the result in place.
///
/// A regular file is written as `DEST.partial` (created with the mode of the file it replaces,
/// so its content is never more readable than before), synced, renamed over `DEST` and the
/// folder synced; it is removed when `write` fails. A failed conversion (a damaged source, a
/// full disk) so leaves no half-written file that looks converted, and an earlier `DEST` as
/// it was. Written in place instead: a block device; and an existing file that a rename cannot
/// replace (a mount point, such as a file bind-mounted into a container, or one in a folder
/// this process may not write). A symbolic link is followed.
pub fn write_replacing(
    dest: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dest = &strata::follow_links(dest)
        .with_context(|| format!("{}: cannot follow the link", dest.display()))?;
    let existing = std::fs::metadata(dest).ok();
    match existing.as_ref().map(std::fs::Metadata::file_type) {
        Some(kind) if kind.is_block_device() => return write(dest),
        Some(kind) if !kind.is_file() => anyhow::bail!(
            "{}: the destination is neither a regular file nor a block device",
            dest.display()
        ),
        _ => {}
    }
    let folder = match dest.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    if existing.is_some() && strata::is_mount_point(dest) {
        return write(dest);
    }
    let partial = partial_of(dest);
    let mode = existing.as_ref().map_or(0o666, |meta| meta.mode() & 0o7777);
    let created = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&partial);
    let file = match created {
        Ok(file) => file,
        // No room for a new name beside it: the file itself is written, as before.
        Err(e)
            if existing.is_some()
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
        {
            return write(dest);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("{}: cannot create it", partial.display()));
        }
    };
    // A partial file left by an earlier run keeps its own mode through `create`.
    if existing.is_some() {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("{}: cannot set its permissions", partial.display()))?;
    }
    let written = write(&partial).and_then(|()| {
        file.sync_all()
            .with_context(|| format!("{}: cannot sync it", partial.display()))?;
        std::fs::rename(&partial, dest)
            .with_context(|| format!("{}: cannot rename it into place", dest.display()))?;
        // The rename is durable once the folder is.
        File::open(folder)
            .and_then(|folder| folder.sync_all())
            .with_context(|| format!("{}: cannot sync the folder", folder.display()))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Where a conversion into a regular file `dest` writes before the rename.
fn partial_of(dest: &Path) -> PathBuf {
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    PathBuf::from(partial)
}

/// The files a conversion of `image` reads: each image of its chain and each external data
/// file.
pub fn chain_inputs(image: &Image) -> Vec<PathBuf> {
    let mut inputs = Vec::new();
    for layer in image.chain() {
        let data_file = layer.qcow2.and_then(|q| q.data_file);
        inputs.push(PathBuf::from(layer.name));
        inputs.extend(data_file.map(PathBuf::from));
    }
    inputs
}

/// Refuses a destination that is one of the `inputs` (the same file, by device and inode,
/// whatever the path): truncating it would destroy what is being converted.
pub fn refuse_overwriting(dest: &Path, inputs: &[PathBuf]) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // `DEST.partial`, which a file conversion writes first, counts as the destination too.
    let dest = strata::follow_links(dest).unwrap_or_else(|_| dest.to_path_buf());
    for written in [partial_of(&dest), dest.clone()] {
        let Ok(target) = std::fs::metadata(&written) else {
            continue;
        };
        for input in inputs {
            if let Ok(meta) = std::fs::metadata(input)
                && (meta.dev(), meta.ino()) == (target.dev(), target.ino())
            {
                anyhow::bail!(
                    "{}: the conversion would write {}, which is {}, an input of the \
                     conversion; write elsewhere",
                    dest.display(),
                    written.display(),
                    input.display()
                );
            }
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
