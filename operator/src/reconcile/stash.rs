//! The metadata archive between discovery and commit.
//!
//! Discovery runs with the snapshots, so the archive describes the objects as they were when
//! the volumes were cut; the application backup can be committed only once the volume backup
//! ids are known, after the datamovers. In between the archive waits in a Secret (it holds the
//! application's Secrets, so a Secret is the right kind of object) named after the Backup and
//! its uid and owned by it, so deleting the Backup also removes a stash left by a failed run,
//! and a Backup made again under the same name never commits the old one's archive.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

use crate::error::{Error, Result};
use strata_csi::naming::{LABEL_RUN, LABEL_RUN_UID, MANAGED_BY, label_value, run_object_name};

/// Key of the archive in the Secret.
pub const ARCHIVE_KEY: &str = "metadata.tar.gz";
/// Largest archive a Secret holds (the API server's object limit is about 1.5 MiB; this leaves
/// room for base64 inside the request).
pub const MAX_ARCHIVE: usize = 1 << 20;

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
                "its metadata archive is {} bytes, more than the {MAX_ARCHIVE} a Secret can stage",
                archive.len()
            ),
        });
    }
    let run = owner.name.as_str();
    let name = stash_name(run, &owner.uid);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    MANAGED_BY.to_owned(),
                ),
                (LABEL_RUN.to_owned(), label_value(run)),
                (LABEL_RUN_UID.to_owned(), label_value(&owner.uid)),
            ])),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            ARCHIVE_KEY.to_owned(),
            ByteString(archive),
        )])),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let create = || async {
        api.create(&PostParams::default(), &secret)
            .await
            .map(|_| ())
    };
    let created = match create().await {
        Err(kube::Error::Api(status)) if status.code == 409 => {
            remove(client, namespace, &owner).await?;
            create().await
        }
        other => other,
    };
    created.map_err(|source| Error::Kube {
        operation: format!("create Secret {namespace}/{name}"),
        source,
    })
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

/// The archive stashed for the run `owner` references.
pub async fn load(client: &Client, namespace: &str, owner: &OwnerReference) -> Result<Vec<u8>> {
    let name = stash_name(&owner.name, &owner.uid);
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(&name)
        .await
        .map_err(Error::kube(format!("get Secret {namespace}/{name}")))?
        .ok_or_else(|| Error::NotFound {
            kind: "Secret",
            namespace: namespace.to_owned(),
            name: name.clone(),
        })?;
    secret
        .data
        .and_then(|mut d| d.remove(ARCHIVE_KEY))
        .map(|b| b.0)
        .ok_or_else(|| Error::InvalidSpec {
            what: "metadata stash",
            reason: format!("Secret {namespace}/{name} has no {ARCHIVE_KEY}"),
        })
}

/// Delete the stash of the run `owner` references; already gone is fine.
pub async fn remove(client: &Client, namespace: &str, owner: &OwnerReference) -> Result<()> {
    let name = stash_name(&owner.name, &owner.uid);
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            operation: format!("delete Secret {namespace}/{name}"),
            source,
        }),
    }
}
