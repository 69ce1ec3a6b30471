//! One Backup at a time per volume.
//!
//! Two Backups of one volume running together would each take the volume's latest backup as
//! "before" and attribute the other's backup to themselves, and one would list changed blocks
//! against a base the other is replacing. So before snapshotting, a Backup takes a lock per PVC:
//! a `coordination.k8s.io/v1` Lease named after the PVC ([`lock_name`]), created with a plain
//! create, which the API server makes atomic (409 when it exists). The Lease's `holderIdentity`
//! is the Backup's name and its owner reference the Backup, so the holder is known exactly
//! (uid included) and deleting the Backup releases its locks through garbage collection.
//!
//! A Backup finding a lock held by another one that is still in progress waits, with a
//! `VolumesLocked` condition (reason `WaitingForBackup`) naming the holder, and is requeued.
//! Locks are taken in name order and kept while waiting for the rest; since every Backup takes
//! them in the same order, two Backups cannot each hold what the other waits for. (A Backup
//! whose second discovery finds a PVC it does not hold yet releases all its locks and takes
//! them again in order, so that holds then too.) The holder releases them once its final
//! status (Completed or Failed) is written. A lock whose holder is gone, was recreated (another
//! uid) or has finished without releasing (a crash between its status write and the release)
//! is stale and taken over; no timeout is involved, so a long backup never loses its lock.
//!
//! The API server, which the controller already depends on, is the coordination point rather
//! than the target: a conditional create on the target would also exclude writers outside the
//! cluster, but needs a stale-lock timeout (a crashed holder leaves its object), and no timeout
//! suits both a minute's backup and a day's.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client};

use crate::crd::Backup;
use crate::error::{Error, Result};
use strata_csi::naming::{LABEL_PVC, MANAGED_BY, label_value};

/// Name of the Lease locking PVC `pvc` (in its namespace).
pub fn lock_name(pvc: &str) -> String {
    format!("strata-backup-{}", label_value(pvc).to_ascii_lowercase())
}

/// Outcome of [`acquire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Every lock is held by this Backup.
    All,
    /// Backup `holder` holds the lock of PVC `pvc`.
    HeldBy {
        /// The other Backup's name.
        holder: String,
        /// The contended PVC.
        pvc: String,
    },
    /// The lock of PVC `pvc` changed hands while it was being taken (a stale lock replaced by
    /// another Backup's, say); nothing is wrong, the caller tries again later.
    Contended {
        /// The contended PVC.
        pvc: String,
    },
}

/// Take the locks of `pvcs` (in `namespace`) for the Backup that `owner` references.
pub async fn acquire(
    client: &Client,
    namespace: &str,
    owner: &OwnerReference,
    pvcs: &[String],
) -> Result<Acquired> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let mut order: Vec<(String, &String)> = pvcs.iter().map(|p| (lock_name(p), p)).collect();
    order.sort();
    order.dedup();
    for (name, pvc) in order {
        // Twice at most: a stale lock is deleted and the create tried once more.
        let mut held = false;
        for _ in 0..2 {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(
                        [
                            ("app.kubernetes.io/managed-by", MANAGED_BY.to_owned()),
                            (LABEL_PVC, label_value(pvc)),
                        ]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    ),
                    owner_references: Some(vec![owner.clone()]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(owner.name.clone()),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    held = true;
                    break;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(source) => {
                    return Err(Error::Kube {
                        operation: format!("create Lease {namespace}/{name}"),
                        source,
                    });
                }
            }
            let Some(existing) = api
                .get_opt(&name)
                .await
                .map_err(Error::kube(format!("get Lease {namespace}/{name}")))?
            else {
                continue;
            };
            let holder = holder_of(&existing);
            if holder.is_some_and(|h| h.uid == owner.uid) {
                held = true;
                break;
            }
            if let Some(holder) = holder
                && in_progress(client, namespace, holder).await?
            {
                return Ok(Acquired::HeldBy {
                    holder: holder.name.clone(),
                    pvc: pvc.clone(),
                });
            }
            delete_exact(&api, namespace, &existing).await?;
        }
        if !held {
            return Ok(Acquired::Contended { pvc: pvc.clone() });
        }
    }
    Ok(Acquired::All)
}

/// Release the locks of `pvcs` that the Backup `owner` references holds; others are left.
pub async fn release(
    client: &Client,
    namespace: &str,
    owner: &OwnerReference,
    pvcs: &[String],
) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    for pvc in pvcs {
        let name = lock_name(pvc);
        let existing = api
            .get_opt(&name)
            .await
            .map_err(Error::kube(format!("get Lease {namespace}/{name}")))?;
        let ours = existing.filter(|l| holder_of(l).is_some_and(|h| h.uid == owner.uid));
        if let Some(lease) = ours {
            delete_exact(&api, namespace, &lease).await?;
        }
    }
    Ok(())
}

/// The Backup holding `lease`: its controller owner reference.
fn holder_of(lease: &Lease) -> Option<&OwnerReference> {
    lease
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Backup")
}

/// Whether `holder` still exists (same uid) and has not finished, or is deleted and waits
/// for its finalizer (which removes its data under the locks, `deletionPolicy: Delete`).
async fn in_progress(client: &Client, namespace: &str, holder: &OwnerReference) -> Result<bool> {
    let backup = Api::<Backup>::namespaced(client.clone(), namespace)
        .get_opt(&holder.name)
        .await
        .map_err(Error::kube(format!(
            "get Backup {namespace}/{}",
            holder.name
        )))?;
    Ok(backup.is_some_and(|b| {
        b.metadata.uid.as_deref() == Some(holder.uid.as_str())
            && (b.metadata.deletion_timestamp.is_some()
                || !b
                    .status
                    .and_then(|s| s.phase)
                    .is_some_and(crate::status::Phase::is_final))
    }))
}

/// Delete `lease` only if it is still that object (its uid); gone already is fine.
async fn delete_exact(api: &Api<Lease>, namespace: &str, lease: &Lease) -> Result<()> {
    let name = lease.metadata.name.clone().unwrap_or_default();
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: lease.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => Ok(()),
        Err(source) => Err(Error::Kube {
            operation: format!("delete Lease {namespace}/{name}"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_name_per_pvc_within_the_name_limits() {
        assert_eq!(
            lock_name("data-postgres-0"),
            "strata-backup-data-postgres-0"
        );
        // PVC names go up to 253 characters; Lease names too, so a long one is shortened
        // with a hash that keeps two such PVCs apart.
        let long = "x".repeat(253);
        let shorter = "x".repeat(252);
        assert!(lock_name(&long).len() <= 63 + "strata-backup-".len());
        assert!(lock_name(&long).starts_with("strata-backup-xxx"));
        assert_ne!(lock_name(&long), lock_name(&shorter));
    }
}
