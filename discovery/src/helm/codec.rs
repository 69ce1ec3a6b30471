//! Helm 3 release storage encoding, both ways.
//!
//! Helm's storage drivers (`pkg/storage/driver` in the Helm sources) keep one record per
//! revision. The release is JSON, gzip-compressed, then base64 (standard alphabet); records
//! written before compression existed hold base64 of plain JSON, told apart by the gzip magic
//! `1f 8b 08`. The Secret driver stores that text under `data.release`, which the Secret's
//! JSON base64-encodes once more; the ConfigMap driver stores the text itself.

use std::io::{Read, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

use super::Release;
use crate::{Error, Result};

/// The gzip magic and deflate method byte Helm checks for.
pub const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];
/// Largest decompressed release accepted (a release carries its chart, so it can be large,
/// but never this large; the Kubernetes object size limit is about 1.5 MiB compressed).
pub const MAX_RELEASE_BYTES: u64 = 256 << 20;

/// Encode a release the way Helm's drivers do: base64 of gzip (best compression) of JSON.
pub fn encode_release(release: &Release) -> Result<String> {
    let json = serde_json::to_vec(release)
        .map_err(|e| Error::json(format!("release {}", release.name), e))?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    let compressed = gz
        .write_all(&json)
        .and_then(|()| gz.finish())
        .map_err(|e| Error::io("compressing release", "", e))?;
    Ok(STANDARD.encode(compressed))
}

/// Decode the text Helm stores for a release (base64, then gzip when the magic says so, then
/// JSON). `record` names the storage object for error messages.
pub fn decode_release(text: &str, record: &str) -> Result<Release> {
    let corrupt = |reason: String| Error::HelmRecord {
        record: record.to_owned(),
        reason,
    };
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| corrupt(format!("release is not base64: {e}")))?;
    let json = if bytes.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        GzDecoder::new(bytes.as_slice())
            .take(MAX_RELEASE_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| corrupt(format!("gzip stream is damaged: {e}")))?;
        if out.len() as u64 > MAX_RELEASE_BYTES {
            return Err(Error::Limit {
                what: format!("decompressed Helm release {record}"),
                limit: MAX_RELEASE_BYTES,
            });
        }
        out
    } else {
        bytes
    };
    serde_json::from_slice(&json).map_err(|e| corrupt(format!("release JSON is invalid: {e}")))
}

/// Decode the value of a Secret's `data.release` as it appears in the Secret's JSON (base64
/// of the Helm text).
pub fn decode_secret_data(data: &str, record: &str) -> Result<Release> {
    let text = STANDARD
        .decode(data.trim())
        .map_err(|e| Error::HelmRecord {
            record: record.to_owned(),
            reason: format!("Secret data is not base64: {e}"),
        })?;
    let text = String::from_utf8(text).map_err(|_| Error::HelmRecord {
        record: record.to_owned(),
        reason: "Secret data is not text".to_owned(),
    })?;
    decode_release(&text, record)
}

/// Encode a release for a Secret's JSON `data.release` (base64 of the Helm text).
pub fn encode_secret_data(release: &Release) -> Result<String> {
    Ok(STANDARD.encode(encode_release(release)?))
}

/// Which Helm storage driver wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Driver {
    /// `HELM_DRIVER=secret`, the default.
    Secret,
    /// `HELM_DRIVER=configmap`.
    ConfigMap,
}
