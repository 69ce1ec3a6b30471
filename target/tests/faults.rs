//! Fault injection: failed requests, failed part uploads and short reads never make a partial
//! backup visible and never damage a committed one.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::TestResult;
use common::faulty::{FaultyStore, Plan};
use common::{read_all, spec, volume, write_image};
use strata_target::{
    BackupManifest, Error, FileName, RetryPolicy, Target, TargetOptions, VolumeName,
};

const BODY: usize = 700 << 10;

fn options(attempts: u32) -> TargetOptions {
    let mut options = TargetOptions::default();
    options.min_part_size = 64 << 10;
    options.part_size = 64 << 10;
    options.read_block_size = 64 << 10;
    options.max_request = 128 << 10;
    options.max_readahead = 256 << 10;
    options.retry = RetryPolicy {
        attempts,
        first_backoff: Duration::from_millis(1),
    };
    options
}

fn target(attempts: u32) -> Result<(Arc<FaultyStore>, Target), common::BoxError> {
    let store = Arc::new(FaultyStore::default());
    let target = Target::from_store(store.clone(), "repo", options(attempts))?;
    Ok((store, target))
}

/// One whole overlay backup: claim, image, side file, commit.
fn overlay(
    target: &Target,
    v: &VolumeName,
    base: &BackupManifest,
) -> Result<BackupManifest, common::BoxError> {
    let mut upload = target.begin_backup(v, spec(Some(base)))?;
    write_image(&mut upload, 42, BODY)?;
    upload.put_file(
        &FileName::new("digests")?,
        bytes::Bytes::from_static(b"digests"),
    )?;
    Ok(upload.commit()?)
}

/// Whatever single request fails (retries off), the overlay is either committed and whole,
/// or invisible; the base is never touched, and the parent is free again after a failure.
#[test]
fn a_failure_at_any_request_leaves_nothing_partial() -> TestResult {
    let v = volume("data");
    let (store, probe) = target(1)?;
    let (base, _) = common::backup(&probe, &v, None, 1, BODY)?;
    let before = store.requests();
    overlay(&probe, &v, &base)?;
    let requests = store.requests() - before;
    assert!(
        requests > 10,
        "flow too short to be interesting: {requests}"
    );

    for n in 1..=requests {
        let (store, target) = target(1)?;
        let (base, base_bytes) = common::backup(&target, &v, None, 1, BODY)?;
        store.fail_next(n, n + 1);
        let outcome = overlay(&target, &v, &base);
        store.set_plan(Plan::default());
        let listed = target.backups(&v)?;
        match outcome {
            Ok(top) => {
                assert_eq!(listed.len(), 2, "request {n}");
                target.verify_image(&v, &top.id)?;
            }
            Err(err) => {
                assert_eq!(
                    listed,
                    vec![base.clone()],
                    "request {n} failed ({err}) yet something is listed"
                );
                // The failed writer released the parent (unless its cleanup was what failed).
                if target.gc(Duration::ZERO)?.removed.is_empty() {
                    let retry = overlay(&target, &v, &base)?;
                    assert_eq!(retry.parent.as_ref(), Some(&base.id));
                }
            }
        }
        assert_eq!(
            read_all(&target.open_image(&v, &base.id)?)?,
            base_bytes,
            "request {n}"
        );
        target.verify_image(&v, &base.id)?;
    }
    Ok(())
}

/// With retries on, one transient failure anywhere is absorbed and the backup commits.
#[test]
fn transient_failures_are_retried() -> TestResult {
    let v = volume("data");
    let (store, target) = target(4)?;
    let (base, _) = common::backup(&target, &v, None, 1, BODY)?;
    for n in 1..=20 {
        store.fail_next(n, n + 1);
        let mut upload = target.begin_backup(&v, spec(None))?;
        let bytes = write_image(&mut upload, n as u64, BODY)?;
        let top = upload.commit()?;
        store.set_plan(Plan::default());
        assert_eq!(
            read_all(&target.open_image(&v, &top.id)?)?,
            bytes,
            "request {n}"
        );
    }
    assert_eq!(target.backups(&v)?.first(), Some(&base));
    Ok(())
}

#[test]
fn a_failing_part_aborts_the_upload() -> TestResult {
    let v = volume("data");
    let (store, target) = target(3)?;
    store.set_plan(Plan {
        fail_part: Some((4, usize::MAX)),
        ..Plan::default()
    });
    let mut upload = target.begin_backup(&v, spec(None))?;
    let id = upload.id().clone();
    let err = write_image(&mut upload, 1, BODY)
        .err()
        .ok_or("upload survived a dead part")?;
    assert!(err.to_string().contains("part"), "{err}");
    assert_eq!(store.aborts.load(Ordering::SeqCst), 1);
    assert_eq!(store.open_uploads.load(Ordering::SeqCst), 0);
    assert!(matches!(upload.commit(), Err(Error::Upload { .. })));
    assert!(target.backups(&v)?.is_empty());
    assert!(matches!(
        target.backup(&v, &id),
        Err(Error::NotFound { .. })
    ));

    // A part that fails twice is retried into success.
    store.set_plan(Plan {
        fail_part: Some((4, 2)),
        ..Plan::default()
    });
    let mut upload = target.begin_backup(&v, spec(None))?;
    let bytes = write_image(&mut upload, 2, BODY)?;
    let m = upload.commit()?;
    assert_eq!(read_all(&target.open_image(&v, &m.id)?)?, bytes);
    assert_eq!(store.open_uploads.load(Ordering::SeqCst), 0);
    Ok(())
}

#[test]
fn short_reads_are_retried_or_reported_never_returned() -> TestResult {
    let v = volume("data");
    let (store, target) = target(4)?;
    let (b, bytes) = common::backup(&target, &v, None, 7, BODY)?;
    store.set_plan(Plan {
        short_reads: 2,
        ..Plan::default()
    });
    assert_eq!(read_all(&target.open_image(&v, &b.id)?)?, bytes);
    store.set_plan(Plan {
        short_reads: usize::MAX,
        ..Plan::default()
    });
    let image = target.open_image(&v, &b.id)?;
    let mut buf = vec![0u8; 1000];
    let err = image
        .read_exact_at(&mut buf, 5000)
        .err()
        .ok_or("short read accepted")?;
    assert!(err.to_string().contains("short read"), "{err}");
    store.set_plan(Plan::default());
    image.read_exact_at(&mut buf, 5000)?;
    assert_eq!(buf, bytes[5000..6000]);
    Ok(())
}

/// An application backup whose manifest put fails leaves only an archive, which is invisible
/// and collected by gc.
#[test]
fn a_failed_application_commit_is_invisible_and_collected() -> TestResult {
    let (store, target) = target(1)?;
    let app = strata_target::AppName::new("shop")?;
    let id = strata_target::AppBackupId::new("a1")?;
    // get (exists?), put archive, put manifest: the third request fails.
    store.fail_next(3, 4);
    let failed = target.put_app_backup(&app, &id, Vec::new(), bytes::Bytes::from_static(b"yaml"));
    store.set_plan(Plan::default());
    assert!(failed.is_err());
    assert!(target.app_backups(&app)?.is_empty());
    assert!(matches!(
        target.read_app_archive(&app, &id),
        Err(Error::NotFound { .. })
    ));
    let removed = target.gc(Duration::ZERO)?.removed;
    assert_eq!(
        removed,
        vec!["repo/applications/shop/a1.archive".to_string()]
    );
    target.put_app_backup(&app, &id, Vec::new(), bytes::Bytes::from_static(b"yaml"))?;
    assert!(target.gc(Duration::ZERO)?.removed.is_empty());
    assert_eq!(&target.read_app_archive(&app, &id)?[..], b"yaml");
    Ok(())
}

/// Readers racing over one image: a read waiting for a block that the sequential stream was
/// to bring asks for the block itself when another read moves the readers' position back and
/// starts a new stream there. It used to wait for the new stream, which never goes past its
/// read-ahead window of the new position: the read, and the restore or serve behind it, hung
/// for good (one run in about 25 of the conformance suite's concurrent readers on moto, on a
/// loaded machine). Every GET here takes 300 ms, which orders the reads.
#[test]
fn a_read_left_behind_by_a_restarted_stream_fetches_its_block() -> TestResult {
    const BLOCK: u64 = 64 << 10;
    let v = volume("data");
    let (store, target) = target(3)?;
    let (base, bytes) = common::backup(&target, &v, None, 5, 4 << 20)?;
    let image = target.open_image(&v, &base.id)?;
    store.set_plan(Plan {
        get_delay: Duration::from_millis(300),
        ..Plan::default()
    });
    let read = |image: &Arc<dyn strata_qcow2::ReadAt>, block: u64| {
        let mut buf = vec![0u8; 1000];
        image.read_exact_at(&mut buf, block * BLOCK).map(|()| buf)
    };
    let expected = |block: u64| bytes[(block * BLOCK) as usize..][..1000].to_vec();
    let in_background = |block: u64| {
        let (image, (tx, rx)) = (Arc::clone(&image), std::sync::mpsc::channel());
        std::thread::spawn(move || tx.send(read(&image, block)));
        rx
    };
    // Block 40, then block 41 right after it: the second read starts a stream there and
    // waits for it.
    assert_eq!(read(&image, 40)?, expected(40));
    let left_behind = in_background(41);
    std::thread::sleep(Duration::from_millis(100));
    // While that stream's first GET is on its way: a read far back (random access, so the
    // stream stops), then the next block (sequential: a new stream from there).
    let far_back = in_background(2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read(&image, 3)?, expected(3));
    assert_eq!(
        far_back.recv_timeout(Duration::from_secs(10))??,
        expected(2)
    );
    match left_behind.recv_timeout(Duration::from_secs(10)) {
        Ok(got) => assert_eq!(got?, expected(41)),
        Err(_) => panic!("the read of block 41 still waits for a stream that never comes"),
    }
    Ok(())
}
