//! Exponential backoff per object for failed reconciles.
//!
//! A reconcile that fails with a [`Transient`](ErrorClass::Transient) error is tried again
//! after 5 s, doubling up to 5 min; a [`Stalled`](ErrorClass::Stalled) one (a person must fix
//! RBAC, a Target, a Secret, credentials) after 30 s, doubling up to 10 min, so a broken
//! reference costs a few API calls an hour instead of one every 10 s. The count is of failures
//! in a row, whatever their class, and a successful call forgets it. The schedule has no jitter:
//! objects fail at different times, and the delays stay exact for the tests.
//!
//! The count lives in memory ([`Backoff`], in the [`Context`](crate::Context)), keyed by the
//! object's namespace, name and uid, so a recreated object starts afresh and a controller
//! restart starts every object at attempt 1. While an object waits, a reconcile of the same
//! object returns at once, without API calls, as long as the object is the version that failed
//! or the one the controller's own status write made of it: without that gate, the write that
//! records a failure would trigger the next attempt immediately. Any other change (a spec
//! edit, an annotation, another writer's status, which is also what a 409 Conflict announces)
//! ends the wait.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use kube::Resource;
use tokio::time::Instant;

use crate::error::ErrorClass;

/// Pause before the first retry of a transient error.
pub const TRANSIENT_FLOOR: Duration = Duration::from_secs(5);
/// Longest pause between retries of transient errors.
pub const TRANSIENT_CAP: Duration = Duration::from_secs(5 * 60);
/// Pause before the first retry of a stalled run.
pub const STALLED_FLOOR: Duration = Duration::from_secs(30);
/// Longest pause between retries of a stalled run.
pub const STALLED_CAP: Duration = Duration::from_secs(10 * 60);

/// Entries not refreshed for this long belong to objects that are gone; they are dropped.
const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);

/// The pause before attempt `attempt + 1` after `attempt` failures in a row (the first failure
/// is attempt 1), the last of class `class`. A permanent error is not retried by the
/// reconcilers (the run is Failed); should one reach the error policy, it waits as a stalled
/// one.
pub fn delay(class: ErrorClass, attempt: u32) -> Duration {
    let (floor, cap) = match class {
        ErrorClass::Transient => (TRANSIENT_FLOOR, TRANSIENT_CAP),
        ErrorClass::Stalled | ErrorClass::Permanent => (STALLED_FLOOR, STALLED_CAP),
    };
    let doublings = attempt.saturating_sub(1).min(16);
    floor.saturating_mul(1 << doublings).min(cap)
}

/// One failed attempt: its number (1 for the first failure in a row) and the pause before the
/// next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Failures in a row, this one included.
    pub attempt: u32,
    /// How long to wait before trying again.
    pub delay: Duration,
}

/// Which object a backoff belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    /// `metadata.namespace`.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: Option<String>,
    /// `metadata.uid`: a recreated object of the same name is another object.
    pub uid: Option<String>,
}

impl ObjectKey {
    /// The key of `object`.
    pub fn of<K: Resource>(object: &K) -> Self {
        let meta = object.meta();
        ObjectKey {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            uid: meta.uid.clone(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    attempt: u32,
    /// When the next attempt may run.
    due: Instant,
    /// The resourceVersions the failure is known under: the object as read and as the
    /// controller's condition write left it. Another version ends the wait.
    versions: Vec<String>,
}

/// Failures in a row per object, and when each may be tried again.
#[derive(Debug, Default)]
pub struct Backoff {
    entries: Mutex<HashMap<ObjectKey, Entry>>,
}

impl Backoff {
    /// Record a failure of `key`, read at resourceVersion `version`, the latest of class
    /// `class`, at `now`: the attempt number and the pause before the next.
    pub fn failed(
        &self,
        key: &ObjectKey,
        class: ErrorClass,
        version: Option<&str>,
        now: Instant,
    ) -> Retry {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|_, e| e.due + FORGET_AFTER > now);
        let attempt = entries.get(key).map_or(1, |e| e.attempt.saturating_add(1));
        let delay = delay(class, attempt);
        entries.insert(
            key.clone(),
            Entry {
                attempt,
                due: now + delay,
                versions: version.map(str::to_owned).into_iter().collect(),
            },
        );
        Retry { attempt, delay }
    }

    /// The controller wrote the failure into `key`'s status, which made it `version`: that
    /// version waits too.
    pub fn written(&self, key: &ObjectKey, version: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get_mut(key) {
            entry.versions.push(version.to_owned());
        }
    }

    /// `key` reconciled successfully (or its run is over): the next failure is attempt 1.
    pub fn succeeded(&self, key: &ObjectKey) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// How long `key`, now at resourceVersion `version`, must still wait at `now`; `None` when
    /// it may run (no failure recorded, the pause is over, or someone else changed it since).
    pub fn remaining(
        &self,
        key: &ObjectKey,
        version: Option<&str>,
        now: Instant,
    ) -> Option<Duration> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get(key)?;
        let known = version.is_none_or(|v| entry.versions.iter().any(|w| w == v));
        if !known || entry.due <= now {
            return None;
        }
        Some(entry.due - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn transient_delays_double_from_5s_to_5min() {
        let delays: Vec<u64> = (1..=9)
            .map(|a| delay(ErrorClass::Transient, a).as_secs())
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(delay(ErrorClass::Transient, u32::MAX), TRANSIENT_CAP);
    }

    #[test]
    fn stalled_delays_start_at_30s_and_stop_at_10min() {
        let delays: Vec<u64> = (1..=7)
            .map(|a| delay(ErrorClass::Stalled, a).as_secs())
            .collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 600, 600]);
    }

    fn key(uid: &str) -> ObjectKey {
        ObjectKey {
            namespace: Some("shop".into()),
            name: Some("nightly".into()),
            uid: Some(uid.into()),
        }
    }

    #[test]
    fn failures_count_per_object_and_success_resets() {
        let backoff = Backoff::default();
        let t0 = Instant::now();
        let first = backoff.failed(&key("a"), ErrorClass::Transient, Some("1"), t0);
        let second = backoff.failed(&key("a"), ErrorClass::Transient, Some("1"), t0 + secs(5));
        assert_eq!(
            (first, second),
            (
                Retry {
                    attempt: 1,
                    delay: secs(5)
                },
                Retry {
                    attempt: 2,
                    delay: secs(10)
                }
            )
        );
        // Same name, another uid: another object.
        let other = backoff.failed(&key("b"), ErrorClass::Stalled, Some("1"), t0);
        assert_eq!(other.attempt, 1);
        backoff.succeeded(&key("a"));
        let again = backoff.failed(&key("a"), ErrorClass::Transient, Some("1"), t0 + secs(20));
        assert_eq!(again.attempt, 1);
    }

    #[test]
    fn the_wait_ends_when_due_or_when_someone_else_changes_the_object() {
        let backoff = Backoff::default();
        let t0 = Instant::now();
        let a = key("a");
        assert_eq!(backoff.remaining(&a, Some("1"), t0), None);
        backoff.failed(&a, ErrorClass::Stalled, Some("1"), t0);
        backoff.written(&a, "2");
        for own in ["1", "2"] {
            assert_eq!(
                backoff.remaining(&a, Some(own), t0 + secs(10)),
                Some(secs(20))
            );
        }
        assert_eq!(backoff.remaining(&a, Some("1"), t0 + secs(30)), None);
        assert_eq!(backoff.remaining(&a, Some("3"), t0 + secs(10)), None);
    }

    #[test]
    fn entries_of_objects_long_gone_are_dropped() {
        let backoff = Backoff::default();
        let t0 = Instant::now();
        backoff.failed(&key("gone"), ErrorClass::Transient, Some("1"), t0);
        backoff.failed(
            &key("live"),
            ErrorClass::Transient,
            Some("1"),
            t0 + FORGET_AFTER * 2,
        );
        let entries = backoff.entries.lock().unwrap();
        assert!(!entries.contains_key(&key("gone")) && entries.contains_key(&key("live")));
    }
}
