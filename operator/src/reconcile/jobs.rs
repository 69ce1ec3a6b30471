//! Datamover Jobs: created once under their deterministic name, then read for the outcome.

use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

use crate::error::{Error, Result};
use strata_csi::naming::{LABEL_RUN, label_value};

/// Whether a create made the object or found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// This call created it.
    New,
    /// It existed (an earlier reconcile made it).
    Existing,
}

/// Create `job`, or find the Job of that name made by the same run (its `strata.io/run`
/// label); a Job of that name from another run is a conflict.
pub async fn create_job(client: &Client, job: &Job, run: &str) -> Result<Created> {
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
            let owner = existing
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_RUN));
            if owner != Some(&label_value(run)) {
                return Err(Error::InvalidSpec {
                    what: "datamover Job",
                    reason: format!("{namespace}/{name} exists and belongs to run {owner:?}"),
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

/// How a datamover Job ended, if it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Still running (or not started).
    Running,
    /// Its pod succeeded.
    Succeeded,
    /// The Job failed; the message of its `Failed` condition (reason and message).
    Failed(String),
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

/// Read Job `namespace/name`'s outcome; a missing Job is an error (someone deleted it).
pub async fn read_job(client: &Client, namespace: &str, name: &str) -> Result<JobOutcome> {
    let api: Api<Job> = Api::namespaced(client.clone(), namespace);
    match api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get Job {namespace}/{name}")))?
    {
        Some(job) => Ok(job_outcome(&job)),
        None => Err(Error::InvalidSpec {
            what: "datamover Job",
            reason: format!("{namespace}/{name} disappeared before it finished"),
        }),
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
}
