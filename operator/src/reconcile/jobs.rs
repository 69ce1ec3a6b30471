//! Datamover Jobs: created once under their deterministic name, then read for the outcome.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};

use crate::error::{Error, Result};
use strata_csi::naming::{LABEL_RUN, LABEL_RUN_UID};

/// Whether a create made the object or found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// This call created it.
    New,
    /// It existed (an earlier reconcile made it).
    Existing,
}

/// Create `job`, or find the Job of that name made by the same run (its `strata.io/run` and
/// `strata.io/run-uid` labels are those of `job`); a Job of that name from another run, such
/// as an earlier Backup of the same name, is a conflict.
pub async fn create_job(client: &Client, job: &Job) -> Result<Created> {
    let namespace = job.metadata.namespace.clone().unwrap_or_default();
    let name = job.metadata.name.clone().unwrap_or_default();
    let api: Api<Job> = Api::namespaced(client.clone(), &namespace);
    match api.create(&PostParams::default(), job).await {
        Ok(_) => Ok(Created::New),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let existing = api
                .get(&name)
                .await
                .map_err(Error::kube(format!("get Job {namespace}/{name}")))?;
            let found = run_of(&existing);
            if found != run_of(job) {
                return Err(Error::InvalidSpec {
                    what: "datamover Job",
                    reason: format!(
                        "{namespace}/{name} exists and belongs to run {:?} (uid {:?})",
                        found.0, found.1
                    ),
                });
            }
            Ok(Created::Existing)
        }
        Err(source) => Err(Error::Kube {
            operation: format!("create Job {namespace}/{name}"),
            source,
        }),
    }
}

/// The run a Job belongs to: its `strata.io/run` and `strata.io/run-uid` labels.
fn run_of(job: &Job) -> (Option<&String>, Option<&String>) {
    let labels = job.metadata.labels.as_ref();
    (
        labels.and_then(|l| l.get(LABEL_RUN)),
        labels.and_then(|l| l.get(LABEL_RUN_UID)),
    )
}

/// How a datamover Job ended, if it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Still running (or not started).
    Running,
    /// Its pod succeeded.
    Succeeded,
    /// The Job failed; the message of its `Failed` condition (reason and message).
    Failed(String),
    /// The Job runs but its pod cannot start, for `age` since the current attempt began
    /// (`waiting_since`).
    Stuck {
        /// What keeps it: the kubelet's waiting reason, `Unschedulable`, or the Job
        /// controller's `FailedCreate` (admission refused the pod).
        reason: String,
        /// The reason's message, naming the pod.
        message: String,
        /// Since the current attempt began waiting for its pod.
        age: Duration,
    },
}

/// Container waiting reasons (Kubernetes docs "Pod Lifecycle" / "Images") after which a pod
/// does not start without someone changing the cluster: the image cannot be pulled, or the
/// container's configuration (a Secret, a ConfigMap) is missing. `ContainerCreating` and
/// `PodInitializing` are normal progress and are not here.
const STUCK_WAITING: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Why the pod of a running Job has not started, if it is stuck rather than on its way: a
/// waiting reason of [`STUCK_WAITING`], the `Unschedulable` reason of `PodScheduled` (a
/// missing or unbound claim, no node fits), or, with no pod at all, the Job controller's
/// latest `FailedCreate` Event (ServiceAccount or Pod Security admission refused the pod)
/// unless a pod was made or ended after it: an Event from before the Job's last pod says
/// nothing about the next one, which the Job controller may just be holding back (its retry
/// backoff). `(reason, message)`.
pub fn why_not_started(pods: &[Pod], events: &[Event]) -> Option<(String, String)> {
    let mut active = pods.iter().filter(|pod| !has_ended(pod));
    let Some(pod) = active.next() else {
        let last_pod = last_attempt(pods, events);
        return events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
            .max_by_key(|e| event_time(e))
            .filter(|e| last_pod.is_none_or(|pod| event_time(e).is_some_and(|t| t >= pod)))
            .map(|e| {
                (
                    "FailedCreate".to_owned(),
                    e.message.clone().unwrap_or_default(),
                )
            });
    };
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() == Some("Running") {
        return None;
    }
    let waiting = status
        .init_container_statuses
        .iter()
        .chain(&status.container_statuses)
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref());
    for waiting in waiting {
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if STUCK_WAITING.contains(&reason) {
            let message = waiting.message.as_deref().unwrap_or_default();
            return Some((reason.to_owned(), format!("pod {name}: {message}")));
        }
    }
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
        .map(|c| {
            (
                "Unschedulable".to_owned(),
                format!("pod {name}: {}", c.message.as_deref().unwrap_or_default()),
            )
        })
}

/// Read a Job's outcome from its status: the `Complete` / `Failed` conditions the Job
/// controller sets (batch/v1 JobStatus), else `succeeded` for clusters that report only counts.
pub fn job_outcome(job: &Job) -> JobOutcome {
    let Some(status) = &job.status else {
        return JobOutcome::Running;
    };
    for condition in status.conditions.iter().flatten() {
        if condition.status != "True" {
            continue;
        }
        match condition.type_.as_str() {
            "Complete" => return JobOutcome::Succeeded,
            "Failed" => {
                let reason = condition.reason.clone().unwrap_or_default();
                let message = condition.message.clone().unwrap_or_default();
                return JobOutcome::Failed(match (reason.is_empty(), message.is_empty()) {
                    (false, false) => format!("{reason}: {message}"),
                    (true, false) => message,
                    (false, true) => reason,
                    (true, true) => "Job failed".to_owned(),
                });
            }
            _ => {}
        }
    }
    if status.succeeded.unwrap_or(0) > 0 {
        JobOutcome::Succeeded
    } else {
        JobOutcome::Running
    }
}

/// Whether `pod` has ended (phase `Succeeded` or `Failed`).
fn has_ended(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// When an Event last happened: `lastTimestamp`, else `eventTime` (events.k8s.io writers),
/// else when it was recorded.
fn event_time(event: &Event) -> Option<Timestamp> {
    event
        .last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// When a pod that ended did: the latest of its containers' `finishedAt` and its conditions'
/// `lastTransitionTime` (`Ready` turns False as it ends; an evicted pod's `DisruptionTarget`).
fn ended_at(pod: &Pod) -> Option<Timestamp> {
    let status = pod.status.as_ref()?;
    let finished = status
        .init_container_statuses
        .iter()
        .chain(&status.container_statuses)
        .flatten()
        .filter_map(|c| {
            Some(
                c.state
                    .as_ref()?
                    .terminated
                    .as_ref()?
                    .finished_at
                    .as_ref()?
                    .0,
            )
        });
    let transitions = status
        .conditions
        .iter()
        .flatten()
        .filter_map(|c| Some(c.last_transition_time.as_ref()?.0));
    finished.chain(transitions).max()
}

/// The latest sign of the Job's pods: a pod made, a pod that ended, or the Job controller's
/// `SuccessfulCreate` Event (which outlives a pod deleted by an eviction, until Events expire).
fn last_attempt(pods: &[Pod], events: &[Event]) -> Option<Timestamp> {
    let made = pods
        .iter()
        .filter_map(|pod| Some(pod.metadata.creation_timestamp.as_ref()?.0));
    let ended = pods
        .iter()
        .filter(|pod| has_ended(pod))
        .filter_map(ended_at);
    let created = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SuccessfulCreate"))
        .filter_map(event_time);
    made.chain(ended).chain(created).max()
}

/// When the Job's current attempt began waiting for a pod that runs: the latest of the Job's
/// creation and [`last_attempt`] (the current pod's creation, the end of the last pod that ran,
/// the Job controller's last pod creation). Each retry of the Job controller (a pod OOM-killed,
/// evicted by a drain) so gets its own start window, and the time a pod ran is never counted;
/// a pod that never starts is still timed from its own creation.
pub fn waiting_since(job: &Job, pods: &[Pod], events: &[Event]) -> Option<Timestamp> {
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
    created.into_iter().chain(last_attempt(pods, events)).max()
}

/// What a Job that has not ended is doing, from its pods and, with none alive, its Events:
/// [`JobOutcome::Stuck`] for as long as [`waiting_since`] when [`why_not_started`] finds a
/// reason, else [`JobOutcome::Running`].
pub fn running_outcome(job: &Job, pods: &[Pod], events: &[Event]) -> JobOutcome {
    match why_not_started(pods, events) {
        Some((reason, message)) => JobOutcome::Stuck {
            reason,
            message,
            age: waiting_since(job, pods, events)
                .map(|t| age_of(t.as_second()))
                .unwrap_or_default(),
        },
        None => JobOutcome::Running,
    }
}

/// Time since `seconds` after the epoch (zero for a time in the future: clocks differ).
pub fn age_of(seconds: i64) -> Duration {
    Duration::from_secs(u64::try_from(chrono::Utc::now().timestamp() - seconds).unwrap_or(0))
}

/// Read Job `namespace/name`'s outcome, looking at its pods while it runs
/// ([`why_not_started`]); a missing Job is an error (someone deleted it).
pub async fn read_job(client: &Client, namespace: &str, name: &str) -> Result<JobOutcome> {
    let api: Api<Job> = Api::namespaced(client.clone(), namespace);
    let Some(job) = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get Job {namespace}/{name}")))?
    else {
        return Err(Error::InvalidSpec {
            what: "datamover Job",
            reason: format!("{namespace}/{name} disappeared before it finished"),
        });
    };
    let outcome = job_outcome(&job);
    if outcome != JobOutcome::Running {
        return Ok(outcome);
    }
    // The Job controller labels its pods with the Job's name (batch/v1,
    // `batch.kubernetes.io/job-name`).
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}")))
        .await
        .map_err(Error::kube(format!("list pods of Job {namespace}/{name}")))?
        .items;
    let events = if pods.iter().all(has_ended) {
        Api::<Event>::namespaced(client.clone(), namespace)
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await
            .map_err(Error::kube(format!(
                "list Events of Job {namespace}/{name}"
            )))?
            .items
            .into_iter()
            .filter(|e| {
                e.involved_object.kind.as_deref() == Some("Job")
                    && e.involved_object.name.as_deref() == Some(name)
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(running_outcome(&job, &pods, &events))
}

/// Delete Job `namespace/name` and its pods unless it has ended; already gone is fine. For the
/// datamovers of a run that failed: one still running (or waiting for its pod) would go on
/// writing a volume no one will use and hold a datamover slot of its node until its
/// deadline, while one that ended stays, with its pod's logs, for inspection.
pub async fn stop_job(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let api: Api<Job> = Api::namespaced(client.clone(), namespace);
    let job = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get Job {namespace}/{name}")))?;
    match job {
        Some(job) if job_outcome(&job) == JobOutcome::Running => {
            delete_job(client, namespace, name).await
        }
        _ => Ok(()),
    }
}

/// Delete Job `namespace/name` and its pods; already gone is fine.
pub async fn delete_job(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let api: Api<Job> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            operation: format!("delete Job {namespace}/{name}"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(status: serde_json::Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j"}, "status": status})).unwrap()
    }

    #[test]
    fn outcome_follows_the_job_conditions() {
        assert_eq!(job_outcome(&job(json!({"active": 1}))), JobOutcome::Running);
        assert_eq!(
            job_outcome(&job(
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
            )),
            JobOutcome::Succeeded
        );
        assert_eq!(
            job_outcome(&job(json!({"failed": 4, "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"},
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"}]}))),
            JobOutcome::Failed(
                "BackoffLimitExceeded: Job has reached the specified backoff limit".into()
            )
        );
        assert_eq!(
            job_outcome(&job(
                json!({"conditions": [{"type": "Failed", "status": "False"}]})
            )),
            JobOutcome::Running
        );
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p-1"}, "status": status})).unwrap()
    }

    fn event(reason: &str, message: &str) -> Event {
        serde_json::from_value(json!({"metadata": {"name": "e"}, "involvedObject": {},
            "reason": reason, "message": message}))
        .unwrap()
    }

    #[test]
    fn a_pod_is_stuck_only_for_reasons_that_need_a_change_to_the_cluster() {
        let waiting = |reason: &str| {
            pod(
                json!({"phase": "Pending", "containerStatuses": [{"name": "datamover",
                "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                "state": {"waiting": {"reason": reason, "message": "m"}}}]}),
            )
        };
        assert_eq!(
            why_not_started(&[waiting("ImagePullBackOff")], &[]),
            Some(("ImagePullBackOff".into(), "pod p-1: m".into()))
        );
        assert_eq!(why_not_started(&[waiting("ContainerCreating")], &[]), None);
        let unschedulable = pod(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": "no node"}]}),
        );
        assert_eq!(
            why_not_started(&[unschedulable], &[]),
            Some(("Unschedulable".into(), "pod p-1: no node".into()))
        );
        assert_eq!(
            why_not_started(&[pod(json!({"phase": "Running"}))], &[]),
            None
        );
        // No live pod: admission refused it, as the Job controller's Event says.
        let refused = [
            event("FailedCreate", "forbidden"),
            event("SuccessfulCreate", "x"),
        ];
        assert_eq!(
            why_not_started(&[pod(json!({"phase": "Failed"}))], &refused),
            Some(("FailedCreate".into(), "forbidden".into()))
        );
        assert_eq!(
            why_not_started(&[], &[event("SuccessfulCreate", "x")]),
            None
        );
    }

    /// `Context::datamover_start_timeout`'s default.
    const START_TIMEOUT: Duration = Duration::from_secs(10 * 60);

    /// The time `minutes` ago, as the API server writes it.
    fn ago(minutes: i64) -> String {
        (chrono::Utc::now() - chrono::Duration::minutes(minutes))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    fn job_created(minutes_ago: i64) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j",
            "creationTimestamp": ago(minutes_ago)}, "status": {"active": 1}}))
        .unwrap()
    }

    fn unschedulable(name: &str, created_minutes_ago: i64) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": ago(created_minutes_ago)},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled",
                "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available",
                "lastTransitionTime": ago(created_minutes_ago)}]}}))
        .unwrap()
    }

    /// A pod that ran from `created` to `ended` minutes ago and was OOM-killed.
    fn oom_killed(created: i64, ended: i64) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "j-old", "creationTimestamp": ago(created)},
            "status": {"phase": "Failed",
                "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": ago(ended)}],
                "containerStatuses": [{"name": "datamover", "ready": false, "restartCount": 0,
                    "image": "i", "imageID": "", "state": {"terminated": {"exitCode": 137,
                    "reason": "OOMKilled", "startedAt": ago(created), "finishedAt": ago(ended)}}}]}}))
        .unwrap()
    }

    fn event_at(reason: &str, message: &str, minutes_ago: i64) -> Event {
        let mut event = event(reason, message);
        event.last_timestamp = serde_json::from_value(json!(ago(minutes_ago))).unwrap();
        event
    }

    fn stuck_for(outcome: JobOutcome) -> Duration {
        match outcome {
            JobOutcome::Stuck { age, .. } => age,
            other => panic!("expected Stuck, got {other:?}"),
        }
    }

    #[test]
    fn a_retried_pod_gets_its_own_start_window_not_the_jobs_age() {
        // The datamover ran for 28 minutes and was OOM-killed; the Job controller's
        // replacement has been unschedulable for a minute.
        let job = job_created(30);
        let pods = [oom_killed(30, 2), unschedulable("j-new", 1)];
        let age = stuck_for(running_outcome(&job, &pods, &[]));
        assert!(age < START_TIMEOUT, "{age:?}");
        assert!(age >= Duration::from_secs(55), "{age:?}");
        // Evicted by a drain and deleted: only the replacement is left.
        let age = stuck_for(running_outcome(&job, &pods[1..], &[]));
        assert!(age < START_TIMEOUT, "{age:?}");
    }

    #[test]
    fn a_pod_that_never_starts_times_out_from_its_creation() {
        let age = stuck_for(running_outcome(
            &job_created(11),
            &[unschedulable("j-1", 11)],
            &[],
        ));
        assert!(age >= START_TIMEOUT, "{age:?}");
        // Admission refusing every pod since the Job was made.
        let refused = [event_at("FailedCreate", "forbidden", 0)];
        let age = stuck_for(running_outcome(&job_created(11), &[], &refused));
        assert!(age >= START_TIMEOUT, "{age:?}");
    }

    #[test]
    fn a_failed_create_from_before_the_last_pod_is_not_why_the_retry_waits() {
        // Admission refused the first pod 30 minutes ago, then let one through that ran until a
        // minute ago; the Job controller holds the retry back, and no pod is alive.
        let job = job_created(30);
        let pods = [oom_killed(29, 1)];
        let events = [
            event_at("FailedCreate", "exceeded quota", 30),
            event_at("SuccessfulCreate", "Created pod: j-old", 29),
        ];
        assert_eq!(running_outcome(&job, &pods, &events), JobOutcome::Running);
        // Deleted by an eviction: the SuccessfulCreate Event still dates the last pod.
        assert_eq!(running_outcome(&job, &[], &events), JobOutcome::Running);
        // Refused again now: stuck, timed from the last pod's end.
        let events = [event_at("FailedCreate", "exceeded quota", 0)];
        let outcome = running_outcome(&job, &pods, &events);
        assert!(
            matches!(&outcome, JobOutcome::Stuck { reason, .. } if reason == "FailedCreate"),
            "{outcome:?}"
        );
        assert!(stuck_for(outcome) < Duration::from_secs(2 * 60));
    }
}
