//! Putting it together: from an application definition to its objects and volumes.

use std::collections::{BTreeMap, BTreeSet};

use kube::api::DynamicObject;

use crate::Result;
use crate::helm::{self, HelmRelease};
use crate::inventory::Inventory;
use crate::object::{ObjectKey, ObjectRef};
use crate::operator::{self, OperatorRef};
use crate::references::dependencies;
use crate::sanitize::{Exclusion, exclusion};
use crate::selector::Selector;
use crate::volumes::{self, Volume};

/// What makes up an application: any mix of Helm releases, operator instances and label
/// selectors, in one namespace.
#[derive(Debug, Clone, Default)]
pub struct AppSpec {
    /// The application's namespace.
    pub namespace: String,
    /// Helm release names.
    pub helm_releases: Vec<String>,
    /// Custom resources managed by operators.
    pub operators: Vec<OperatorRef>,
    /// Label selectors, each matched against every namespaced object of the namespace.
    pub selectors: Vec<Selector>,
    /// Also take the operators themselves (Deployment, RBAC, CRDs, OLM objects).
    pub include_operators: bool,
}

/// The result of discovery.
#[derive(Debug, Clone, Default)]
pub struct Application {
    /// Objects to back up, unsanitized, in no particular order.
    pub objects: Vec<DynamicObject>,
    /// Objects found but left out, and why.
    pub excluded: Vec<(ObjectRef, Exclusion)>,
    /// Volumes the application uses.
    pub volumes: Vec<Volume>,
    /// The Helm releases, with all their storage records.
    pub helm_releases: Vec<HelmRelease>,
    /// Objects a Helm manifest names that do not exist.
    pub missing: Vec<ObjectRef>,
}

/// Find an application's objects and volumes in an inventory.
///
/// Starts from the Helm releases (their storage records and the objects of their live
/// revision), the operator instances and the selector matches, then,
/// until nothing new is found, what each object needs (PVCs, ConfigMaps, Secrets and
/// ServiceAccounts its pod templates name, PVCs a StatefulSet's claim templates made), adds
/// the Namespace of every namespace involved, and finally leaves out what [`exclusion`]
/// rejects.
pub fn discover(inventory: &Inventory, spec: &AppSpec) -> Result<Application> {
    let ns = spec.namespace.as_str();
    let mut app = Application::default();
    let mut seeds: Vec<ObjectKey> = Vec::new();
    for name in &spec.helm_releases {
        let release = helm::release(inventory, ns, name)?;
        seeds.extend(release.record_refs().map(ObjectRef::key));
        let resolved = helm::resolve(inventory, &release)?;
        seeds.extend(resolved.objects);
        app.missing.extend(resolved.missing);
        app.helm_releases.push(release);
    }
    for reference in &spec.operators {
        let instance = operator::resolve(inventory, ns, reference, spec.include_operators)?;
        seeds.push(instance.custom_resource);
        seeds.extend(instance.definition);
        seeds.extend(instance.owned);
        seeds.extend(instance.operator);
    }
    for selector in &spec.selectors {
        for object in inventory
            .in_namespace(ns)
            .filter(|o| selector.matches_opt(o.metadata.labels.as_ref()))
        {
            seeds.extend(ObjectRef::of(object).map(|r| r.key()));
        }
    }
    seeds.push(ObjectKey::new("", "Namespace", None, ns));

    let mut chosen: BTreeMap<ObjectKey, &DynamicObject> = BTreeMap::new();
    let mut queue = seeds;
    while let Some(key) = queue.pop() {
        if chosen.contains_key(&key) {
            continue;
        }
        let Some(object) = inventory.get(&key) else {
            continue;
        };
        chosen.insert(key, object);
        queue.extend(dependencies(inventory, object));
    }

    // Every namespace an object lives in comes along (the operator's, too).
    let namespaces: BTreeSet<String> = chosen.keys().filter_map(|k| k.namespace.clone()).collect();
    for ns in namespaces {
        let key = ObjectKey::new("", "Namespace", None, &ns);
        if let Some(object) = inventory.get(&key) {
            chosen.entry(key).or_insert(object);
        }
    }

    for (key, object) in chosen {
        match exclusion(inventory, object) {
            Some(reason) => app
                .excluded
                .extend(ObjectRef::of(object).ok().map(|r| (r, reason))),
            None => {
                if key.group.is_empty() && key.kind == "PersistentVolumeClaim" {
                    app.volumes.extend(volumes::describe(inventory, &key));
                }
                app.objects.push(object.clone());
            }
        }
    }
    Ok(app)
}
