//! Names that become object keys: volumes, backup ids, applications, side files.
//!
//! Every name is one path segment of the layout, so it is checked before use: 1 to 128 bytes of
//! ASCII letters, digits, `.`, `_` and `-`, not starting with `.` (no `..`, no hidden staging
//! names) and not ending in the reserved suffixes of the layout.

use std::fmt;

use crate::error::{Error, Result};

const MAX_LEN: usize = 128;

fn check(kind: &'static str, name: &str) -> Result<()> {
    let fail = |reason| {
        Err(Error::InvalidName {
            kind,
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_LEN {
        return fail("must be 1 to 128 bytes long");
    }
    if name.starts_with('.') {
        return fail("must not start with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return fail("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    if name.ends_with(".json") || name.ends_with(".partial") || name.ends_with(".qcow2") {
        return fail("must not end in .json, .qcow2 or .partial (reserved by the layout)");
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Checks `name` against the naming rules.
            pub fn new(name: impl Into<String>) -> Result<Self> {
                let name = name.into();
                check($kind, &name)?;
                Ok(Self(name))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = Error;
            fn try_from(name: String) -> Result<Self> {
                Self::new(name)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = Error;
            fn try_from(name: &str) -> Result<Self> {
                Self::new(name)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = Error;
            fn from_str(name: &str) -> Result<Self> {
                Self::new(name)
            }
        }
    };
}

name_type!(
    /// The name of a volume (one chain folder per volume).
    VolumeName,
    "volume"
);
name_type!(
    /// The id of one backup of a volume, unique within the volume.
    BackupId,
    "backup id"
);
name_type!(
    /// The name of an application whose backups group volume backups and a metadata archive.
    AppName,
    "application"
);
name_type!(
    /// The id of one application backup.
    AppBackupId,
    "application backup id"
);
name_type!(
    /// The name of a side file stored with a backup (a digest manifest, say).
    FileName,
    "side file"
);

impl BackupId {
    /// A fresh id that sorts by creation time: `YYYYmmddTHHMMSSZ-` and 8 random hex digits.
    pub fn generate() -> Self {
        Self(generated_id())
    }
}

impl AppBackupId {
    /// A fresh id that sorts by creation time, like [`BackupId::generate`].
    pub fn generate() -> Self {
        Self(generated_id())
    }
}

fn generated_id() -> String {
    let now = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    format!("{now}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_escape_or_collide_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "x.json",
            "x.qcow2",
            "x.partial",
            "é",
        ] {
            let err = VolumeName::new(bad).err();
            assert!(
                matches!(err, Some(Error::InvalidName { kind: "volume", .. })),
                "{bad:?} accepted"
            );
        }
        assert!(VolumeName::new("x".repeat(129)).is_err());
        assert_eq!(
            VolumeName::new("pvc-data_1.v2").map(String::from).ok(),
            Some("pvc-data_1.v2".into())
        );
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = BackupId::generate();
        let b = BackupId::generate();
        assert_ne!(a, b);
        assert!(BackupId::new(a.as_str()).is_ok());
        assert_eq!(a.as_str().len(), "20261125T133406Z-0123abcd".len());
    }

    #[test]
    fn names_deserialize_through_the_checks() {
        let err = serde_json::from_str::<BackupId>("\"../x\"").err();
        assert!(err.is_some());
        let ok: BackupId = serde_json::from_str("\"b1\"").unwrap_or_else(|_| BackupId("x".into()));
        assert_eq!(ok.as_str(), "b1");
    }
}
