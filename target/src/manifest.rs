//! The JSON documents of the layout: repository marker, backup and application manifests,
//! reservations.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::name::{AppBackupId, AppName, BackupId, FileName, VolumeName};

/// The repository marker (`strata-repository.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryMarker {
    /// Always [`crate::FORMAT_NAME`].
    pub format: String,
    /// The layout version ([`crate::FORMAT_VERSION`] for repositories this build creates).
    pub version: u32,
}

/// A CRC-32 (IEEE, as computed by `crc32fast`), printed as 8 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Crc32(#[serde(with = "hex_u32")] pub u32);

mod hex_u32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{value:08x}"))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        u32::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

/// Checksums of a stored object, computed while it streamed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksums {
    /// CRC-32 of the whole object, in file order.
    pub crc32: Crc32,
}

/// The image object of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Object name within the volume's image folder (`<id>.qcow2`), also its backing name.
    pub object: String,
    /// Size in bytes.
    pub size: u64,
    /// Length of the header area the writer handed over last.
    pub header_len: u64,
    /// Checksums of the whole object.
    pub checksums: Checksums,
}

/// A side file stored with a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideFile {
    /// Its name.
    pub name: FileName,
    /// Size in bytes.
    pub size: u64,
    /// Checksums of its bytes.
    pub checksums: Checksums,
    /// Its object's key under the backup's side-file folder (`files/<id>/`) when that is not
    /// `<name>`: a fold writes the files of the merged image as `<fold token>/<name>`, so a
    /// reader holding the manifest from before the fold keeps finding the bytes it names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

/// One committed backup of a volume (`volumes/<volume>/backups/<id>.json`).
///
/// Its existence is the commit: it is written last, create-only, after the image and every
/// side file it names are complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// The layout version that wrote it.
    pub format_version: u32,
    /// The volume.
    pub volume: VolumeName,
    /// The backup id.
    pub id: BackupId,
    /// The backup it is an overlay on (`None` for a full image, the base of a chain).
    pub parent: Option<BackupId>,
    /// When the backup was begun.
    pub created: DateTime<Utc>,
    /// Guest-visible size of the volume in bytes.
    pub virtual_size: u64,
    /// QCOW2 cluster size in bytes.
    pub cluster_size: u64,
    /// The image object.
    pub image: ImageInfo,
    /// Side files, in the order they were stored.
    pub files: Vec<SideFile>,
    /// Why this is a full image although the volume had backups (the chain reached its
    /// length limit, say); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
}

/// One application backup (`applications/<app>/<id>.json`): its metadata archive and the volume
/// backups that belong to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppManifest {
    /// The layout version that wrote it.
    pub format_version: u32,
    /// The application.
    pub app: AppName,
    /// The application backup id.
    pub id: AppBackupId,
    /// When it was committed.
    pub created: DateTime<Utc>,
    /// The volume backups taken for it.
    pub volumes: Vec<VolumeBackupRef>,
    /// Size of the metadata archive (`<id>.archive`).
    pub archive_size: u64,
    /// Checksums of the metadata archive.
    pub archive_checksums: Checksums,
}

/// A reference from an application backup to one volume backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeBackupRef {
    /// The volume.
    pub volume: VolumeName,
    /// Its backup.
    pub backup: BackupId,
}

/// A reservation (claims and child slots): who holds it, for which backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Reservation {
    /// The backup that holds it.
    pub backup: BackupId,
    /// The parent of that backup.
    pub parent: Option<BackupId>,
    /// A random token unique to the writer, so a retried create can tell its own object.
    pub writer: String,
    /// When it was made.
    pub created: DateTime<Utc>,
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail; an empty document would be refused on read.
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

pub(crate) fn from_json<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    path: &str,
    bytes: &[u8],
) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|err| Error::Corrupt {
        what,
        path: path.to_string(),
        reason: err.to_string(),
    })
}

pub(crate) fn crc32(bytes: &[u8]) -> Checksums {
    Checksums {
        crc32: Crc32(crc32fast::hash(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_prints_as_fixed_width_hex() -> Result<()> {
        let json = serde_json::to_string(&Crc32(0xab)).map_err(|e| Error::Upload {
            path: String::new(),
            reason: e.to_string(),
        })?;
        assert_eq!(json, "\"000000ab\"");
        let back: Crc32 = from_json("crc", "-", json.as_bytes())?;
        assert_eq!(back, Crc32(0xab));
        Ok(())
    }

    #[test]
    fn manifests_with_unsafe_names_are_corrupt() {
        let doc = br#"{"backup":"../../etc","parent":null,"writer":"w","created":"2026-01-01T00:00:00Z"}"#;
        let err = from_json::<Reservation>("claim", "c.json", doc).err();
        assert!(matches!(err, Some(Error::Corrupt { what: "claim", .. })));
    }
}
