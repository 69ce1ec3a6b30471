//! Deterministic names and labels for the objects Strata creates in a cluster.
//!
//! Re-running a step after a crash must find, not duplicate, what the first run made, so every
//! name is a pure function of the backup run and the source PVC. A run that is a Kubernetes
//! object (a Backup or Restore) is known by its uid as well as its name
//! ([`VolumeKey::of_run`]): the uid goes into the hash, so a Backup deleted and made again under
//! the same name gets names of its own and never adopts what the old one left (Kubernetes API
//! conventions: names can be reused, uids cannot). Names are RFC 1123 DNS labels
//! (at most 63 lowercase alphanumerics or `-`, alphanumeric at both ends; Kubernetes API
//! conventions, "Names"), which also suits Jobs, whose name feeds the pod's `job-name` label.
//! A readable prefix is kept and a BLAKE3 hash of all inputs is appended, so two inputs that
//! truncate alike still get different names.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

/// Longest DNS label (RFC 1123 section 2.1) and label value (Kubernetes "Labels and Selectors").
pub const MAX_LABEL: usize = 63;
/// Hex digits of the hash suffix: 48 bits, collision-free in practice among one run's objects.
const HASH_HEX: usize = 12;

/// `app.kubernetes.io/managed-by` value on every object Strata creates.
pub const MANAGED_BY: &str = "strata";
/// Label: the backup or restore run an object belongs to.
pub const LABEL_RUN: &str = "strata.io/run";
/// Label: the source PVC (its name, made into a label value).
pub const LABEL_PVC: &str = "strata.io/pvc";
/// Label: what the object is for (`snapshot`, `volume`, `datamover`).
pub const LABEL_ROLE: &str = "strata.io/role";
/// Label: the uid of the run an object belongs to, when the run is a Kubernetes object.
pub const LABEL_RUN_UID: &str = "strata.io/run-uid";

/// The kind of object a name is made for; it is part of the name and of the hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// A VolumeSnapshot of a source PVC.
    Snapshot,
    /// A temporary PVC made from a snapshot for a datamover.
    Volume,
    /// A datamover Job.
    Datamover,
    /// What a run's datamovers use in a namespace not their run's own (a Secret, a
    /// ServiceAccount).
    Access,
}

impl Role {
    /// Short word used in names and the role label.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Snapshot => "snapshot",
            Role::Volume => "volume",
            Role::Datamover => "datamover",
            Role::Access => "access",
        }
    }
}

/// Identity of one volume within one backup or restore run.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeKey {
    /// The run (a Backup or Restore name or id); any string.
    pub run: String,
    /// Namespace of the source PVC.
    pub namespace: String,
    /// Name of the source PVC.
    pub pvc: String,
    /// The run's uid, when it is a Kubernetes object; part of every name and a label.
    pub run_uid: Option<String>,
    /// The owner reference the objects made for this key carry: the run's, when they are made
    /// in its namespace (owner references cannot cross namespaces).
    pub owner: Option<OwnerReference>,
}

impl VolumeKey {
    /// A key for `namespace/pvc` in `run`.
    pub fn new(
        run: impl Into<String>,
        namespace: impl Into<String>,
        pvc: impl Into<String>,
    ) -> Self {
        VolumeKey {
            run: run.into(),
            namespace: namespace.into(),
            pvc: pvc.into(),
            run_uid: None,
            owner: None,
        }
    }

    /// A key for `namespace/pvc` in the run that `owner` references (a Backup or Restore of
    /// namespace `owner_namespace`): names carry its uid, and objects made in its own namespace
    /// are owned by it (as controller, blocking its foreground deletion), so Kubernetes' garbage
    /// collector removes what the run leaves.
    pub fn of_run(
        owner: &OwnerReference,
        owner_namespace: &str,
        namespace: impl Into<String>,
        pvc: impl Into<String>,
    ) -> Self {
        let mut key = VolumeKey::new(owner.name.clone(), namespace, pvc);
        key.run_uid = Some(owner.uid.clone());
        if key.namespace == owner_namespace {
            key.owner = Some(OwnerReference {
                controller: Some(true),
                block_owner_deletion: Some(true),
                ..owner.clone()
            });
        }
        key
    }

    /// The `ownerReferences` of the objects made for this key.
    pub fn owner_references(&self) -> Option<Vec<OwnerReference>> {
        self.owner.clone().map(|owner| vec![owner])
    }

    /// The object name for `role`: `strata-<role>-<pvc prefix>-<hash>`, a DNS label.
    pub fn name(&self, role: Role) -> String {
        let hash = self.hash(role);
        let prefix = format!("strata-{}-", role.as_str());
        let room = MAX_LABEL - prefix.len() - 1 - HASH_HEX;
        let readable = trimmed(&sanitize(&self.pvc), room);
        if readable.is_empty() {
            format!("{prefix}{hash}")
        } else {
            format!("{prefix}{readable}-{hash}")
        }
    }

    /// Labels for the object made for `role`; selecting on [`LABEL_RUN`] finds a run's objects.
    pub fn labels(&self, role: Role) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "app.kubernetes.io/managed-by".to_owned(),
                MANAGED_BY.to_owned(),
            ),
            (LABEL_RUN.to_owned(), label_value(&self.run)),
            (LABEL_PVC.to_owned(), label_value(&self.pvc)),
            (LABEL_ROLE.to_owned(), role.as_str().to_owned()),
        ])
        .into_iter()
        .chain(
            self.run_uid
                .as_ref()
                .map(|uid| (LABEL_RUN_UID.to_owned(), label_value(uid))),
        )
        .collect()
    }

    fn hash(&self, role: Role) -> String {
        let mut hasher = blake3::Hasher::new();
        for part in [role.as_str(), &self.run, &self.namespace, &self.pvc] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        // Absent for runs that are not objects, whose names stay as they were.
        if let Some(uid) = &self.run_uid {
            hasher.update(&(uid.len() as u64).to_le_bytes());
            hasher.update(uid.as_bytes());
        }
        hex_prefix(hasher.finalize().as_bytes())
    }
}

/// The name of an object made once per run (not per volume): `<prefix>-<run prefix>-<hash>`,
/// the hash covering `run` and its uid `run_uid`, so a run recreated under its name gets
/// another; a DNS label.
pub fn run_object_name(prefix: &str, run: &str, run_uid: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in [prefix, run, run_uid] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let hash = hex_prefix(hasher.finalize().as_bytes());
    let room = MAX_LABEL.saturating_sub(prefix.len() + 2 + HASH_HEX);
    let readable = trimmed(&sanitize(run), room);
    if readable.is_empty() {
        format!("{prefix}-{hash}")
    } else {
        format!("{prefix}-{readable}-{hash}")
    }
}

/// `value` as a valid label value: itself when already valid, else a sanitized prefix plus a hash
/// of the original, so distinct values stay distinct.
pub fn label_value(value: &str) -> String {
    if is_label_value(value) {
        return value.to_owned();
    }
    let hash = hex_prefix(blake3::hash(value.as_bytes()).as_bytes());
    let readable = trimmed(&sanitize(value), MAX_LABEL - 1 - HASH_HEX);
    if readable.is_empty() {
        hash
    } else {
        format!("{readable}-{hash}")
    }
}

/// Whether `value` is a valid label value: empty, or at most 63 of `[A-Za-z0-9._-]` beginning and
/// ending with an alphanumeric.
pub fn is_label_value(value: &str) -> bool {
    if value.is_empty() {
        return true;
    }
    let bytes = value.as_bytes();
    value.len() <= MAX_LABEL
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(HASH_HEX / 2)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lowercase, with every character outside `[a-z0-9]` turned into `-`.
fn sanitize(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// At most `room` bytes of an ASCII string, without leading or trailing `-`.
fn trimmed(ascii: &str, room: usize) -> String {
    let cut = ascii.get(..room.min(ascii.len())).unwrap_or(ascii);
    cut.trim_matches('-').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_dns_label(name: &str) -> bool {
        let b = name.as_bytes();
        !name.is_empty()
            && name.len() <= MAX_LABEL
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
    }

    #[test]
    fn names_are_deterministic_and_readable() {
        let key = VolumeKey::new("nightly-2026-11-25", "shop", "data-postgres-0");
        let name = key.name(Role::Snapshot);
        assert_eq!(name, key.name(Role::Snapshot));
        assert!(
            name.starts_with("strata-snapshot-data-postgres-0-"),
            "{name}"
        );
        assert_eq!(
            name.len(),
            "strata-snapshot-data-postgres-0-".len() + HASH_HEX
        );
        assert!(is_dns_label(&name));
    }

    #[test]
    fn every_input_changes_the_name() {
        let key = VolumeKey::new("run", "ns", "pvc");
        let names = [
            key.name(Role::Snapshot),
            key.name(Role::Volume),
            VolumeKey::new("run2", "ns", "pvc").name(Role::Snapshot),
            VolumeKey::new("run", "ns2", "pvc").name(Role::Snapshot),
            VolumeKey::new("run", "ns", "pvc2").name(Role::Snapshot),
        ];
        for (i, a) in names.iter().enumerate() {
            for b in names.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn long_and_odd_pvc_names_fit_a_dns_label() {
        let long = "a".repeat(253);
        let dotted = "Data.Volume_.---";
        for pvc in [long.as_str(), dotted, "---", "x"] {
            for role in [Role::Snapshot, Role::Volume, Role::Datamover] {
                let name = VolumeKey::new("r", "n", pvc).name(role);
                assert!(is_dns_label(&name), "{pvc:?} -> {name:?}");
            }
        }
        // Two long names sharing their first 60 characters still differ.
        let a = VolumeKey::new("r", "n", format!("{long}-a")).name(Role::Volume);
        let b = VolumeKey::new("r", "n", format!("{long}-b")).name(Role::Volume);
        assert_eq!(a.len(), MAX_LABEL);
        assert_ne!(a, b);
        assert_eq!(
            VolumeKey::new("r", "n", "---").name(Role::Volume).len(),
            "strata-volume-".len() + HASH_HEX
        );
    }

    #[test]
    fn label_values_are_kept_when_valid_and_hashed_otherwise() {
        assert_eq!(label_value("data-postgres-0"), "data-postgres-0");
        assert_eq!(label_value("Run_1.a"), "Run_1.a");
        let long = label_value(&"b".repeat(100));
        assert_eq!(long.len(), MAX_LABEL);
        assert!(is_label_value(&long));
        assert!(is_label_value(&label_value("ünïcode/slash")));
        assert_ne!(label_value("a/b"), label_value("a:b"));
        let labels = VolumeKey::new("r 1", "n", "p").labels(Role::Datamover);
        assert_eq!(labels[LABEL_ROLE], "datamover");
        assert_eq!(labels[LABEL_PVC], "p");
        assert!(labels[LABEL_RUN].starts_with("r-1-"));
        assert!(!labels.contains_key(LABEL_RUN_UID));
    }

    fn owner(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "strata.io/v1alpha1".into(),
            kind: "Backup".into(),
            name: "nightly".into(),
            uid: uid.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_run_recreated_under_its_name_gets_other_names() {
        let old = VolumeKey::of_run(&owner("uid-1"), "shop", "shop", "data");
        let new = VolumeKey::of_run(&owner("uid-2"), "shop", "shop", "data");
        for role in [Role::Snapshot, Role::Volume, Role::Datamover] {
            assert_ne!(old.name(role), new.name(role));
            assert_ne!(
                old.name(role),
                VolumeKey::new("nightly", "shop", "data").name(role)
            );
            assert!(is_dns_label(&old.name(role)));
        }
        assert_eq!(old.labels(Role::Volume)[LABEL_RUN_UID], "uid-1");
        let owned = old.owner_references().unwrap();
        assert_eq!(owned[0].uid, "uid-1");
        assert_eq!(owned[0].controller, Some(true));
        assert_eq!(owned[0].block_owner_deletion, Some(true));
        // Owner references cannot cross namespaces.
        let elsewhere = VolumeKey::of_run(&owner("uid-1"), "shop", "shop-copy", "data");
        assert_eq!(elsewhere.owner_references(), None);
        assert_eq!(elsewhere.run_uid.as_deref(), Some("uid-1"));
        let stash = run_object_name("strata-metadata", &"n".repeat(253), "uid-1");
        assert!(is_dns_label(&stash), "{stash}");
        assert_ne!(
            stash,
            run_object_name("strata-metadata", &"n".repeat(253), "uid-2")
        );
    }
}
