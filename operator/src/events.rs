//! Events on Backups and Restores, for `kubectl describe`: a Normal one when a run starts,
//! moves to another phase or completes, a Warning one for every failure, with the same reason
//! as the condition that records it.
//!
//! They go through kube-runtime's [`Recorder`] (the events.k8s.io/v1 API), which folds repeats
//! of one reason into a series instead of a new Event each time. Publishing is best-effort: an
//! Event the API server refuses is logged and never fails the reconcile, whose status already
//! says the same thing.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// `reportingController` of the Events.
pub const CONTROLLER: &str = "strata-controller";

/// Environment variable holding the controller pod's name (the Deployment sets it from the
/// downward API), the Events' `reportingInstance`.
pub const POD_NAME_ENV: &str = "POD_NAME";

/// The API server's limit on an Event's `note`.
const NOTE_LIMIT: usize = 1024;

/// Who publishes: [`CONTROLLER`], instance the pod named by [`POD_NAME_ENV`] when set.
pub fn reporter() -> Reporter {
    Reporter {
        controller: CONTROLLER.to_owned(),
        instance: std::env::var(POD_NAME_ENV).ok(),
    }
}

/// Publish an Event of `type_` about `regarding`; a refusal is logged, not returned.
pub(crate) async fn publish(
    recorder: &Recorder,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    // The Recorder matches repeats by reference and reason; a reference carrying the
    // resourceVersion would differ at every status write and never fold into a series.
    let regarding = ObjectReference {
        resource_version: None,
        ..regarding.clone()
    };
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(truncate(note, NOTE_LIMIT).to_owned()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&event, &regarding).await {
        eprintln!(
            "Event {reason} on {} {}/{} not published: {err}",
            regarding.kind.as_deref().unwrap_or_default(),
            regarding.namespace.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default(),
        );
    }
}

/// The longest prefix of `text` of at most `limit` bytes that ends on a character boundary.
fn truncate(text: &str, limit: usize) -> &str {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("short", NOTE_LIMIT), "short");
        let long = "é".repeat(NOTE_LIMIT);
        let cut = truncate(&long, NOTE_LIMIT);
        assert_eq!(cut.len(), NOTE_LIMIT);
        assert_eq!(truncate("aé", 2), "a");
    }
}
