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
