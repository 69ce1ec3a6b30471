//! Status vocabulary shared by Backup and Restore: phase, conditions, progress.
//!
//! Conditions follow `metav1.Condition` (Kubernetes API conventions, "Typical status
//! properties"): a CamelCase `type`, `status` True/False/Unknown, a CamelCase `reason`, a
//! human `message` and `lastTransitionTime`, which changes only when `status` flips. The
//! resource's own type is used instead of k8s-openapi's so its schema is derived here.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a Backup or Restore run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted, nothing done yet.
    Pending,
    /// Backup: discovering the application and taking VolumeSnapshots.
    /// Restore: reading the backup and recreating PVCs.
    Preparing,
    /// Datamover Jobs are copying volume data.
    Copying,
    /// Backup: committing the application backup. Restore: applying the objects.
    Finishing,
    /// Done; nothing more happens.
    Completed,
    /// Stopped on an error named by the `Failed` condition; nothing more happens.
    Failed,
}

impl Phase {
    /// Whether the run is over (a reconcile of it does nothing).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed)
    }
}

/// Condition status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// It does not.
    False,
    /// Not known yet.
    Unknown,
}

/// One observation of the run, like `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// CamelCase type, e.g. `SnapshotsReady`, `Failed`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// CamelCase reason, e.g. `JobFailed`.
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// The resource generation this condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Volumes and bytes moved so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Volumes whose datamover finished.
    pub volumes_done: u32,
    /// Volumes in the run.
    pub volumes_total: u32,
    /// Bytes of the finished volumes (their provisioned sizes).
    pub bytes_done: u64,
    /// Bytes of all volumes of the run.
    pub bytes_total: u64,
}

/// The current time as `lastTransitionTime` wants it (RFC 3339, seconds, UTC).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The longest condition message the CRDs accept (`maxLength`, as `metav1.Condition`'s).
pub const MESSAGE_LIMIT: usize = 32768;

/// `message` cut to [`MESSAGE_LIMIT`] bytes (so characters too) on a character boundary,
/// ending with a note that it was cut: a longer one fails the whole status write (422), and
/// the run would then be retried for ever without ever showing why.
fn fit_message(message: String) -> String {
    const CUT: &str = " ... (cut: the message was longer than a condition holds)";
    if message.len() <= MESSAGE_LIMIT {
        return message;
    }
    let mut end = MESSAGE_LIMIT - CUT.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT}", &message[..end])
}

/// Set condition `type_` in `conditions`: replaced in place, its `lastTransitionTime` kept
/// unless `status` changes; a message longer than a condition holds is cut
/// ([`MESSAGE_LIMIT`]).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let message = fit_message(message.into());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = now();
            }
            existing.status = status;
            existing.reason = reason.to_owned();
            existing.message = message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            last_transition_time: now(),
            observed_generation: generation,
        }),
    }
}

/// Remove condition `type_` from `conditions`, if set.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// The condition of type `type_`, if set.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Bytes of a Kubernetes quantity of storage (`10Gi`, `500M`, `1073741824`); `None` for forms a
/// size never takes (fractions, exponents, milli).
pub fn quantity_bytes(quantity: &str) -> Option<u64> {
    let digits = quantity.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = quantity.get(digits.len()..)?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_to_what_the_crd_accepts() {
        let mut conditions = vec![];
        let long = format!("a{}", "é".repeat(MESSAGE_LIMIT));
        set_condition(
            &mut conditions,
            "Failed",
            ConditionStatus::True,
            "NotAuthorized",
            long.clone(),
            None,
        );
        let message = &conditions[0].message;
        assert!(message.len() <= MESSAGE_LIMIT, "{}", message.len());
        assert!(message.len() > MESSAGE_LIMIT - 100, "{}", message.len());
        assert!(long.starts_with(message.split(" ... (cut").next().unwrap()));
        assert!(message.ends_with("longer than a condition holds)"));
        set_condition(
            &mut conditions,
            "Failed",
            ConditionStatus::True,
            "NotAuthorized",
            "short",
            None,
        );
        assert_eq!(conditions[0].message, "short");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_seconds() {
        let t = now();
        assert_eq!(t.len(), "2026-11-25T13:31:42Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }

    #[test]
    fn transition_time_changes_only_with_status() {
        let mut conditions = vec![];
        set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::False,
            "Waiting",
            "a",
            Some(1),
        );
        conditions[0].last_transition_time = "2000-01-01T00:00:00Z".into();
        set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::False,
            "Still",
            "b",
            Some(2),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, "2000-01-01T00:00:00Z");
        assert_eq!(
            (
                conditions[0].reason.as_str(),
                conditions[0].message.as_str()
            ),
            ("Still", "b")
        );
        set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::True,
            "Done",
            "",
            Some(2),
        );
        assert_ne!(conditions[0].last_transition_time, "2000-01-01T00:00:00Z");
        assert_eq!(
            condition(&conditions, "Ready").unwrap().status,
            ConditionStatus::True
        );
    }

    #[test]
    fn storage_quantities() {
        assert_eq!(quantity_bytes("10Gi"), Some(10 << 30));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("4096"), Some(4096));
        assert_eq!(quantity_bytes("1.5Gi"), None);
        assert_eq!(quantity_bytes("1e3"), None);
        assert_eq!(quantity_bytes("99999999Pi"), None);
    }
}
