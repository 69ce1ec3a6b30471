//! Target health: the controller opens each Target as a run would, reads its repository, and
//! writes and deletes a probe, recording what it found in the Target's status (shown by
//! `kubectl get targets`). It checks when the Target changes and every
//! [`Context::target_check_interval`] after.

use std::time::Duration;

use kube::runtime::controller::Action;

use super::{error_chain, namespace_and_name, patch_status};
use crate::context::{Context, TargetAccess};
use crate::crd::{Target, TargetStatus};
use crate::error::{Error, Result};
use crate::status::now;
use strata_target::{FORMAT_NAME, FORMAT_VERSION};

/// Check Target `target` and write its status; look again after the check interval.
///
/// The status write is itself a change the controller's watch reports, so a check of this
/// generation younger than the interval is not repeated: the call only waits out the rest of
/// the interval (without that, every check would trigger the next one at once).
pub async fn reconcile_target(target: &Target, ctx: &Context) -> Result<Action> {
    let (namespace, name) = namespace_and_name(target, "Target")?;
    if let Some(wait) = until_due(target, ctx.target_check_interval) {
        return Ok(Action::requeue(wait));
    }
    let mut status = check(ctx, &namespace, &name).await;
    status.observed_generation = target.metadata.generation;
    patch_status::<Target>(
        &ctx.client,
        &namespace,
        &name,
        target.metadata.resource_version.as_deref(),
        target
            .status
            .as_ref()
            .map(|s| serde_json::json!(s))
            .as_ref(),
        &status,
    )
    .await?;
    Ok(Action::requeue(ctx.target_check_interval))
}

/// How long until the last check of `target` is `interval` old, if it checked this generation
/// and is younger than that.
fn until_due(target: &Target, interval: Duration) -> Option<Duration> {
    let status = target.status.as_ref()?;
    if status.observed_generation != target.metadata.generation {
        return None;
    }
    let checked = chrono::DateTime::parse_from_rfc3339(status.last_check.as_deref()?).ok()?;
    let age = (chrono::Utc::now() - checked.with_timezone(&chrono::Utc))
        .to_std()
        .unwrap_or_default();
    interval.checked_sub(age).filter(|wait| !wait.is_zero())
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
