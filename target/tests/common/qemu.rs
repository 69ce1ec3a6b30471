//! Chains made by qemu-img and qemu-io, stored in a target, merged by `qemu-img convert`, and
//! read back through Strata's QCOW2 reader: the fixtures of the retention tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_qcow2::{Image, ImageSink, OpenOptions, hydrate};
use strata_target::{BackupManifest, BackupSpec, Target, VolumeName, image_name};

use super::BoxError;

/// Virtual size of the test chains.
pub const VIRTUAL_SIZE: u64 = 16 << 20;

/// One backup point made by qemu: its QCOW2 file and the raw bytes it stands for.
pub struct Point {
    pub image: Vec<u8>,
    pub raw: Vec<u8>,
}

/// Writes made on top of each point of a chain (`qemu-io` commands).
pub const WRITES: [&[&str]; 4] = [
    &["write -P 0x11 0 5M", "write -P 0x12 9M 1M"],
    &["write -P 0x22 1M 2M", "write -z 9M 512k"],
    &["write -P 0x33 4M 3M", "write -P 0x34 15M 1M"],
    &["write -P 0x44 0 64k", "write -P 0x45 6M 4M"],
];

pub fn run(command: &mut Command) -> Result<(), BoxError> {
    let out = command.output()?;
    if !out.status.success() {
        return Err(format!(
            "{command:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// Makes a chain of `points.len()` images in `dir` named `<ids[i]>.qcow2`, each overlay backed
/// by the previous one's relative name, and returns each point's image file and raw bytes.
pub fn make_chain(dir: &Path, ids: &[String]) -> Result<Vec<Point>, BoxError> {
    let mut points = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let name = format!("{id}.qcow2");
        let mut create = Command::new("qemu-img");
        create
            .current_dir(dir)
            .args(["create", "-q", "-f", "qcow2"]);
        if i > 0 {
            let backing = format!("{}.qcow2", ids[i - 1]);
            create.args(["-F", "qcow2", "-b", &backing]);
        }
        run(create.args([&name, &VIRTUAL_SIZE.to_string()]))?;
        for write in WRITES[i % WRITES.len()] {
            run(Command::new("qemu-io")
                .current_dir(dir)
                .args(["-f", "qcow2", "-c", write, &name]))?;
        }
        let raw = dir.join(format!("{id}.raw"));
        run(Command::new("qemu-img")
            .current_dir(dir)
            .args(["convert", "-O", "raw", &name])
            .arg(&raw))?;
        points.push(Point {
            image: std::fs::read(dir.join(&name))?,
            raw: std::fs::read(&raw)?,
        });
    }
    Ok(points)
}

/// Streams a whole image file through `sink`: the first `min_header_len` bytes as the header
/// area, the rest as the body.
pub fn stream_into(sink: &mut impl ImageSink, bytes: &[u8]) -> std::io::Result<()> {
    let header_len = (sink.min_header_len() as usize).min(bytes.len());
    let (header, body) = bytes.split_at(header_len);
    for chunk in body.chunks(300_000) {
        sink.append(chunk)?;
    }
    sink.finish(header)
}

/// Stores the chain's images as backups with the given ids, base first.
pub fn store_chain(
    target: &Target,
    volume: &VolumeName,
    ids: &[String],
    points: &[Point],
) -> Result<Vec<BackupManifest>, BoxError> {
    let mut manifests: Vec<BackupManifest> = Vec::new();
    for (id, point) in ids.iter().zip(points) {
        let mut upload = target.begin_backup(
            volume,
            BackupSpec {
                id: Some(id.parse()?),
                parent: manifests.last().map(|m| m.id.clone()),
                virtual_size: VIRTUAL_SIZE,
                cluster_size: 64 << 10,
            },
        )?;
        let mut sink = upload.image_sink()?;
        stream_into(&mut sink, &point.image)?;
        drop(sink);
        upload.put_file(&"digests".parse()?, bytes::Bytes::from(id.clone()))?;
        upload.put_file(
            &"checksums".parse()?,
            bytes::Bytes::from(format!("{id}-crc")),
        )?;
        manifests.push(upload.commit()?);
    }
    Ok(manifests)
}

/// What a fold of `ids[parent]` into `ids[parent + 1]` writes: that point merged by qemu-img
/// over the parent's backing file (if any), from the local files in `dir`: `convert` to a
/// standalone image for a base, `rebase` onto the grandparent (which copies every cluster
/// the parent contributed) otherwise.
pub fn merged_image(dir: &Path, ids: &[String], parent: usize) -> Result<Vec<u8>, BoxError> {
    let child = format!("{}.qcow2", ids[parent + 1]);
    let out = format!("{}.merged.qcow2", ids[parent + 1]);
    if parent == 0 {
        run(Command::new("qemu-img")
            .current_dir(dir)
            .args(["convert", "-f", "qcow2", "-O", "qcow2", &child, &out]))?;
    } else {
        std::fs::copy(dir.join(&child), dir.join(&out))?;
        let backing = format!("{}.qcow2", ids[parent - 1]);
        run(Command::new("qemu-img")
            .current_dir(dir)
            .args(["rebase", "-f", "qcow2", "-F", "qcow2", "-b", &backing, &out]))?;
    }
    Ok(std::fs::read(dir.join(out))?)
}

/// Restores a point through Strata's reader from an already opened chain.
pub fn hydrate_image(image: &Image) -> Result<Vec<u8>, BoxError> {
    let out = tempfile::NamedTempFile::new()?;
    hydrate(image, out.as_file(), "restore")?;
    Ok(std::fs::read(out.path())?)
}

/// Opens the chain of backup `manifest` straight from the target.
pub fn open_point(
    target: &Target,
    volume: &VolumeName,
    manifest: &BackupManifest,
) -> Result<Image, BoxError> {
    Ok(Image::open_with(
        &target.storage(volume),
        &manifest.image.object,
        &OpenOptions::default(),
    )?)
}

/// Restores committed backup `id` as a fresh reader would.
pub fn restore(
    target: &Target,
    volume: &VolumeName,
    id: &strata_target::BackupId,
) -> Result<Vec<u8>, BoxError> {
    let manifest = target.backup(volume, id)?;
    hydrate_image(&open_point(target, volume, &manifest)?)
}

/// `qemu-img info --backing-chain` of a backup's canonical image in a folder target: the
/// number of images in its chain.
pub fn qemu_chain_len(folder: &Path, id: &strata_target::BackupId) -> Result<usize, BoxError> {
    let image: PathBuf = folder.join(image_name(id));
    let out = Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json"])
        .arg(&image)
        .output()?;
    if !out.status.success() {
        return Err(format!("qemu-img info: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let chain: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(chain.as_array().map(Vec::len).unwrap_or(0))
}

/// `qemu-img compare` of a raw file holding `raw` with a backup's canonical image in a folder.
pub fn qemu_compare(
    folder: &Path,
    id: &strata_target::BackupId,
    raw: &[u8],
) -> Result<(), BoxError> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), raw)?;
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(file.path())
        .arg(folder.join(image_name(id))))
}
