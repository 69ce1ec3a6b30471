//! What a restore datamover needs in a namespace other than the Restore's own: the target's
//! credentials and a ServiceAccount to run as, made for the run and removed when it ends.
//!
//! A Restore with a `namespaceMapping` runs its Jobs in the destination namespace, but the
//! Target and its credentials Secret live in the Restore's namespace, and `strata install`
//! gives the datamover's ServiceAccount only to the namespaces it names. A pod can use only a
//! Secret and a ServiceAccount of its own namespace (Kubernetes docs "Secrets": "a Secret can
//! only be referenced by pods in that same namespace"), so the run copies the Secret and makes
//! a ServiceAccount there. The account has no bindings and mounts no token: a restore
//! datamover does not call the API.
//!
//! Both are named with the Restore's uid as well as its name, like every object a run makes
//! ([`VolumeKey::of_run`]), and labelled with both: a Restore deleted while its copies remain
//! (the controller was down, someone removed the finalizer) and made again under its name gets
//! copies of its own, with the credentials as they are now, rather than adopting the old ones.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use strata_csi::naming::{LABEL_RUN, LABEL_RUN_UID, label_value};
use strata_csi::{Role, VolumeKey};

/// The Secret and ServiceAccount a run's datamovers in one namespace use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunAccess {
    /// Secret the datamovers take their environment from.
    pub credentials_secret: Option<String>,
    /// ServiceAccount of the datamover pods (the namespace default when `None`).
    pub service_account: Option<String>,
}

/// The key of the run that `owner` references (a Restore of namespace `home`) in `namespace`:
/// its copy of the credentials and its ServiceAccount there are named
/// `key.name(Role::Access)`, with the run's uid in the hash.
fn access_key(owner: &OwnerReference, home: &str, namespace: &str) -> VolumeKey {
    VolumeKey::of_run(owner, home, namespace, "")
}

fn labels(owner: &OwnerReference) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "strata".to_owned(),
        ),
        (LABEL_RUN.to_owned(), label_value(&owner.name)),
        (LABEL_RUN_UID.to_owned(), label_value(&owner.uid)),
    ])
}

/// Whether `object` carries the run labels of the run `owner` references, uid included.
fn is_ours<K: Resource>(object: &K, owner: &OwnerReference) -> bool {
    let ours = labels(owner);
    let theirs = object.meta().labels.as_ref();
    [LABEL_RUN, LABEL_RUN_UID]
        .iter()
        .all(|key| theirs.and_then(|l| l.get(*key)) == ours.get(*key))
}

/// Create `object`, or adopt the one of that name this run made before.
async fn create_or_adopt<K>(
    api: &Api<K>,
    object: &K,
    owner: &OwnerReference,
    what: &str,
) -> Result<()>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let existing = api
                .get(&name)
                .await
                .map_err(Error::kube(format!("get {what} {name}")))?;
            if !is_ours(&existing, owner) {
                return Err(Error::InvalidSpec {
                    what: "restore namespace",
                    reason: format!("{what} {name} exists and is not this run's"),
                });
            }
            Ok(())
        }
        Err(source) => Err(Error::Kube {
            operation: format!("create {what} {name}"),
            source,
        }),
    }
}

/// What the datamovers of the run `owner` references in `namespace` use: in `home` (the
/// Restore's namespace) the Target's own Secret `secret` and `service_account`; elsewhere a
/// copy of the Secret and a ServiceAccount made for the run.
pub async fn grant(
    client: &Client,
    owner: &OwnerReference,
    home: &str,
    namespace: &str,
    secret: Option<&str>,
    service_account: Option<&str>,
) -> Result<RunAccess> {
    if home == namespace {
        return Ok(RunAccess {
            credentials_secret: secret.map(str::to_owned),
            service_account: service_account.map(str::to_owned),
        });
    }
    let name = access_key(owner, home, namespace).name(Role::Access);
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels(owner)),
        ..Default::default()
    };
    let credentials_secret = match secret {
        Some(secret) => {
            let original = Api::<Secret>::namespaced(client.clone(), home)
                .get_opt(secret)
                .await
                .map_err(Error::kube(format!("get Secret {home}/{secret}")))?
                .ok_or_else(|| Error::NotFound {
                    kind: "Secret",
                    namespace: home.to_owned(),
                    name: secret.to_owned(),
                })?;
            let copy = Secret {
                metadata: meta.clone(),
                data: original.data,
                string_data: original.string_data,
                type_: original.type_,
                immutable: Some(true),
            };
            let api = Api::<Secret>::namespaced(client.clone(), namespace);
            create_or_adopt(&api, &copy, owner, "Secret").await?;
            Some(name.clone())
        }
        None => None,
    };
    let account = ServiceAccount {
        metadata: meta,
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    create_or_adopt(&api, &account, owner, "ServiceAccount").await?;
    Ok(RunAccess {
        credentials_secret,
        service_account: Some(name),
    })
}

async fn delete_if_ours<K>(
    api: &Api<K>,
    name: &str,
    owner: &OwnerReference,
    what: &str,
) -> Result<()>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let existing = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get {what} {name}")))?;
    if !existing.is_some_and(|o| is_ours(&o, owner)) {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            operation: format!("delete {what} {name}"),
            source,
        }),
    }
}

/// Remove what [`grant`] made for the run `owner` references in `namespace` (nothing in
/// `home`); gone is fine.
pub async fn revoke(
    client: &Client,
    owner: &OwnerReference,
    home: &str,
    namespace: &str,
) -> Result<()> {
    if home == namespace {
        return Ok(());
    }
    let name = access_key(owner, home, namespace).name(Role::Access);
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    delete_if_ours(&secrets, &name, owner, "Secret").await?;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    delete_if_ours(&accounts, &name, owner, "ServiceAccount").await
}
