//! Target URLs: folders, `file://`, `memory://`, `s3://`, `gs://`, `az://`.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::multipart::MultipartStore;
use object_store::path::Path;

use crate::error::{Error, Result};

pub(crate) struct Parsed {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) multipart: Option<Arc<dyn MultipartStore>>,
    pub(crate) local_root: Option<PathBuf>,
    pub(crate) prefix: Path,
}

fn invalid(url: &str, reason: impl Into<String>) -> Error {
    Error::InvalidUrl {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// The schemes [`parse`] opens.
const KNOWN_SCHEMES: [&str; 9] = [
    "file", "memory", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss",
];

/// Parses `url` into its store; a filesystem target's folder is made only when `create`.
pub(crate) fn parse(url: &str, config: &[(String, String)], create: bool) -> Result<Parsed> {
    let Some((scheme, _)) = url.split_once("://") else {
        // `s3:/bucket` or `s3:bucket` is a mistyped URL, not a folder named `s3:` (restic's
        // `s3:host/bucket` form included): a scheme this parser knows, then a colon, in the
        // first path segment. A path that means such a folder can say `./s3:...`.
        let first = url.split('/').next().unwrap_or_default();
        if let Some((scheme, _)) = first.split_once(':')
            && KNOWN_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str())
        {
            return Err(invalid(
                url,
                format!("a {scheme} URL is written {scheme}://...; for a folder, write ./{url}"),
            ));
        }
        return local(url, FsPath::new(url), create);
    };
    match scheme {
        "file" => {
            let parsed = url::Url::parse(url).map_err(|err| invalid(url, err.to_string()))?;
            let folder = parsed
                .to_file_path()
                .map_err(|()| invalid(url, "not an absolute local path"))?;
            local(url, &folder, create)
        }
        "memory" => {
            let store = crate::target::memory_store();
            Ok(Parsed {
                store: store.clone(),
                multipart: Some(store),
                local_root: None,
                prefix: Path::default(),
            })
        }
        "s3" | "s3a" => cloud::s3(url, config),
        "gs" => cloud::gcs(url, config),
        "az" | "azure" | "abfs" | "abfss" => cloud::azure(url, config),
        other => Err(invalid(url, format!("unknown scheme {other:?}"))),
    }
}

fn local(url: &str, folder: &FsPath, create: bool) -> Result<Parsed> {
    if folder.as_os_str().is_empty() {
        return Err(invalid(url, "empty path"));
    }
    if !create {
        match std::fs::metadata(folder) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(invalid(url, "not a folder")),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::no_repository(url));
            }
            Err(err) => return Err(Error::io("open", folder.display(), err)),
        }
    }
    let store = crate::target::local_store(folder)?;
    let root =
        std::fs::canonicalize(folder).map_err(|err| Error::io("resolve", folder.display(), err))?;
    Ok(Parsed {
        store,
        multipart: None,
        local_root: Some(root),
        prefix: Path::default(),
    })
}

/// The file behind object key `key` of a filesystem target rooted at `root`.
pub(crate) fn local_path(root: &FsPath, key: &Path) -> PathBuf {
    let mut path = root.to_path_buf();
    for part in key.parts() {
        path.push(part.as_ref());
    }
    path
}

/// The key prefix: the URL's path without its leading and trailing slashes.
#[cfg_attr(
    not(any(feature = "s3", feature = "gcs", feature = "azure")),
    allow(dead_code)
)]
fn prefix_of(url: &str) -> Result<Path> {
    let parsed = url::Url::parse(url).map_err(|err| invalid(url, err.to_string()))?;
    Path::parse(parsed.path().trim_matches('/')).map_err(|err| invalid(url, err.to_string()))
}

mod cloud {
    use super::*;

    #[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
    fn retry_config() -> object_store::RetryConfig {
        object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: std::time::Duration::from_secs(30),
            ..Default::default()
        }
    }

    /// `fn $name(url, config)`: a store from `$builder` (settings from the environment, then
    /// `config` keys parsed as `$key`), or an error when built without `$feature`. The three
    /// cloud builders share no trait, so one macro keeps them alike.
    macro_rules! cloud_store {
        ($name:ident, $feature:literal, $builder:ty, $key:ty) => {
            #[cfg(feature = $feature)]
            pub(super) fn $name(url: &str, config: &[(String, String)]) -> Result<Parsed> {
                let mut builder = <$builder>::from_env();
                for (key, value) in config {
                    let key: $key = key
                        .parse()
                        .map_err(|err: object_store::Error| invalid(url, err.to_string()))?;
                    builder = builder.with_config(key, value);
                }
                let store = builder
                    .with_url(url)
                    .with_retry(retry_config())
                    .build()
                    .map_err(|err| invalid(url, err.to_string()))?;
                let store = Arc::new(store);
                Ok(Parsed {
                    store: store.clone(),
                    multipart: Some(store),
                    local_root: None,
                    prefix: prefix_of(url)?,
                })
            }

            #[cfg(not(feature = $feature))]
            pub(super) fn $name(url: &str, _config: &[(String, String)]) -> Result<Parsed> {
                Err(invalid(
                    url,
                    concat!("built without the `", $feature, "` feature"),
                ))
            }
        };
    }

    cloud_store!(
        s3,
        "s3",
        object_store::aws::AmazonS3Builder,
        object_store::aws::AmazonS3ConfigKey
    );
    cloud_store!(
        gcs,
        "gcs",
        object_store::gcp::GoogleCloudStorageBuilder,
        object_store::gcp::GoogleConfigKey
    );
    cloud_store!(
        azure,
        "azure",
        object_store::azure::MicrosoftAzureBuilder,
        object_store::azure::AzureConfigKey
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_schemes_and_empty_paths_are_refused() {
        assert!(matches!(
            parse("ftp://host/x", &[], true).err(),
            Some(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            parse("", &[], true).err(),
            Some(Error::InvalidUrl { .. })
        ));
    }

    #[test]
    fn cloud_prefixes_drop_the_slashes() -> Result<()> {
        assert_eq!(prefix_of("s3://bucket/a/b/")?.as_ref(), "a/b");
        assert_eq!(prefix_of("s3://bucket")?.as_ref(), "");
        Ok(())
    }
}
