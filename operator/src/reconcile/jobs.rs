//! Datamover Jobs: created once under their deterministic name, then read for the outcome.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
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
    /// The Job runs but its pod cannot start, for `age` since the Job was made.
    Stuck {
        /// What keeps it: the kubelet's waiting reason, `Unschedulable`, or the Job
        /// controller's `FailedCreate` (admission refused the pod).
        reason: String,
        /// The reason's message, naming the pod.
        message: String,
        /// Since the Job's creation.
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
/// latest `FailedCreate` Event (ServiceAccount or Pod Security admission refused the pod).
/// `(reason, message)`.
pub fn why_not_started(pods: &[Pod], events: &[Event]) -> Option<(String, String)> {
    let mut active = pods.iter().filter(|pod| {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        !matches!(phase, Some("Succeeded" | "Failed"))
    });
    let Some(pod) = active.next() else {
        return events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
            .max_by_key(|e| e.last_timestamp.as_ref().map(|t| t.0))
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
    let events = if pods.iter().all(|p| {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        matches!(phase, Some("Succeeded" | "Failed"))
    }) {
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
    Ok(match why_not_started(&pods, &events) {
        Some((reason, message)) => {
            let age = job
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| age_of(t.0.as_second()))
                .unwrap_or_default();
            JobOutcome::Stuck {
                reason,
                message,
                age,
            }
        }
        None => JobOutcome::Running,
    })
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
}
