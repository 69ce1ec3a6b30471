//! The metadata archive between discovery and commit.
//!
//! Discovery runs with the snapshots, so the archive describes the objects as they were when
//! the volumes were cut; the application backup can be committed only once the volume backup
//! ids are known, after the datamovers. In between the archive waits in a Secret (it holds the
//! application's Secrets, so a Secret is the right kind of object) named after the Backup and
//! its uid and owned by it, so deleting the Backup also removes a stash left by a failed run,
//! and a Backup made again under the same name never commits the old one's archive.
//!
//! An archive larger than one Secret holds ([`MAX_PART`]; a Helm release with its history
//! of release Secrets, each a gzip of the chart and values, passes it easily) is cut into
//! parts, each its own Secret: the first one, named [`stash_name`], is created last and
//! says how many there are, so a store cut short leaves no stash that reads.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};

use crate::error::{Error, Result};
use strata_csi::naming::{
    LABEL_ROLE, LABEL_RUN, LABEL_RUN_UID, MANAGED_BY, label_value, run_object_name,
};

/// Key of the archive in the Secret.
pub const ARCHIVE_KEY: &str = "metadata.tar.gz";
/// Most bytes of the archive one Secret holds (the API server's request limit is about
/// 1.5 MiB; this leaves room for base64 inside the request).
pub const MAX_PART: usize = 1 << 20;
/// Largest archive the stash holds: what the target stores as one application backup's
/// archive ([`strata_target::MAX_APP_ARCHIVE`]).
pub const MAX_ARCHIVE: usize = strata_target::MAX_APP_ARCHIVE as usize;
/// Annotation of the first Secret: how many Secrets hold the archive (none: one).
const PARTS: &str = "strata.io/stash-parts";
/// The `strata.io/role` of every Secret of a stash, by which [`remove`] finds them all.
const ROLE: &str = "stash";

/// Name of part `index` of the stash of run `run` (uid `run_uid`).
fn part_name(run: &str, run_uid: &str, index: usize) -> String {
    match index {
        0 => stash_name(run, run_uid),
        _ => format!("{}-{index}", stash_name(run, run_uid)),
    }
}

/// Name of the stash Secret of run `run` (uid `run_uid`).
pub fn stash_name(run: &str, run_uid: &str) -> String {
    run_object_name("strata-metadata", run, run_uid)
}

/// Store `archive` for the run `owner` references, in `namespace`, owned by it.
///
/// A stash already there is replaced: it was stored by an earlier discovery of the same run
/// whose status write was lost (a controller restart in between), and the objects or the
/// volume selection may have changed since, so only this discovery's archive matches the
/// volumes this discovery lists. A Secret is replaced by deleting and creating it (the verbs
/// the controller already holds); a crash in between leaves no stash and a run still
/// `Pending`, which discovers again.
pub async fn store(
    client: &Client,
    namespace: &str,
    owner: OwnerReference,
    archive: Vec<u8>,
) -> Result<()> {
    if archive.len() > MAX_ARCHIVE {
        return Err(Error::InvalidSpec {
            what: "application",
            reason: format!(
                "its metadata archive is {} bytes, more than the {MAX_ARCHIVE} a backup holds",
                archive.len()
            ),
        });
    }
    let run = owner.name.as_str();
    let parts: Vec<&[u8]> = if archive.is_empty() {
        vec![&[]]
    } else {
        archive.chunks(MAX_PART).collect()
    };
    let secret = |index: usize, part: &[u8]| Secret {
        metadata: ObjectMeta {
            name: Some(part_name(run, &owner.uid, index)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    MANAGED_BY.to_owned(),
                ),
                (LABEL_RUN.to_owned(), label_value(run)),
                (LABEL_RUN_UID.to_owned(), label_value(&owner.uid)),
                (LABEL_ROLE.to_owned(), ROLE.to_owned()),
            ])),
            annotations: (index == 0)
                .then(|| BTreeMap::from([(PARTS.to_owned(), parts.len().to_string())])),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            ARCHIVE_KEY.to_owned(),
            ByteString(part.to_vec()),
        )])),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    };
    // Whatever an earlier store of this run left goes first (its parts may be more).
    remove(client, namespace, &owner).await?;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    // The first part last: it makes the stash whole.
    for (index, part) in parts
        .iter()
        .enumerate()
        .skip(1)
        .chain(parts.iter().enumerate().take(1))
    {
        let name = part_name(run, &owner.uid, index);
        api.create(&PostParams::default(), &secret(index, part))
            .await
            .map_err(|source| Error::Kube {
                operation: format!("create Secret {namespace}/{name}"),
                source,
            })?;
    }
    Ok(())
}

/// Check that the stashed `archive` describes the volumes the run backed up (`volumes`, as
/// `(namespace, pvc)` pairs): an archive naming a volume without a backup, or missing one,
/// would commit an application backup whose restore fails.
pub fn check_volumes(archive: &[u8], volumes: &[(String, String)]) -> Result<()> {
    let metadata = strata_discovery::MetadataBackup::read_archive(archive).map_err(|err| {
        Error::InvalidSpec {
            what: "metadata stash",
            reason: format!("its archive does not read: {err}"),
        }
    })?;
    let mut stashed: Vec<(String, String)> = metadata
        .volumes
        .into_iter()
        .map(|v| (v.namespace, v.pvc))
        .collect();
    let mut copied = volumes.to_vec();
    stashed.sort();
    copied.sort();
    if stashed != copied {
        let names = |list: &[(String, String)]| {
            list.iter()
                .map(|(ns, pvc)| format!("{ns}/{pvc}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(Error::InvalidSpec {
            what: "metadata stash",
            reason: format!(
                "its archive lists volumes [{}] but the run backed up [{}]",
                names(&stashed),
                names(&copied)
            ),
        });
    }
    Ok(())
}

/// The archive stashed for the run `owner` references: [`Error::NotFound`] without its first
/// part, an error naming the part when another is missing or the whole is too large.
pub async fn load(client: &Client, namespace: &str, owner: &OwnerReference) -> Result<Vec<u8>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let invalid = |reason: String| Error::InvalidSpec {
        what: "metadata stash",
        reason,
    };
    let name = stash_name(&owner.name, &owner.uid);
    let first = api
        .get_opt(&name)
        .await
        .map_err(Error::kube(format!("get Secret {namespace}/{name}")))?
        .ok_or_else(|| Error::NotFound {
            kind: "Secret",
            namespace: namespace.to_owned(),
            name: name.clone(),
        })?;
    let count = match first
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PARTS))
    {
        None => 1,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_ARCHIVE.div_ceil(MAX_PART)).contains(n))
            .ok_or_else(|| {
                invalid(format!(
                    "Secret {namespace}/{name} says it has {text:?} parts, not 1 to {}",
                    MAX_ARCHIVE.div_ceil(MAX_PART)
                ))
            })?,
    };
    let data = |secret: Secret, name: &str| {
        secret
            .data
            .and_then(|mut d| d.remove(ARCHIVE_KEY))
            .map(|b| b.0)
            .ok_or_else(|| invalid(format!("Secret {namespace}/{name} has no {ARCHIVE_KEY}")))
    };
    let mut archive = data(first, &name)?;
    for index in 1..count {
        let name = part_name(&owner.name, &owner.uid, index);
        let secret = api
            .get_opt(&name)
            .await
            .map_err(Error::kube(format!("get Secret {namespace}/{name}")))?
            .ok_or_else(|| {
                invalid(format!(
                    "Secret {namespace}/{name}, part {index} of its {count}, is missing"
                ))
            })?;
        archive.extend(data(secret, &name)?);
        if archive.len() > MAX_ARCHIVE {
            return Err(invalid(format!(
                "its parts hold more than the {MAX_ARCHIVE} bytes a backup holds"
            )));
        }
    }
    Ok(archive)
}

/// Delete the stash of the run `owner` references, every part of it; already gone is fine.
/// The first part goes first, so a removal cut short leaves no stash that reads.
pub async fn remove(client: &Client, namespace: &str, owner: &OwnerReference) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let delete = |name: String| {
        let api = api.clone();
        async move {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(source) => Err(Error::Kube {
                    operation: format!("delete Secret {namespace}/{name}"),
                    source,
                }),
            }
        }
    };
    let first = stash_name(&owner.name, &owner.uid);
    delete(first.clone()).await?;
    let selector = format!(
        "{LABEL_RUN_UID}={},{LABEL_ROLE}={ROLE}",
        label_value(&owner.uid)
    );
    let parts = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(Error::kube(format!(
            "list the stash Secrets in {namespace}"
        )))?;
    for name in parts.items.into_iter().filter_map(|s| s.metadata.name) {
        if name != first {
            delete(name).await?;
        }
    }
    Ok(())
}
