//! How a reconcile call of a Backup or Restore ends: the status write, the conditions and
//! Events that report the outcome, and the backoff of a call that failed.
//!
//! | outcome            | status                                     | Event                    |
//! |--------------------|--------------------------------------------|--------------------------|
//! | success            | the step's, `Retrying`/`Stalled` removed   | Normal on a phase change |
//! | permanent error    | phase Failed, condition `Failed`           | Warning, the reason      |
//! | transient, stalled | as read, plus `Retrying` or `Stalled` True | Warning, the reason      |
//!
//! A failed call's own progress is dropped, as before errors were reported: its steps are
//! repeated by the next call, which every step tolerates. The retry condition's message is
//! `attempt N, next in Ds: ERROR`, the Event's note `ERROR`. Every failure returns
//! [`Error::Retrying`], which the controller's error policy turns into the requeue.

use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::{error_chain, fail, patch_status};
use crate::backoff::ObjectKey;
use crate::context::Context;
use crate::crd::{BackupStatus, RestoreStatus};
use crate::error::{Error, ErrorClass, Result};
use crate::events;
use crate::status::{Condition, ConditionStatus, Phase, remove_condition, set_condition};

/// What the end of a call needs of a Backup's or Restore's status.
pub(super) trait RunStatus: Clone + PartialEq + Serialize {
    fn phase(&self) -> Option<Phase>;
    fn set_phase(&mut self, phase: Phase);
    fn conditions(&self) -> &[Condition];
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    fn set_observed_generation(&mut self, generation: Option<i64>);
}

macro_rules! run_status {
    ($status:ty) => {
        impl RunStatus for $status {
            fn phase(&self) -> Option<Phase> {
                self.phase
            }
            fn set_phase(&mut self, phase: Phase) {
                self.phase = Some(phase);
            }
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
            fn set_observed_generation(&mut self, generation: Option<i64>) {
                self.observed_generation = generation;
            }
        }
    };
}
run_status!(BackupStatus);
run_status!(RestoreStatus);

/// One reconcile call of `object`.
pub(super) struct Call<'a, K> {
    ctx: &'a Context,
    object: &'a K,
    namespace: &'a str,
    name: &'a str,
    key: ObjectKey,
}

impl<'a, K> Call<'a, K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    pub(super) fn new(ctx: &'a Context, object: &'a K, namespace: &'a str, name: &'a str) -> Self {
        Call {
            ctx,
            object,
            namespace,
            name,
            key: ObjectKey::of(object),
        }
    }

    /// How long the object must still wait after its last failure; the call does nothing then.
    pub(super) fn backing_off(&self) -> Option<Duration> {
        self.ctx
            .backoff
            .remaining(&self.key, self.version(), Instant::now())
    }

    fn version(&self) -> Option<&str> {
        self.object.meta().resource_version.as_deref()
    }

    fn generation(&self) -> Option<i64> {
        self.object.meta().generation
    }

    /// End the call whose steps turned `before` into `status` with `outcome`: write the status
    /// (on failure, `before` with the retry condition), publish the Events, keep the backoff.
    /// On return `status` is what was written.
    pub(super) async fn end<S: RunStatus>(
        &self,
        before: &S,
        status: &mut S,
        outcome: Result<Action>,
    ) -> Result<Action> {
        let generation = self.generation();
        let action = match outcome {
            Ok(action) => action,
            Err(err) if err.class() == ErrorClass::Permanent => {
                fail(status.conditions_mut(), &err, generation);
                status.set_phase(Phase::Failed);
                Action::await_change()
            }
            Err(err) => return Err(self.retry(before, status, err, Record::Retry).await),
        };
        clear_retry(status.conditions_mut());
        status.set_observed_generation(generation);
        if let Err(err) = self.write(before, status).await {
            // Nothing was written (a 409 from a stale read, most likely): no condition either,
            // as its write would be refused the same way.
            return Err(self.retry(before, status, err, Record::Nothing).await);
        }
        self.ctx.backoff.succeeded(&self.key);
        self.announce(before, status).await;
        Ok(action)
    }

    /// The call succeeded: the next failure is attempt 1.
    pub(super) fn succeeded(&self) {
        self.ctx.backoff.succeeded(&self.key);
    }

    /// Record the failure `err` of removing a deleted run's data, whose finalizer stays: the
    /// backoff, condition `Deleting` False with the cause as reason, a Warning Event; the error
    /// for the controller.
    pub(super) async fn deletion_failed<S: RunStatus>(
        &self,
        before: &S,
        status: &mut S,
        err: Error,
    ) -> Error {
        self.retry(before, status, err, Record::Deleting).await
    }

    /// Write `status` unless it is `before`; the resourceVersion written, if any.
    pub(super) async fn write<S: RunStatus>(
        &self,
        before: &S,
        status: &S,
    ) -> Result<Option<String>> {
        if status == before {
            return Ok(None);
        }
        patch_status::<K>(
            &self.ctx.client,
            self.namespace,
            self.name,
            self.version(),
            Some(&serde_json::json!(before)),
            status,
        )
        .await
    }

    /// Record the failure `err`: the backoff, the condition `record` says, the Event; the
    /// error for the controller.
    async fn retry<S: RunStatus>(
        &self,
        before: &S,
        status: &mut S,
        err: Error,
        record: Record,
    ) -> Error {
        let class = err.class();
        let retry = self
            .ctx
            .backoff
            .failed(&self.key, class, self.version(), Instant::now());
        let chain = error_chain(&err);
        let message = format!(
            "attempt {}, next in {}s: {chain}",
            retry.attempt,
            retry.delay.as_secs(),
        );
        *status = before.clone();
        if record != Record::Nothing {
            clear_retry(status.conditions_mut());
            let condition = match record {
                Record::Deleting => Some(("Deleting", ConditionStatus::False)),
                _ => class.condition_type().map(|t| (t, ConditionStatus::True)),
            };
            if let Some((type_, state)) = condition {
                set_condition(
                    status.conditions_mut(),
                    type_,
                    state,
                    err.reason(),
                    message.clone(),
                    self.generation(),
                );
            }
            match self.write(before, status).await {
                Ok(Some(version)) => self.ctx.backoff.written(&self.key, &version),
                Ok(None) => {}
                Err(write) => eprintln!(
                    "{} {}/{}: the {} condition was not written: {}",
                    K::kind(&()),
                    self.namespace,
                    self.name,
                    condition.map(|c| c.0).unwrap_or_default(),
                    error_chain(&write)
                ),
            }
        }
        let action = if record == Record::Deleting {
            "Delete"
        } else {
            "Retry"
        };
        // Without the attempt: the Recorder folds repeats into the first Event, note included.
        self.event(EventType::Warning, err.reason(), action, &chain)
            .await;
        Error::Retrying {
            retry,
            source: Box::new(err),
        }
    }

    /// The Events of a written status: a Warning for a failed run, a Normal one for another
    /// phase change.
    async fn announce<S: RunStatus>(&self, before: &S, status: &S) {
        let (from, to) = (before.phase(), status.phase());
        let Some(phase) = to.filter(|_| from != to) else {
            return;
        };
        let kind = K::kind(&());
        if phase == Phase::Failed {
            let failed = status
                .conditions()
                .iter()
                .find(|c| c.type_ == "Failed")
                .map(|c| (c.reason.clone(), c.message.clone()))
                .unwrap_or_default();
            self.event(EventType::Warning, &failed.0, "Fail", &failed.1)
                .await;
            return;
        }
        let reason = match (from, phase) {
            (_, Phase::Completed) => "Completed".to_owned(),
            (None | Some(Phase::Pending), _) => "Started".to_owned(),
            (_, phase) => format!("{phase:?}"),
        };
        let note = format!("{kind} {}/{} is {phase:?}", self.namespace, self.name);
        self.event(EventType::Normal, &reason, "Reconcile", &note)
            .await;
    }

    async fn event(&self, type_: EventType, reason: &str, action: &str, note: &str) {
        let regarding = self.object.object_ref(&());
        events::publish(&self.ctx.recorder, &regarding, type_, reason, action, note).await;
    }
}

/// Which condition a failed call records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Record {
    /// None (its write would be refused like the one that failed).
    Nothing,
    /// `Retrying` or `Stalled` as the class says.
    Retry,
    /// `Deleting` False: a deleted run's data could not be removed yet.
    Deleting,
}

/// Remove the conditions a failed call sets, once a call succeeds (or the run failed).
fn clear_retry(conditions: &mut Vec<Condition>) {
    for class in [ErrorClass::Transient, ErrorClass::Stalled] {
        if let Some(type_) = class.condition_type() {
            remove_condition(conditions, type_);
        }
    }
}
