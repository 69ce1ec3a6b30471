//! Invariants checked on generated input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use strata_discovery::helm::{self, Info, Release};
use strata_discovery::{MetadataBackup, Requirement, Selector};

fn key() -> impl Strategy<Value = String> {
    "([a-z0-9]([a-z0-9.-]{0,6}[a-z0-9])?/)?[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,8}[a-zA-Z0-9])?"
}

fn value() -> impl Strategy<Value = String> {
    "([a-zA-Z0-9]([a-zA-Z0-9_.-]{0,8}[a-zA-Z0-9])?)?"
}

fn requirement() -> impl Strategy<Value = Requirement> {
    prop_oneof![
        key().prop_map(Requirement::Exists),
        key().prop_map(Requirement::DoesNotExist),
        (key(), value()).prop_map(|(k, v)| Requirement::Equals(k, v)),
        (key(), value()).prop_map(|(k, v)| Requirement::NotEquals(k, v)),
        (key(), prop::collection::vec(value(), 1..4)).prop_map(|(k, v)| Requirement::In(k, v)),
        (key(), prop::collection::vec(value(), 1..4)).prop_map(|(k, v)| Requirement::NotIn(k, v)),
    ]
}

proptest! {
    #[test]
    fn selector_text_round_trips(reqs in prop::collection::vec(requirement(), 0..6)) {
        let rendered = reqs.iter().map(|r| match r {
            Requirement::Exists(k) => k.clone(),
            Requirement::DoesNotExist(k) => format!("!{k}"),
            Requirement::Equals(k, v) => format!("{k}={v}"),
            Requirement::NotEquals(k, v) => format!("{k}!={v}"),
            Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
            Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
        }).collect::<Vec<_>>().join(",");
        let parsed: Selector = rendered.parse().unwrap();
        prop_assert_eq!(parsed.requirements(), reqs.as_slice());
        prop_assert_eq!(parsed.to_string().parse::<Selector>().unwrap(), parsed);
    }

    #[test]
    fn selector_parser_never_panics(text in "\\PC{0,40}") {
        let _ = text.parse::<Selector>();
    }

    #[test]
    fn equality_selector_matches_its_own_labels(labels in prop::collection::btree_map(key(), value(), 0..5)) {
        let text = labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let selector: Selector = text.parse().unwrap();
        prop_assert!(selector.matches(&labels));
        let mut other: BTreeMap<String, String> = labels.clone();
        if let Some((k, _)) = labels.iter().next() {
            other.insert(k.clone(), "zz-different".into());
            prop_assert!(!selector.matches(&other));
        }
    }

    #[test]
    fn helm_release_encoding_round_trips(name in "[a-z][a-z0-9-]{0,20}", version in 1u32..1000, manifest in "\\PC{0,200}", status in "deployed|failed|superseded") {
        let release = Release {
            name, info: Info { status, extra: Default::default() }, chart: None, config: None,
            manifest, hooks: None, version, namespace: "ns".into(), extra: Default::default(),
        };
        prop_assert_eq!(&helm::decode_release(&helm::encode_release(&release).unwrap(), "p").unwrap(), &release);
        let secret = helm::secret_record(&release).unwrap();
        prop_assert_eq!(helm::read_record(&secret).unwrap().unwrap().release, release);
    }

    #[test]
    fn helm_decoder_never_panics(text in "[A-Za-z0-9+/=]{0,200}") {
        let _ = helm::decode_release(&text, "p");
    }

    #[test]
    fn archive_reader_never_panics_on_damaged_archives(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = small_archive().clone();
        for (index, value) in flips {
            let i = index.index(bytes.len());
            bytes[i] ^= value | 1;
        }
        let _ = MetadataBackup::read_archive(bytes.as_slice());
    }
}

fn small_archive() -> &'static Vec<u8> {
    static ARCHIVE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let backup = MetadataBackup {
            objects: vec![
                serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}),
                serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "a"}, "data": {"k": "v"}}),
            ],
            volumes: vec![],
        };
        // Damage lands in the gzip header, deflate stream or trailer; each must fail cleanly.
        backup.write_archive(Vec::new()).unwrap()
    })
}
