//! From snapshot names to ranges: the whole client flow.

use std::time::Duration;

use kube::Client;

use super::channel::connect;
use super::fetch::{ChangedBlocks, FetchOptions, Query, fetch};
use super::service::{bound_content, metadata_service, snapshot_handle};
use super::token::{ServiceAccountRef, current_service_account, request_token};
use crate::error::{Error, Result};

/// What an incremental's changes are listed against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeltaBase {
    /// A VolumeSnapshot in the request's namespace; its CSI handle is read from its bound
    /// VolumeSnapshotContent, which must come from the same CSI driver.
    Snapshot(String),
    /// The base snapshot's CSI handle itself (`status.snapshotHandle` of its content), as
    /// recorded when the base was taken.
    Handle(String),
}

/// The ranges to list for one volume.
#[derive(Clone, Debug)]
pub struct ChangedBlocksRequest {
    /// Namespace of the snapshots.
    pub namespace: String,
    /// The VolumeSnapshot being backed up.
    pub snapshot: String,
    /// The snapshot of the previous backup, for an incremental; `None` lists the ranges
    /// holding data, for a full backup.
    pub base: Option<DeltaBase>,
    /// The account whose token authorizes the calls; `None` for the one the client runs as.
    pub service_account: Option<ServiceAccountRef>,
    /// Lifetime asked for the token; it must outlast the calls, retries included.
    pub token_expiry: Duration,
}

impl ChangedBlocksRequest {
    /// A request against base VolumeSnapshot `base_snapshot` (allocated ranges when `None`),
    /// with the client's own account and a one-hour token.
    pub fn new(
        namespace: impl Into<String>,
        snapshot: impl Into<String>,
        base_snapshot: Option<String>,
    ) -> Self {
        ChangedBlocksRequest {
            namespace: namespace.into(),
            snapshot: snapshot.into(),
            base: base_snapshot.map(DeltaBase::Snapshot),
            service_account: None,
            token_expiry: Duration::from_secs(3600),
        }
    }
}

/// Lists the changed (or, without a base, allocated) ranges of `request.snapshot`: finds the
/// snapshot's CSI driver through its VolumeSnapshotContent, the driver's
/// SnapshotMetadataService, the base snapshot's CSI handle (unless given), gets a token for the service's
/// audience and streams the ranges.
pub async fn changed_blocks(
    client: &Client,
    request: &ChangedBlocksRequest,
    options: &FetchOptions,
) -> Result<ChangedBlocks> {
    let namespace = &request.namespace;
    let content = bound_content(client, namespace, &request.snapshot).await?;
    let driver = &content.spec.driver;
    let query = match &request.base {
        None => Query::Allocated {
            snapshot: request.snapshot.clone(),
        },
        Some(DeltaBase::Handle(handle)) => Query::Delta {
            base_snapshot_id: handle.clone(),
            target: request.snapshot.clone(),
        },
        Some(DeltaBase::Snapshot(base)) => {
            let base_content = bound_content(client, namespace, base).await?;
            if base_content.spec.driver != *driver {
                return Err(Error::Invalid {
                    what: "base snapshot",
                    reason: format!(
                        "{namespace}/{base} was made by CSI driver {:?}, {namespace}/{} by {driver:?}",
                        base_content.spec.driver, request.snapshot
                    ),
                });
            }
            Query::Delta {
                base_snapshot_id: snapshot_handle(&base_content)?.to_owned(),
                target: request.snapshot.clone(),
            }
        }
    };
    let service = metadata_service(client, driver).await?;
    let account = match &request.service_account {
        Some(account) => account.clone(),
        None => current_service_account(client).await?,
    };
    let token = request_token(
        client,
        &account,
        &service.spec.audience,
        request.token_expiry,
    )
    .await?;
    let mut grpc = connect(&service).await?;
    fetch(&mut grpc, &token, namespace, &query, options).await
}
