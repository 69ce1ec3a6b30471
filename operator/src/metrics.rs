//! The controller's Prometheus metrics (prometheus-client, as kube-rs's controller-rs keeps
//! them), served as `/metrics` by [`crate::endpoint`]:
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `strata_reconciles_total` | counter | `kind` (Backup, Restore), `outcome` (Success, Error) |
//! | `strata_reconcile_duration_seconds` | histogram | `kind` |
//! | `strata_backups_total` | counter | `event` (Attempted, Succeeded, Failed) |
//! | `strata_restores_total` | counter | `event` |
//! | `strata_backup_volume_bytes_total` | counter | |
//! | `strata_last_successful_backup_timestamp_seconds` | gauge | `namespace`, `application` |
//! | `strata_controller_leader` | gauge | |
//!
//! Runs are counted when their status is written: `Attempted` when a run leaves `Pending`
//! (or no phase), `Succeeded` and `Failed` when it reaches `Completed` or `Failed`. The bytes
//! are a completed Backup's `status.progress.bytesDone` (the provisioned sizes of its volumes;
//! the status does not record what the target stored). The last successful backup of an
//! application is the latest `Committed` condition among its Completed Backups, taken from
//! every Backup a reconcile sees, so it survives a controller restart.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::crd::{Backup, BackupStatus, RestoreStatus};
use crate::status::{ConditionStatus, Phase};

/// The kind a reconcile was for.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Kind {
    /// A Backup.
    Backup,
    /// A Restore.
    Restore,
}

/// How a reconcile ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// It returned an action.
    Success,
    /// It returned an error (to be retried).
    Error,
}

/// A step in a run's life.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RunEvent {
    /// The run started.
    Attempted,
    /// It completed.
    Succeeded,
    /// It failed.
    Failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    kind: Kind,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: Kind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    event: RunEvent,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApplicationLabels {
    namespace: String,
    application: String,
}

fn duration_histogram() -> Histogram {
    // 10 ms to about 3 minutes: a reconcile is a few API calls, a commit also writes the target.
    Histogram::new(exponential_buckets(0.01, 4.0, 8))
}

/// The registry and every metric in it.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    durations: Family<KindLabels, Histogram, fn() -> Histogram>,
    backups: Family<RunLabels, Counter>,
    restores: Family<RunLabels, Counter>,
    backup_bytes: Counter,
    last_success: Family<ApplicationLabels, Gauge>,
    /// Serialises the read-compare-write of `last_success`.
    last_success_update: Mutex<()>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics {
            reconciles: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            backups: Family::default(),
            restores: Family::default(),
            backup_bytes: Counter::default(),
            last_success: Family::default(),
            last_success_update: Mutex::new(()),
            leader: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "strata_reconciles",
            "Reconciles by kind and outcome",
            metrics.reconciles.clone(),
        );
        registry.register(
            "strata_reconcile_duration_seconds",
            "How long a reconcile took",
            metrics.durations.clone(),
        );
        registry.register(
            "strata_backups",
            "Backup runs attempted, succeeded and failed",
            metrics.backups.clone(),
        );
        registry.register(
            "strata_restores",
            "Restore runs attempted, succeeded and failed",
            metrics.restores.clone(),
        );
        registry.register(
            "strata_backup_volume_bytes",
            "Provisioned bytes of the volumes of completed Backups",
            metrics.backup_bytes.clone(),
        );
        registry.register(
            "strata_last_successful_backup_timestamp_seconds",
            "When the latest Completed Backup of an application committed (Unix seconds)",
            metrics.last_success.clone(),
        );
        registry.register(
            "strata_controller_leader",
            "1 while this replica holds the leader Lease (or runs without election)",
            metrics.leader.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The metrics in the OpenMetrics text format (which Prometheus reads), with their HELP
    /// and TYPE lines.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// A reconcile of `kind` ended with `outcome` after `elapsed`.
    pub fn reconciled(&self, kind: Kind, outcome: Outcome, elapsed: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels { kind, outcome })
            .inc();
        self.durations
            .get_or_create(&KindLabels { kind })
            .observe(elapsed.as_secs_f64());
    }

    /// The leader gauge, which [`crate::endpoint::Health`] sets.
    pub(crate) fn leader(&self) -> &Gauge {
        &self.leader
    }

    fn run_events(
        family: &Family<RunLabels, Counter>,
        before: Option<Phase>,
        after: Option<Phase>,
    ) {
        let started = |phase: Option<Phase>| !matches!(phase, None | Some(Phase::Pending));
        if !started(before) && started(after) {
            family
                .get_or_create(&RunLabels {
                    event: RunEvent::Attempted,
                })
                .inc();
        }
        if before != after {
            let event = match after {
                Some(Phase::Completed) => RunEvent::Succeeded,
                Some(Phase::Failed) => RunEvent::Failed,
                _ => return,
            };
            family.get_or_create(&RunLabels { event }).inc();
        }
    }

    /// A Backup's status went from `before` to `after` (and was written).
    pub fn backup_status_written(&self, before: &BackupStatus, after: &BackupStatus) {
        Self::run_events(&self.backups, before.phase, after.phase);
        if before.phase != after.phase && after.phase == Some(Phase::Completed) {
            let bytes = after.progress.as_ref().map_or(0, |p| p.bytes_done);
            self.backup_bytes.inc_by(bytes);
        }
    }

    /// A Restore's status went from `before` to `after` (and was written).
    pub fn restore_status_written(&self, before: &RestoreStatus, after: &RestoreStatus) {
        Self::run_events(&self.restores, before.phase, after.phase);
    }

    /// A reconcile saw `backup`: if it is Completed, its commit time may be its application's
    /// latest.
    pub fn backup_seen(&self, backup: &Backup) {
        let Some(status) = &backup.status else {
            return;
        };
        if status.phase != Some(Phase::Completed) {
            return;
        }
        let committed = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Committed" && c.status == ConditionStatus::True)
            .and_then(|c| c.last_transition_time.parse::<Timestamp>().ok());
        let Some(committed) = committed else {
            return;
        };
        let namespace = backup.metadata.namespace.clone().unwrap_or_default();
        let application = status
            .application_name
            .clone()
            .or_else(|| backup.spec.application_name.clone())
            .unwrap_or_else(|| namespace.clone());
        let labels = ApplicationLabels {
            namespace,
            application,
        };
        let _serialised = self
            .last_success_update
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let gauge = self.last_success.get_or_create(&labels);
        if committed.as_second() > gauge.get() {
            gauge.set(committed.as_second());
        }
    }
}
