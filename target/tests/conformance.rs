//! One conformance suite for every kind of target: local folder, memory, and S3 (moto).
//!
//! Each test is a function of a [`Fixture`]; the `conformance!` macro runs it on all three.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use bytes::Bytes;
use common::{
    Fixture, Kind, TestResult, backup, fixture, read_all, spec, volume, write_image,
    write_synthetic,
};
use strata_qcow2::{Image, ImageSink, OpenOptions, Storage, hydrate};
use strata_target::{
    AppBackupId, AppName, BackupId, BackupSpec, Error, FORMAT_VERSION, FileName, VolumeBackupRef,
};

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod local { $( #[test] fn $name() -> super::TestResult { super::$name(super::fixture(super::Kind::Local)) } )* }
        mod memory { $( #[test] fn $name() -> super::TestResult { super::$name(super::fixture(super::Kind::Memory)) } )* }
        mod s3 {
            $( #[test] fn $name() -> super::TestResult {
                if !super::common::moto::available() { return Ok(()); }
                super::$name(super::fixture(super::Kind::S3))
            } )*
        }
    };
}

conformance!(
    a_fresh_repository_is_empty_and_versioned,
    full_and_incremental_backups_commit_and_read_back,
    uncommitted_backups_are_invisible_and_cleaned_up,
    one_id_has_one_writer,
    concurrent_children_of_one_parent_fork_nothing,
    abandoning_a_child_frees_its_parent,
    gc_never_removes_a_live_writers_objects,
    header_areas_of_other_lengths,
    side_files_are_checked,
    large_side_files_stream_in_parts_and_download_checked,
    application_backups_round_trip,
    application_backups_expire_by_manifest,
    storage_refuses_escaping_names,
    concurrent_readers_see_the_same_bytes,
    qemu_made_chain_round_trips,
    deleting_a_head_reopens_its_parent,
    downloads_are_checked_against_the_manifest,
);

const BODY: usize = 11 << 20;

fn a_fresh_repository_is_empty_and_versioned(f: Fixture) -> TestResult {
    assert!(f.target.volumes()?.is_empty());
    assert!(f.target.backups(&volume("v"))?.is_empty());
    assert!(f.target.latest(&volume("v"))?.is_none());
    // Opening again finds the marker instead of failing on the create-only put.
    let again = f.reopen();
    assert!(again.volumes()?.is_empty());
    assert_eq!(FORMAT_VERSION, 1);
    Ok(())
}

fn full_and_incremental_backups_commit_and_read_back(f: Fixture) -> TestResult {
    let v = volume("data");
    let (base, base_bytes) = backup(&f.target, &v, None, 1, BODY)?;
    assert_eq!(base.parent, None);
    assert_eq!(base.image.object, format!("{}.qcow2", base.id));
    assert_eq!(base.image.size, base_bytes.len() as u64);
    assert_eq!(base.image.checksums.crc32.0, crc32fast::hash(&base_bytes));

    let mut upload = f.target.begin_backup(&v, spec(Some(&base)))?;
    assert_eq!(upload.backing_name(), Some(format!("{}.qcow2", base.id)));
    let top_bytes = write_image(&mut upload, 2, 3 << 20)?;
    upload.put_file(
        &FileName::new("digests")?,
        Bytes::from_static(b"digest manifest"),
    )?;
    let top = upload.commit()?;

    let listed = f.target.backups(&v)?;
    assert_eq!(
        listed.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![base.id.clone(), top.id.clone()]
    );
    assert_eq!(f.target.latest(&v)?.map(|m| m.id), Some(top.id.clone()));
    assert_eq!(f.target.volumes()?, vec![v.clone()]);
    let chain = f.target.chain(&v, &top.id)?;
    assert_eq!(
        chain.iter().map(|m| &m.id).collect::<Vec<_>>(),
        vec![&base.id, &top.id]
    );
    assert_eq!(read_all(&f.target.open_image(&v, &base.id)?)?, base_bytes);
    assert_eq!(read_all(&f.target.open_image(&v, &top.id)?)?, top_bytes);
    assert_eq!(f.target.verify_image(&v, &top.id)?.id, top.id);
    assert_eq!(
        &f.target
            .read_file(&v, &top.id, &FileName::new("digests")?)?[..],
        b"digest manifest"
    );
    // Another handle (another process) sees the same committed state.
    assert_eq!(f.reopen().backups(&v)?, listed);
    Ok(())
}

fn uncommitted_backups_are_invisible_and_cleaned_up(f: Fixture) -> TestResult {
    let v = volume("data");
    let (base, base_bytes) = backup(&f.target, &v, None, 1, 1 << 20)?;
    let mut upload = f.target.begin_backup(&v, spec(Some(&base)))?;
    let id = upload.id().clone();
    write_image(&mut upload, 3, BODY)?;
    // The image is complete but not committed: nobody sees it.
    assert_eq!(f.target.backups(&v)?.len(), 1);
    assert!(matches!(
        f.target.backup(&v, &id),
        Err(Error::NotFound { .. })
    ));
    // Meanwhile the parent is taken.
    let other = f.reopen().begin_backup(&v, spec(Some(&base)));
    assert!(
        matches!(other, Err(Error::ParentNotHead { ref child, .. }) if *child == id.to_string())
    );
    drop(upload);
    // Dropped uncommitted: reservations released, image removed, the parent is free again.
    assert!(
        f.target.gc(Duration::ZERO)?.removed.is_empty(),
        "drop left garbage behind"
    );
    let (next, _) = backup(&f.target, &v, Some(&base), 4, 1 << 20)?;
    assert_eq!(next.parent, Some(base.id.clone()));
    assert_eq!(read_all(&f.target.open_image(&v, &base.id)?)?, base_bytes);
    Ok(())
}

fn one_id_has_one_writer(f: Fixture) -> TestResult {
    let v = volume("data");
    let id = BackupId::new("same-id")?;
    let writers = 4;
    let barrier = Arc::new(Barrier::new(writers));
    let handles: Vec<_> = (0..writers)
        .map(|i| {
            let (target, barrier, v, id) = (f.reopen(), barrier.clone(), v.clone(), id.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let spec = BackupSpec {
                    id: Some(id),
                    ..spec(None)
                };
                let mut upload = target.begin_backup(&v, spec)?;
                write_image(&mut upload, 10 + i as u64, 1 << 20)?;
                let manifest = upload.commit()?;
                Ok::<_, common::BoxError>(manifest)
            })
        })
        .collect();
    let mut won = 0;
    for handle in handles {
        match handle.join().map_err(|_| "writer panicked")? {
            Ok(_) => won += 1,
            Err(err) => assert!(
                matches!(
                    err.downcast_ref::<Error>(),
                    Some(Error::BackupExists { .. })
                ),
                "unexpected error: {err}"
            ),
        }
    }
    assert_eq!(won, 1);
    let committed = f.target.backup(&v, &id)?;
    f.target.verify_image(&v, &id)?;
    // Once committed, the id stays taken.
    let again = f.target.begin_backup(
        &v,
        BackupSpec {
            id: Some(id.clone()),
            ..spec(None)
        },
    );
    assert!(matches!(again, Err(Error::BackupExists { .. })));
    assert_eq!(f.target.backup(&v, &id)?, committed);
    Ok(())
}

fn concurrent_children_of_one_parent_fork_nothing(f: Fixture) -> TestResult {
    let v = volume("data");
    let (base, _) = backup(&f.target, &v, None, 1, 1 << 20)?;
    let writers = 4;
    let barrier = Arc::new(Barrier::new(writers));
    let handles: Vec<_> = (0..writers)
        .map(|i| {
            let (target, barrier, v, base) = (f.reopen(), barrier.clone(), v.clone(), base.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut upload = target.begin_backup(&v, spec(Some(&base)))?;
                write_image(&mut upload, 20 + i as u64, 1 << 20)?;
                let manifest = upload.commit()?;
                Ok::<_, common::BoxError>(manifest)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for handle in handles {
        match handle.join().map_err(|_| "writer panicked")? {
            Ok(manifest) => winners.push(manifest),
            Err(err) => match err.downcast_ref::<Error>() {
                Some(Error::ParentNotHead { parent, child, .. }) => {
                    assert_eq!(parent, &base.id.to_string());
                    losers.push(child.clone());
                }
                _ => panic!("unexpected error: {err}"),
            },
        }
    }
    assert_eq!(winners.len(), 1, "exactly one child may extend the parent");
    let winner = &winners[0];
    // Losers that lost to a committed or in-progress sibling all name the single winner.
    assert!(
        losers.iter().all(|c| *c == winner.id.to_string()),
        "{losers:?}"
    );
    assert_eq!(f.target.backups(&v)?.len(), 2);
    // The stale parent stays taken; the new head can be extended.
    let late = f.target.begin_backup(&v, spec(Some(&base)));
    assert!(matches!(late, Err(Error::ParentNotHead { .. })));
    let (grandchild, _) = backup(&f.target, &v, Some(winner), 30, 1 << 20)?;
    assert_eq!(f.target.chain(&v, &grandchild.id)?.len(), 3);
    Ok(())
}

fn abandoning_a_child_frees_its_parent(f: Fixture) -> TestResult {
    let v = volume("data");
    let (base, _) = backup(&f.target, &v, None, 1, 1 << 20)?;
    let mut upload = f.target.begin_backup(&v, spec(Some(&base)))?;
    write_image(&mut upload, 2, 1 << 20)?;
    upload.abandon()?;
    let (child, _) = backup(&f.target, &v, Some(&base), 3, 1 << 20)?;
    assert_eq!(f.target.backups(&v)?.last().map(|m| &m.id), Some(&child.id));
    // Committing before the image is finished is refused.
    let upload = f.target.begin_backup(&v, spec(Some(&child)))?;
    assert!(matches!(upload.commit(), Err(Error::Upload { .. })));
    // A parent that is not committed cannot be extended.
    let missing = BackupSpec {
        parent: Some(BackupId::new("nope")?),
        ..spec(None)
    };
    assert!(matches!(
        f.target.begin_backup(&v, missing),
        Err(Error::NotFound {
            what: "parent backup",
            ..
        })
    ));
    Ok(())
}

fn gc_never_removes_a_live_writers_objects(f: Fixture) -> TestResult {
    let v = volume("data");
    let (base, base_bytes) = backup(&f.target, &v, None, 1, 1 << 20)?;
    // A writer that goes quiet after uploading its image but is still alive: its lock is held
    // (folder) and its lease renewed (object stores), however long it takes.
    let mut quiet = f.target.begin_backup(&v, spec(Some(&base)))?;
    write_image(&mut quiet, 2, 1 << 20)?;
    quiet.put_file(&FileName::new("digests")?, Bytes::from_static(b"x"))?;
    std::mem::forget(quiet);
    // Past the two leases and a second after which gc would judge a writer that stopped
    // renewing dead: only renewals keep this one's objects.
    std::thread::sleep(Duration::from_millis(3500));
    assert!(f.target.gc(Duration::ZERO)?.removed.is_empty());
    // Nor does a later writer take the parent from it: on an object store it watches the
    // lease, sees it renewed and gives up.
    assert!(matches!(
        f.reopen().begin_backup(&v, spec(Some(&base))),
        Err(Error::ParentNotHead { .. })
    ));
    assert_eq!(read_all(&f.target.open_image(&v, &base.id)?)?, base_bytes);
    f.target.verify_image(&v, &base.id)?;
    Ok(())
}

/// Header areas of any length: one longer than the sink asks for, and one of a single 64 KiB
/// cluster, far below a multipart upload's minimum part size (the sink holds back the body's
/// first bytes to make part 1 long enough), with a body within one part and one of several
/// parts. Every image reads back byte for byte and is exactly as long as header and body: no
/// padding. (Before, a multipart upload refused a header area below 5 MiB, so every image on
/// S3 carried one.)
fn header_areas_of_other_lengths(f: Fixture) -> TestResult {
    let v = volume("data");
    let min = {
        let mut upload = f.target.begin_backup(&v, spec(None))?;
        let sink = upload.image_sink()?;
        sink.min_header_len() as usize
    };
    let cases = [
        (min + (128 << 10), 3 << 20),
        (64 << 10, 3 << 20),
        (64 << 10, 13 << 20),
        (64 << 10, 0),
    ];
    for (seed, (header, body)) in (5u64..).zip(cases) {
        let mut upload = f.target.begin_backup(&v, spec(None))?;
        let mut sink = upload.image_sink()?;
        let bytes = write_synthetic(&mut sink, seed, header, body)?;
        drop(sink);
        let manifest = upload.commit()?;
        assert_eq!(
            read_all(&f.target.open_image(&v, &manifest.id)?)?,
            bytes,
            "header {header}, body {body}"
        );
        assert_eq!(manifest.image.size, (header + body) as u64);
    }
    Ok(())
}

fn side_files_are_checked(f: Fixture) -> TestResult {
    let v = volume("data");
    let mut upload = f.target.begin_backup(&v, spec(None))?;
    write_image(&mut upload, 1, 1 << 20)?;
    let name = FileName::new("digests")?;
    upload.put_file(&name, Bytes::from(vec![7u8; 100_000]))?;
    let manifest = upload.commit()?;
    assert_eq!(manifest.files.len(), 1);
    assert_eq!(manifest.files[0].size, 100_000);
    assert_eq!(f.target.read_file(&v, &manifest.id, &name)?.len(), 100_000);
    let missing = f
        .target
        .read_file(&v, &manifest.id, &FileName::new("other")?);
    assert!(matches!(
        missing,
        Err(Error::NotFound {
            what: "side file",
            ..
        })
    ));
    Ok(())
}

/// A side file of several upload parts (a digest manifest of a large volume) goes up a part
/// at a time and comes back into a temporary file, byte for byte; a damaged one is refused.
fn large_side_files_stream_in_parts_and_download_checked(f: Fixture) -> TestResult {
    let v = volume("data");
    let mut upload = f.target.begin_backup(&v, spec(None))?;
    write_image(&mut upload, 1, 1 << 20)?;
    let name = FileName::new("digests")?;
    let bytes = common::pattern(5, 12 << 20);
    upload.put_file_streamed(
        &name,
        strata_target::SideBody::from_reader(std::io::Cursor::new(bytes.clone())),
    )?;
    let manifest = upload.commit()?;
    assert_eq!(manifest.files[0].size, 12 << 20);
    assert_eq!(manifest.files[0].checksums.crc32.0, crc32fast::hash(&bytes));
    let file = f.target.download_file(&v, &manifest.id, &name)?;
    let mut back = vec![0u8; bytes.len()];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 0)?;
    assert!(back == bytes, "the downloaded side file differs");
    assert_eq!(file.metadata()?.len(), bytes.len() as u64);
    if let Kind::Local = f.kind {
        let path = format!("{}/volumes/data/files/{}/digests", f.url, manifest.id);
        std::fs::write(&path, &bytes[..1000])?;
        let damaged = f.target.download_file(&v, &manifest.id, &name);
        assert!(
            matches!(
                damaged,
                Err(Error::Corrupt {
                    what: "side file",
                    ..
                })
            ),
            "{damaged:?}"
        );
    }
    Ok(())
}

fn application_backups_round_trip(f: Fixture) -> TestResult {
    let app = AppName::new("shop")?;
    let id = AppBackupId::new("nightly-1")?;
    let v = volume("db");
    let (b, _) = backup(&f.target, &v, None, 1, 1 << 20)?;
    let refs = vec![VolumeBackupRef {
        volume: v,
        backup: b.id,
    }];
    let archive = Bytes::from_static(b"apiVersion: v1\nkind: List\n");
    let manifest = f
        .target
        .put_app_backup(&app, &id, refs.clone(), archive.clone())?;
    assert_eq!(f.target.app_backups(&app)?, vec![manifest]);
    assert_eq!(f.target.read_app_archive(&app, &id)?, archive);
    let again = f
        .target
        .put_app_backup(&app, &id, refs.clone(), Bytes::from_static(b"other"));
    assert!(matches!(again, Err(Error::BackupExists { .. })));
    assert_eq!(f.target.read_app_archive(&app, &id)?, archive);
    // An archive past the cap is refused when stored, and a manifest claiming one when read.
    let huge = Bytes::from(vec![0u8; strata_target::MAX_APP_ARCHIVE as usize + 1]);
    let refused = f
        .target
        .put_app_backup(&app, &AppBackupId::new("huge")?, refs, huge);
    assert!(matches!(refused, Err(Error::Upload { .. })), "{refused:?}");
    assert!(
        f.target
            .app_backups(&app)?
            .iter()
            .all(|m| m.id.as_str() != "huge")
    );
    if let Kind::Local = f.kind {
        let path = format!("{}/applications/shop/nightly-1.json", f.url);
        let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        doc["archive_size"] = serde_json::json!(1u64 << 30);
        std::fs::write(&path, serde_json::to_vec(&doc)?)?;
        let err = f
            .target
            .read_app_archive(&app, &id)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1073741824 bytes, more than the 67108864 allowed"),
            "{err}"
        );
    }
    Ok(())
}

fn application_backups_expire_by_manifest(f: Fixture) -> TestResult {
    let (shop, blog) = (AppName::new("shop")?, AppName::new("blog")?);
    let v = volume("db");
    let (b, _) = backup(&f.target, &v, None, 1, 1 << 20)?;
    let refs = vec![VolumeBackupRef {
        volume: v.clone(),
        backup: b.id.clone(),
    }];
    let (old, new) = (AppBackupId::new("old")?, AppBackupId::new("new")?);
    let archive = Bytes::from_static(b"kind: List\n");
    f.target
        .put_app_backup(&shop, &old, refs.clone(), archive.clone())?;
    let kept = f
        .target
        .put_app_backup(&shop, &new, refs.clone(), archive.clone())?;
    let other = f
        .target
        .put_app_backup(&blog, &old, refs, archive.clone())?;
    assert_eq!(f.target.all_app_backups()?.len(), 3);

    f.target.delete_app_backup(&shop, &old)?;
    assert_eq!(f.target.app_backups(&shop)?, vec![kept.clone()]);
    let missing = f.target.app_backup(&shop, &old);
    assert!(
        matches!(&missing, Err(Error::NotFound { name, .. }) if name == "shop/old"),
        "{missing:?}"
    );
    assert!(matches!(
        f.target.read_app_archive(&shop, &old),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(f.target.app_backup(&shop, &new)?, kept);
    // Another application's backup of the same id, and the volume backup, are untouched.
    assert_eq!(f.target.app_backup(&blog, &old)?, other);
    assert_eq!(f.target.backups(&v)?, vec![b]);
    let mut all: Vec<String> = f
        .target
        .all_app_backups()?
        .iter()
        .map(|m| format!("{}/{}", m.app, m.id))
        .collect();
    all.sort();
    assert_eq!(all, ["blog/old", "shop/new"]);
    // Expiring again (a rerun after a crash) succeeds.
    f.target.delete_app_backup(&shop, &old)?;
    Ok(())
}

fn storage_refuses_escaping_names(f: Fixture) -> TestResult {
    let v = volume("data");
    let (b, bytes) = backup(&f.target, &v, None, 1, 1 << 20)?;
    let storage = f.target.storage(&v);
    for bad in [
        "",
        "/etc/passwd",
        "../other/images/x.qcow2",
        "a/../b",
        "./x",
    ] {
        let err = storage.open(bad).err().ok_or("escaping name accepted")?;
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::InvalidInput,
            "{bad:?}: {err}"
        );
    }
    let missing = storage
        .open("nope.qcow2")
        .err()
        .ok_or("missing image opened")?;
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    let image = storage.open(&format!("{}.qcow2", b.id))?;
    assert_eq!(read_all(&image)?, bytes);
    let mut buf = [0u8; 16];
    let past = image
        .read_exact_at(&mut buf, bytes.len() as u64 - 8)
        .err()
        .ok_or("read past the end")?;
    assert_eq!(past.kind(), std::io::ErrorKind::UnexpectedEof);
    Ok(())
}

fn concurrent_readers_see_the_same_bytes(f: Fixture) -> TestResult {
    let v = volume("data");
    let (b, bytes) = backup(&f.target, &v, None, 9, BODY)?;
    let image = f.target.open_image(&v, &b.id)?;
    let bytes = Arc::new(bytes);
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let (image, bytes) = (image.clone(), bytes.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut x = t + 1;
                for _ in 0..60 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let len = (x >> 40) as usize % (700 << 10) + 1;
                    let off = (x >> 8) as usize % (bytes.len() - len);
                    let mut buf = vec![0u8; len];
                    image.read_exact_at(&mut buf, off as u64)?;
                    assert!(
                        buf == bytes[off..off + len],
                        "bytes differ at {off:#x}+{len:#x}"
                    );
                }
                Ok(())
            })
        })
        .collect();
    for handle in handles {
        handle.join().map_err(|_| "reader panicked")??;
    }
    Ok(())
}

/// Images made by qemu-img stream through the sink unchanged (split at the header area), keep
/// their relative backing names, and come back identical: `qemu-img compare` on the downloads,
/// and on a filesystem target `qemu-img info --backing-chain` right in the repository folder.
fn qemu_made_chain_round_trips(f: Fixture) -> TestResult {
    let dir = tempfile::tempdir()?;
    let v = volume("qemu");
    let mut upload = f.target.begin_backup(&v, spec(None))?;
    let base_name = upload.image_name();
    let base_path = dir.path().join(&base_name);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &base_path.display().to_string(),
        "64M",
    ])?;
    qemu_io(&base_path, "write -P 0x11 0 7M")?;
    upload_file(&mut upload, &base_path)?;
    let base = upload.commit()?;

    let mut upload = f.target.begin_backup(&v, spec(Some(&base)))?;
    let top_name = upload.image_name();
    let top_path = dir.path().join(&top_name);
    let backing = upload.backing_name().ok_or("no backing name")?;
    let status = std::process::Command::new("qemu-img")
        .current_dir(dir.path())
        .args([
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &backing, &top_name,
        ])
        .status()?;
    assert!(status.success());
    qemu_io(&top_path, "write -P 0x22 6M 2M")?;
    qemu_io(&top_path, "write -P 0x33 40M 4M")?;
    upload_file(&mut upload, &top_path)?;
    let top = upload.commit()?;

    let out = tempfile::tempdir()?;
    for m in [&base, &top] {
        let bytes = read_all(&f.target.open_image(&v, &m.id)?)?;
        std::fs::write(out.path().join(&m.image.object), bytes)?;
    }
    let downloaded = out.path().join(&top.image.object);
    assert!(
        compare(&top_path, &downloaded)?,
        "downloaded chain differs from the original"
    );

    // Strata's reader opens the chain straight from the target, following the backing name.
    let storage = f.target.storage(&v);
    let image = Image::open_with(&storage, &top.image.object, &OpenOptions::default())?;
    assert_eq!(image.virtual_size(), 64 << 20);
    let raw_path = out.path().join("hydrated.raw");
    let raw = std::fs::File::create(&raw_path)?;
    hydrate(&image, &raw, "hydrated.raw")?;
    assert!(
        compare(&top_path, &raw_path)?,
        "chain read from the target differs"
    );
    if let Some(folder) = f.target.local_image_dir(&v) {
        let in_repo = folder.join(&top.image.object);
        let info = std::process::Command::new("qemu-img")
            .args([
                "info",
                "--backing-chain",
                "--output=json",
                &in_repo.display().to_string(),
            ])
            .output()?;
        assert!(
            info.status.success(),
            "{}",
            String::from_utf8_lossy(&info.stderr)
        );
        let chain: serde_json::Value = serde_json::from_slice(&info.stdout)?;
        assert_eq!(chain.as_array().map(Vec::len), Some(2));
        assert!(compare(&top_path, &in_repo)?);
    }
    Ok(())
}

fn upload_file(upload: &mut strata_target::BackupUpload, path: &std::path::Path) -> TestResult {
    let bytes = std::fs::read(path)?;
    let mut sink = upload.image_sink()?;
    let header_len = sink.min_header_len() as usize;
    assert!(
        bytes.len() > header_len,
        "qemu image smaller than the header area"
    );
    let (header, body) = bytes.split_at(header_len);
    for chunk in body.chunks(300_000) {
        sink.append(chunk)?;
    }
    sink.finish(header)?;
    Ok(())
}

fn qemu(args: &[&str]) -> TestResult {
    let status = std::process::Command::new("qemu-img").args(args).status()?;
    assert!(status.success(), "qemu-img {args:?}");
    Ok(())
}

fn qemu_io(path: &std::path::Path, command: &str) -> TestResult {
    let out = std::process::Command::new("qemu-io")
        .args(["-c", command, &path.display().to_string()])
        .output()?;
    assert!(
        out.status.success(),
        "qemu-io {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn compare(a: &std::path::Path, b: &std::path::Path) -> Result<bool, common::BoxError> {
    let status = std::process::Command::new("qemu-img")
        .args([
            "compare",
            "-q",
            &a.display().to_string(),
            &b.display().to_string(),
        ])
        .status()?;
    Ok(status.success())
}

fn deleting_a_head_reopens_its_parent(f: Fixture) -> TestResult {
    let v = volume("data");
    let (base, base_bytes) = backup(&f.target, &v, None, 1, 1 << 20)?;
    let (top, _) = backup(&f.target, &v, Some(&base), 2, 1 << 20)?;
    let refused = f.target.delete_backup(&v, &base.id);
    assert!(
        matches!(refused, Err(Error::HasChild { ref child, .. }) if *child == top.id.to_string()),
        "{refused:?}"
    );
    assert_eq!(f.target.delete_backup(&v, &top.id)?, top);
    assert_eq!(f.target.backups(&v)?, vec![base.clone()]);
    assert!(
        f.target.gc(Duration::ZERO)?.removed.is_empty(),
        "delete left garbage"
    );
    // The parent is the head again, and the base is untouched.
    let (again, _) = backup(&f.target, &v, Some(&base), 3, 1 << 20)?;
    assert_eq!(again.parent, Some(base.id.clone()));
    assert_eq!(read_all(&f.target.open_image(&v, &base.id)?)?, base_bytes);
    f.target.delete_backup(&v, &again.id)?;
    f.target.delete_backup(&v, &base.id)?;
    assert!(f.target.backups(&v)?.is_empty());
    Ok(())
}

fn downloads_are_checked_against_the_manifest(f: Fixture) -> TestResult {
    let v = volume("data");
    let (b, bytes) = backup(&f.target, &v, None, 5, 3 << 20)?;
    let mut out = Vec::new();
    assert_eq!(f.target.download_image(&v, &b.id, &mut out)?, b);
    assert!(out == bytes, "downloaded bytes differ");
    if let Some(dir) = f.target.local_image_dir(&v) {
        // A flipped byte on disk is caught by the CRC.
        let path = dir.join(&b.image.object);
        let mut damaged = std::fs::read(&path)?;
        damaged[1 << 20] ^= 0x40;
        std::fs::write(&path, damaged)?;
        let err = f.target.verify_image(&v, &b.id);
        assert!(
            matches!(err, Err(Error::Corrupt { what: "image", .. })),
            "{err:?}"
        );
    }
    Ok(())
}
