//! Target health: the controller opens each Target as a run would, reads its repository, and
//! writes and deletes a probe, recording what it found in the Target's status (shown by
//! `kubectl get targets`). It checks when the Target changes and every
//! [`Context::target_check_interval`] after.

use kube::runtime::controller::Action;

use super::{error_chain, namespace_and_name, patch_status};
use crate::context::{Context, TargetAccess};
use crate::crd::{Target, TargetStatus};
use crate::error::{Error, Result};
use crate::status::now;
use strata_target::{FORMAT_NAME, FORMAT_VERSION};

/// Check Target `target` and write its status; look again after the check interval.
pub async fn reconcile_target(target: &Target, ctx: &Context) -> Result<Action> {
    let (namespace, name) = namespace_and_name(target, "Target")?;
    let mut status = check(ctx, &namespace, &name).await;
    status.observed_generation = target.metadata.generation;
    patch_status::<Target>(
        &ctx.client,
        &namespace,
        &name,
        target.metadata.resource_version.as_deref(),
        &status,
    )
    .await?;
    Ok(Action::requeue(ctx.target_check_interval))
}

/// What Target `namespace/name` is like now: reachable (it opens: the store answers, the
/// bucket exists, the repository marker is Strata's and of a version this build reads),
/// writable (a probe object is written and deleted), and how many volumes it holds.
pub async fn check(ctx: &Context, namespace: &str, name: &str) -> TargetStatus {
    let mut status = TargetStatus {
        last_check: Some(now()),
        ..TargetStatus::default()
    };
    let access = match TargetAccess::resolve(ctx, namespace, name).await {
        Ok(access) => access,
        Err(err) => {
            status.reachable = Some(false);
            status.message = Some(error_chain(&err));
            return status;
        }
    };
    let url = access.url.clone();
    let opened = access
        .with(move |t| {
            let volumes = t
                .volumes()
                .map_err(Error::target(format!("list the volumes of {url}")))?
                .len();
            let writable = t
                .check_writable()
                .map_err(Error::target(format!("write a probe to {url}")));
            Ok((volumes, writable))
        })
        .await;
    match opened {
        Ok((volumes, writable)) => {
            status.reachable = Some(true);
            status.format = Some(format!("{FORMAT_NAME}/{FORMAT_VERSION}"));
            status.volumes = Some(u32::try_from(volumes).unwrap_or(u32::MAX));
            status.writable = Some(writable.is_ok());
            status.message = writable.err().map(|err| error_chain(&err));
        }
        Err(err) => {
            status.reachable = Some(false);
            status.message = Some(error_chain(&err));
        }
    }
    status
}
