//! Resolving backing-file and external-data-file names (qcow2.rst, "Header": `backing_file_offset`;
//! "Header extensions": backing format and external data file name).
//!
//! A name stored in an image is relative to the folder of the image that stores it. Images read
//! back from shared storage are untrusted, so by default a name may neither be absolute nor climb
//! out of the top image's folder: a hostile image must not make the reader open `/etc/shadow` or a
//! neighbour's volume.

use crate::error::{Error, Result};

/// How backing-file and external-data-file names found inside an image may be followed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Only relative names that stay inside the folder of the top image (the default).
    #[default]
    Confined,
    /// Any name, absolute or climbing out of the top image's folder (trusted local use).
    Permissive,
}

/// The folder part of a `/`-separated name ("" for a bare file name).
pub fn parent(name: &str) -> &str {
    match name.rfind('/') {
        Some(0) => "/",
        Some(i) => &name[..i],
        None => "",
    }
}

/// Resolves `name`, stored in the image called `image`, into a name for [`Storage`](crate::Storage).
///
/// `top_dir` is the folder of the top image of the chain; under [`BackingPolicy::Confined`] the
/// result must lie inside it.
pub fn resolve(
    policy: BackingPolicy,
    top_dir: &str,
    image: &str,
    role: &'static str,
    name: &str,
) -> Result<String> {
    let refuse = |reason| Error::PathRefused {
        image: image.to_owned(),
        role,
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(refuse("the name is empty"));
    }
    if name.contains('\0') {
        return Err(refuse("the name contains a NUL byte"));
    }
    if name.starts_with("json:") || name.contains("://") {
        return Err(refuse("protocol and json: names are not followed"));
    }
    if name.starts_with('/') {
        return match policy {
            BackingPolicy::Permissive => Ok(normalize(name)),
            BackingPolicy::Confined => Err(refuse("absolute paths are refused by the policy")),
        };
    }
    let joined = match parent(image) {
        "" => name.to_owned(),
        "/" => format!("/{name}"),
        dir => format!("{dir}/{name}"),
    };
    let resolved = normalize(&joined);
    if policy == BackingPolicy::Confined && !inside(top_dir, &resolved) {
        return Err(refuse("the path climbs out of the top image's folder"));
    }
    Ok(resolved)
}

/// Removes `.` and empty components and folds `dir/..`; leading `..` stay.
pub fn normalize(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if absolute => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    let body = parts.join("/");
    if absolute { format!("/{body}") } else { body }
}

/// Whether the normalized `path` lies inside the folder `dir`.
fn inside(dir: &str, path: &str) -> bool {
    let dir = normalize(dir);
    if dir.is_empty() {
        return !path.starts_with('/') && path.split('/').next() != Some("..");
    }
    if dir == "/" {
        return path.starts_with('/');
    }
    path.strip_prefix(&dir)
        .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confined(top: &str, image: &str, name: &str) -> Result<String> {
        resolve(
            BackingPolicy::Confined,
            parent(top),
            image,
            "backing file",
            name,
        )
    }

    #[test]
    fn relative_names_resolve_against_the_naming_image() {
        assert_eq!(
            confined("d/top.qcow2", "d/top.qcow2", "base.qcow2").ok(),
            Some("d/base.qcow2".into())
        );
        assert_eq!(
            confined("d/top.qcow2", "d/sub/mid.qcow2", "../base.qcow2").ok(),
            Some("d/base.qcow2".into())
        );
        assert_eq!(
            confined("top.qcow2", "top.qcow2", "./a/b.raw").ok(),
            Some("a/b.raw".into())
        );
        assert_eq!(
            confined("/x/y/top.qcow2", "/x/y/top.qcow2", "sub/base").ok(),
            Some("/x/y/sub/base".into())
        );
    }

    #[test]
    fn escaping_and_absolute_names_are_refused_by_default() {
        for (top, name) in [
            ("d/top.qcow2", "../base.qcow2"),
            ("top.qcow2", "../base.qcow2"),
            ("d/top.qcow2", "/etc/passwd"),
            ("/x/top.qcow2", "sub/../../y"),
            ("d/top.qcow2", "nbd://host/export"),
        ] {
            assert!(
                matches!(confined(top, top, name), Err(Error::PathRefused { .. })),
                "{top} -> {name}"
            );
        }
        assert_eq!(
            resolve(
                BackingPolicy::Permissive,
                "d",
                "d/top",
                "backing file",
                "../b"
            )
            .ok(),
            Some("b".into())
        );
        assert_eq!(
            resolve(
                BackingPolicy::Permissive,
                "d",
                "d/top",
                "backing file",
                "/abs/b"
            )
            .ok(),
            Some("/abs/b".into())
        );
    }
}
