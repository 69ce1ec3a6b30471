//! Errors a user meets first name what is wrong.

mod common;

use common::TestResult;
use strata_target::{Error, Target};

/// A missing bucket is named as such, not as a missing repository marker.
#[test]
fn a_missing_bucket_is_named() -> TestResult {
    if !common::moto::available() {
        return Ok(());
    }
    let mut options = common::small_options();
    options.store_config = common::moto::server().config();
    let bucket = format!("no-such-bucket-{:08x}", common::rand_u64() as u32);
    let err = Target::open_with(&format!("s3://{bucket}/prefix"), options)
        .err()
        .ok_or("opening a missing bucket succeeded")?;
    assert!(
        matches!(&err, Error::NotFound { what: "bucket", name } if *name == bucket),
        "{err}"
    );
    assert_eq!(err.to_string(), format!("bucket {bucket} not found"));
    Ok(())
}

fn existing_only(mut options: strata_target::TargetOptions) -> strata_target::TargetOptions {
    options.create = false;
    options
}

/// A reader's mistyped folder is named as no repository, and nothing is made there: neither
/// the folder nor, in an empty folder, a repository marker. Once a backup's open made the
/// repository, the reader's open succeeds.
#[test]
fn a_folder_without_a_repository_is_refused_to_readers_and_left_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("typo");
    let url = missing.display().to_string();
    let err = Target::open_with(&url, existing_only(common::small_options()))
        .err()
        .ok_or("opening a missing folder succeeded")?;
    assert!(
        matches!(&err, Error::NotFound { what: "repository", name } if *name == url),
        "{err}"
    );
    assert_eq!(err.to_string(), format!("repository {url} not found"));
    assert!(!missing.exists(), "the missing folder was created");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty)?;
    let url = empty.display().to_string();
    let err = Target::open_with(&url, existing_only(common::small_options()))
        .err()
        .ok_or("opening an empty folder succeeded")?;
    assert!(
        matches!(
            &err,
            Error::NotFound {
                what: "repository",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&empty)?.count(),
        0,
        "something was written"
    );

    let file = dir.path().join("file");
    std::fs::write(&file, b"x")?;
    let err = Target::open_with(
        &file.display().to_string(),
        existing_only(common::small_options()),
    )
    .err()
    .ok_or("opening a file as a folder succeeded")?;
    assert!(matches!(&err, Error::InvalidUrl { .. }), "{err}");

    Target::open_with(&url, common::small_options())?;
    let target = Target::open_with(&url, existing_only(common::small_options()))?;
    assert!(target.volumes()?.is_empty());
    Ok(())
}

/// On object storage, a prefix without a repository is refused to readers without writing
/// the marker there.
#[test]
fn a_prefix_without_a_repository_is_refused_to_readers_and_left_untouched() -> TestResult {
    if !common::moto::available() {
        return Ok(());
    }
    let server = common::moto::server();
    let mut options = existing_only(common::small_options());
    options.store_config = server.config();
    let url = format!("s3://{}/{}", server.bucket, common::unique_prefix());
    let err = Target::open_with(&url, options.clone())
        .err()
        .ok_or("opening an empty prefix succeeded")?;
    assert!(
        matches!(&err, Error::NotFound { what: "repository", name } if *name == url),
        "{err}"
    );
    // Had the first refusal written the marker, this open would succeed.
    assert!(Target::open_with(&url, options.clone()).is_err());
    let mut writer = options.clone();
    writer.create = true;
    Target::open_with(&url, writer)?;
    Target::open_with(&url, options)?;
    Ok(())
}

/// A URL with one slash, or none, after its scheme (`s3:/bucket`, `S3:bucket`, `gs:/b`) is
/// refused as a mistyped URL, not opened as a local folder named `s3:` in the working folder;
/// `./s3:/x` is such a folder on purpose.
#[test]
fn a_scheme_without_its_two_slashes_is_refused() -> TestResult {
    for url in [
        "s3:/bucket/prefix",
        "S3:bucket",
        "gs:/bucket",
        "file:/tmp/x",
    ] {
        let err = Target::open_with(url, common::small_options())
            .err()
            .ok_or_else(|| format!("{url} opened"))?;
        assert!(matches!(&err, Error::InvalidUrl { .. }), "{url}: {err}");
        assert!(err.to_string().contains("://"), "{url}: {err}");
        let folder = url.split('/').next().unwrap_or_default();
        assert!(
            !std::path::Path::new(folder).exists(),
            "{url} made {folder}"
        );
    }
    let dir = tempfile::tempdir()?;
    let odd = dir.path().join("s3:").join("x");
    Target::open_with(&odd.display().to_string(), common::small_options())?;
    assert!(odd.join(strata_target::MARKER).exists());
    Ok(())
}
