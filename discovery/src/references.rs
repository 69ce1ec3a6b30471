//! Objects an object needs in order to run: the PVCs, ConfigMaps, Secrets and ServiceAccount
//! its pod template names, and the PVCs a StatefulSet's claim templates made.

use kube::api::DynamicObject;
use serde_json::Value;

use crate::inventory::Inventory;
use crate::object::{ObjectKey, is};

/// Most JSON nesting followed while looking for references.
const MAX_DEPTH: usize = 64;

/// The objects of the inventory that `object` refers to, in its namespace.
pub fn dependencies(inventory: &Inventory, object: &DynamicObject) -> Vec<ObjectKey> {
    let Some(ns) = object.metadata.namespace.as_deref() else {
        return Vec::new();
    };
    let mut names = Names::default();
    walk(&object.data, 0, &mut names);
    let mut keys: Vec<ObjectKey> = names
        .claims
        .iter()
        .map(|n| ObjectKey::new("", "PersistentVolumeClaim", Some(ns), n))
        .chain(
            names
                .config_maps
                .iter()
                .map(|n| ObjectKey::new("", "ConfigMap", Some(ns), n)),
        )
        .chain(
            names
                .secrets
                .iter()
                .map(|n| ObjectKey::new("", "Secret", Some(ns), n)),
        )
        .chain(
            names
                .service_accounts
                .iter()
                .map(|n| ObjectKey::new("", "ServiceAccount", Some(ns), n)),
        )
        .filter(|k| inventory.get(k).is_some())
        .collect();
    if is(object, "apps", "StatefulSet") {
        keys.extend(claims_from_templates(inventory, object));
    }
    keys.sort();
    keys.dedup();
    keys
}

/// PVCs a StatefulSet's `volumeClaimTemplates` made: `<template>-<statefulset>-<ordinal>`
/// (Kubernetes StatefulSet docs, "Stable Storage"). Every ordinal present is returned, also
/// those above the current replica count, whose data survives a scale-down.
pub fn claims_from_templates(inventory: &Inventory, statefulset: &DynamicObject) -> Vec<ObjectKey> {
    let (Some(ns), Some(sts)) = (
        statefulset.metadata.namespace.as_deref(),
        statefulset.metadata.name.as_deref(),
    ) else {
        return Vec::new();
    };
    let templates = statefulset
        .data
        .pointer("/spec/volumeClaimTemplates")
        .and_then(|t| t.as_array());
    let prefixes: Vec<String> = templates
        .into_iter()
        .flatten()
        .filter_map(|t| t.pointer("/metadata/name").and_then(|n| n.as_str()))
        .map(|t| format!("{t}-{sts}-"))
        .collect();
    inventory
        .in_namespace(ns)
        .filter(|o| is(o, "", "PersistentVolumeClaim"))
        .filter_map(|o| o.metadata.name.as_deref())
        .filter(|name| {
            prefixes.iter().any(|p| {
                name.strip_prefix(p.as_str()).is_some_and(|ordinal| {
                    !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit())
                })
            })
        })
        .map(|name| ObjectKey::new("", "PersistentVolumeClaim", Some(ns), name))
        .collect()
}

#[derive(Default)]
struct Names {
    claims: Vec<String>,
    config_maps: Vec<String>,
    secrets: Vec<String>,
    service_accounts: Vec<String>,
}

fn name_at(value: &Value, key: &str, field: &str) -> Option<String> {
    value.get(key)?.get(field)?.as_str().map(str::to_owned)
}

/// Look through any JSON for the reference shapes of the core API: volume sources, env and
/// envFrom sources, imagePullSecrets and serviceAccountName of pod specs (wherever they are
/// nested: Pods, workload templates, CronJob job templates, custom resources embedding them).
fn walk(value: &Value, depth: usize, names: &mut Names) {
    if depth > MAX_DEPTH {
        return;
    }
    match value {
        Value::Object(map) => {
            names
                .claims
                .extend(name_at(value, "persistentVolumeClaim", "claimName"));
            names
                .config_maps
                .extend(name_at(value, "configMap", "name"));
            names
                .config_maps
                .extend(name_at(value, "configMapKeyRef", "name"));
            names
                .config_maps
                .extend(name_at(value, "configMapRef", "name"));
            names.secrets.extend(name_at(value, "secret", "secretName"));
            names.secrets.extend(name_at(value, "secret", "name"));
            names.secrets.extend(name_at(value, "secretKeyRef", "name"));
            names.secrets.extend(name_at(value, "secretRef", "name"));
            if map.contains_key("containers") {
                for s in map
                    .get("imagePullSecrets")
                    .and_then(|s| s.as_array())
                    .into_iter()
                    .flatten()
                {
                    names
                        .secrets
                        .extend(s.get("name").and_then(|n| n.as_str()).map(str::to_owned));
                }
                let sa = map
                    .get("serviceAccountName")
                    .or_else(|| map.get("serviceAccount"));
                names
                    .service_accounts
                    .extend(sa.and_then(|s| s.as_str()).map(str::to_owned));
            }
            for child in map.values() {
                walk(child, depth + 1, names);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| walk(i, depth + 1, names)),
        _ => {}
    }
}
