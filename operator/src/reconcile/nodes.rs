//! Datamover slots per node: at most `Context::max_datamovers_per_node` datamover pods of this
//! controller run on one node at once, whichever runs they belong to. Each copies a whole volume
//! through the node's network and its block device attachments, so a node hosting many at once
//! is slowed for its own workloads, and may hit its CSI driver's attach limit.
//!
//! Before a Backup or a Restore creates a datamover Job, [`NodeSlots::read`] counts the live datamover pods
//! (label `strata.io/role=datamover`) on each node by `spec.nodeName`; the new Job's pod template
//! then excludes the full nodes with a required node affinity `kubernetes.io/hostname NotIn
//! [...]` ([`exclude`]). Topology spread constraints cannot say this: `maxSkew` bounds the
//! difference between nodes, not how many pods one node runs, so with every node at the bound a
//! spread still places the next pod. A Job whose pod is not yet on a node (just created, or its
//! pod unscheduled) counts against every node it may still land on, so the bound holds whatever
//! node the scheduler picks; the price is that new Jobs wait while earlier ones are unplaced and
//! the bound is reached on paper. When every node is full the volume waits
//! ([`SLOT_CONDITION`]), and the run loop wakes the run when any datamover Job changes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
};
use kube::api::ListParams;
use kube::{Api, Client};

use super::jobs::{JobOutcome, job_outcome};
use crate::error::{Error, Result};
use crate::status::{Condition, ConditionStatus, condition, set_condition};
use strata_csi::Role;
use strata_csi::naming::{LABEL_ROLE, MANAGED_BY};

/// The condition of a Backup whose next datamovers wait for a node with a free slot.
pub const SLOT_CONDITION: &str = "DatamoverSlots";

/// The well-known node label the affinity names (it is the node's name unless the kubelet was
/// told otherwise).
const HOSTNAME: &str = "kubernetes.io/hostname";

/// The datamovers on each node, and those not yet on one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSlots {
    /// At most this many datamovers a node.
    limit: usize,
    /// Hostnames of the nodes a datamover may run on (Ready, not cordoned, no NoSchedule or
    /// NoExecute taint).
    nodes: BTreeSet<String>,
    /// Live datamover pods by their node's hostname.
    placed: BTreeMap<String, usize>,
    /// Unfinished datamover Jobs without a pod on a node: the hostnames each excludes.
    unplaced: Vec<BTreeSet<String>>,
}

fn is_live(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed"))
}

fn datamovers() -> ListParams {
    ListParams::default().labels(&format!(
        "app.kubernetes.io/managed-by={MANAGED_BY},{LABEL_ROLE}={}",
        Role::Datamover.as_str()
    ))
}

impl NodeSlots {
    /// Count the datamovers of the whole cluster against `limit` a node.
    pub async fn read(client: &Client, limit: usize) -> Result<Self> {
        if limit == 0 {
            return Ok(NodeSlots::default());
        }
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(Error::kube("list Nodes"))?
            .items;
        let pods = Api::<Pod>::all(client.clone())
            .list(&datamovers())
            .await
            .map_err(Error::kube("list datamover pods"))?
            .items;
        let jobs = Api::<Job>::all(client.clone())
            .list(&datamovers())
            .await
            .map_err(Error::kube("list datamover Jobs"))?
            .items;
        Ok(Self::count(limit, &nodes, &pods, &jobs))
    }

    /// [`NodeSlots::read`] from the objects read.
    pub fn count(limit: usize, nodes: &[Node], pods: &[Pod], jobs: &[Job]) -> Self {
        let hostname = |node: &Node| {
            node.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(HOSTNAME))
                .or(node.metadata.name.as_ref())
                .cloned()
                .unwrap_or_default()
        };
        let hostnames: BTreeMap<&str, String> = nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, hostname(n))))
            .collect();
        let mut slots = NodeSlots {
            limit,
            nodes: nodes
                .iter()
                .filter(|n| may_run_datamovers(n))
                .map(hostname)
                .collect(),
            ..Default::default()
        };
        // (namespace, Job name) of the Jobs whose pod is on a node.
        let mut on_a_node = BTreeSet::new();
        for pod in pods.iter().filter(|p| is_live(p)) {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
                continue;
            };
            let host = hostnames
                .get(node)
                .cloned()
                .unwrap_or_else(|| node.to_owned());
            *slots.placed.entry(host).or_default() += 1;
            let job = pod
                .metadata
                .labels
                .as_ref()
                // `job-name` alone before Kubernetes 1.27.
                .and_then(|l| {
                    l.get("batch.kubernetes.io/job-name")
                        .or_else(|| l.get("job-name"))
                });
            on_a_node.insert((pod.metadata.namespace.clone(), job.cloned()));
        }
        for job in jobs {
            let key = (job.metadata.namespace.clone(), job.metadata.name.clone());
            if job_outcome(job) == JobOutcome::Running && !on_a_node.contains(&key) {
                slots.unplaced.push(excluded_by(job));
            }
        }
        slots
    }

    /// Take a slot for a new datamover: the hostnames its pod must avoid, or `None` when
    /// every node is full. With no node known (a cluster whose Nodes cannot be read) or no
    /// limit (0), nothing is excluded.
    pub fn take(&mut self) -> Option<BTreeSet<String>> {
        if self.limit == 0 || self.nodes.is_empty() {
            return Some(BTreeSet::new());
        }
        let full: BTreeSet<String> = self
            .nodes
            .iter()
            .filter(|node| {
                let here = self.placed.get(*node).copied().unwrap_or(0);
                let may_come = self
                    .unplaced
                    .iter()
                    .filter(|ex| !ex.contains(*node))
                    .count();
                here + may_come >= self.limit
            })
            .cloned()
            .collect();
        if full.len() == self.nodes.len() {
            return None;
        }
        self.unplaced.push(full.clone());
        Some(full)
    }

    /// At most this many datamovers a node.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How many nodes new pods may go to.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }
}

/// Whether a datamover pod may be scheduled to `node`: not cordoned, Ready, and without a
/// `NoSchedule` or `NoExecute` taint (datamovers tolerate none). A node counted while it could
/// never take the pod would make `take` keep new pods off every node that can.
fn may_run_datamovers(node: &Node) -> bool {
    let spec = node.spec.as_ref();
    let cordoned = spec.and_then(|s| s.unschedulable).unwrap_or(false);
    let tainted = spec.and_then(|s| s.taints.as_ref()).is_some_and(|taints| {
        taints
            .iter()
            .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
    });
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    !cordoned && !tainted && ready
}

/// The hostnames a Job's pod template excludes with `kubernetes.io/hostname NotIn`.
fn excluded_by(job: &Job) -> BTreeSet<String> {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .into_iter()
        .flat_map(|required| &required.node_selector_terms)
        .flat_map(|term| term.match_expressions.iter().flatten())
        .filter(|e| e.key == HOSTNAME && e.operator == "NotIn")
        .flat_map(|e| e.values.iter().flatten().cloned())
        .collect()
}

/// `affinity` that also keeps the pod off `hosts` (`kubernetes.io/hostname NotIn`, added to
/// every term, as terms are alternatives); `affinity` itself when `hosts` is empty.
pub fn exclude(affinity: Option<NodeAffinity>, hosts: &BTreeSet<String>) -> Option<NodeAffinity> {
    if hosts.is_empty() {
        return affinity;
    }
    let requirement = NodeSelectorRequirement {
        key: HOSTNAME.to_owned(),
        operator: "NotIn".to_owned(),
        values: Some(hosts.iter().cloned().collect()),
    };
    let mut affinity = affinity.unwrap_or_default();
    let required = affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(NodeSelector::default);
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_expressions
            .get_or_insert_with(Vec::new)
            .push(requirement.clone());
    }
    Some(affinity)
}

/// The [`SLOT_CONDITION`] of a run: False while `waiting` volumes find every node at the
/// bound, True again once none waits (set only after it was first False).
pub fn record_slots(
    conditions: &mut Vec<Condition>,
    waiting: usize,
    slots: &NodeSlots,
    generation: Option<i64>,
) {
    if waiting > 0 {
        set_condition(
            conditions,
            SLOT_CONDITION,
            ConditionStatus::False,
            "NodesFull",
            format!(
                "{waiting} volumes wait for a datamover slot: all {} nodes run (or may soon \
                 run) {} datamovers, the controller's --max-datamovers-per-node",
                slots.nodes(),
                slots.limit()
            ),
            generation,
        );
    } else if condition(conditions, SLOT_CONDITION).is_some() {
        set_condition(
            conditions,
            SLOT_CONDITION,
            ConditionStatus::True,
            "Scheduled",
            "every started volume had a node with a free datamover slot".to_owned(),
            generation,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {HOSTNAME: format!("host-{name}")}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
        .unwrap()
    }

    #[test]
    fn tainted_not_ready_and_cordoned_nodes_take_no_datamover() {
        let mut control_plane = node("cp");
        control_plane.spec = serde_json::from_value(json!({"taints": [{"key":
            "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]}))
        .unwrap();
        let mut lost = node("lost");
        lost.status =
            serde_json::from_value(json!({"conditions": [{"type": "Ready", "status": "Unknown"}]}))
                .unwrap();
        let mut cordoned = node("cordoned");
        cordoned.spec = serde_json::from_value(json!({"unschedulable": true})).unwrap();
        let mut preferring = node("soft");
        preferring.spec = serde_json::from_value(
            json!({"taints": [{"key": "spot", "effect": "PreferNoSchedule"}]}),
        )
        .unwrap();
        let nodes = [control_plane, lost, cordoned, preferring, node("w")];
        let pods = [pod("j1", Some("w"), "Running")];
        let mut slots = NodeSlots::count(1, &nodes, &pods, &[job("j1", &[])]);
        assert_eq!(slots.nodes(), 2, "only soft and w may run datamovers");
        // w is full; the new Job goes to soft, not to a node it could never run on.
        assert_eq!(slots.take(), Some(BTreeSet::from(["host-w".to_owned()])));
        assert_eq!(
            slots.take(),
            None,
            "both are full now: the next volume waits"
        );
    }

    fn pod(job: &str, node: Option<&str>, phase: &str) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": format!("{job}-1"), "namespace": "shop",
            "labels": {"batch.kubernetes.io/job-name": job}},
            "spec": {"containers": [], "nodeName": node}, "status": {"phase": phase}}),
        )
        .unwrap()
    }

    fn job(name: &str, excluded: &[&str]) -> Job {
        let mut job: Job = serde_json::from_value(json!({"metadata": {"name": name,
            "namespace": "shop"}, "spec": {"template": {"spec": {"containers": []}}}}))
        .unwrap();
        let hosts = excluded.iter().map(|h| (*h).to_owned()).collect();
        if let Some(spec) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
            spec.affinity = Some(k8s_openapi::api::core::v1::Affinity {
                node_affinity: exclude(None, &hosts),
                ..Default::default()
            });
        }
        job
    }

    #[test]
    fn full_nodes_are_excluded_and_unplaced_jobs_count_where_they_may_land() {
        let nodes = [node("a"), node("b")];
        // One running on a; one Job (excluding host-a) not yet on a node: it may land on b.
        let pods = [
            pod("j1", Some("a"), "Running"),
            pod("j0", Some("b"), "Succeeded"),
        ];
        let jobs = [job("j1", &[]), job("j2", &["host-a"])];
        let mut slots = NodeSlots::count(2, &nodes, &pods, &jobs);
        // a: 1 + 0 (j2 avoids a); b: 0 + 1. Room on both for one more.
        assert_eq!(slots.take(), Some(BTreeSet::new()));
        // That one may land anywhere: a 2, b 2. Full.
        assert_eq!(slots.take(), None);

        let mut one = NodeSlots::count(1, &nodes, &pods, &jobs);
        assert_eq!(one.take(), None, "a runs one, j2 may come to b");
        let mut one = NodeSlots::count(1, &nodes, &pods, &jobs[..1]);
        assert_eq!(one.take(), Some(BTreeSet::from(["host-a".to_owned()])));
        assert_eq!(one.take(), None, "the new Job may land on b");
    }

    #[test]
    fn no_nodes_or_no_limit_exclude_nothing() {
        let pods = [pod("j1", Some("a"), "Running")];
        assert_eq!(
            NodeSlots::count(1, &[], &pods, &[]).take(),
            Some(BTreeSet::new())
        );
        assert_eq!(
            NodeSlots::count(0, &[node("a")], &pods, &[]).take(),
            Some(BTreeSet::new())
        );
    }

    #[test]
    fn the_exclusion_joins_every_term_of_an_affinity() {
        let zones: NodeAffinity = serde_json::from_value(json!({
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]},
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z2"]}]}]}}))
        .unwrap();
        let hosts = BTreeSet::from(["n1".to_owned()]);
        let joined = serde_json::to_value(exclude(Some(zones), &hosts)).unwrap();
        let terms = &joined["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        for term in terms.as_array().unwrap() {
            assert_eq!(
                term["matchExpressions"][1],
                json!({"key": HOSTNAME, "operator": "NotIn", "values": ["n1"]})
            );
        }
        assert_eq!(exclude(None, &BTreeSet::new()), None);
    }
}
