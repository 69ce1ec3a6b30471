//! `strata install` prints manifests that pass `kubernetes-validate --strict`, and
//! `deploy/strata.yaml` is exactly its output for the sample namespace.

mod strata_bin;
use strata_bin::{assert_valid_manifests, ok, strata};

use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/strata.yaml");
const SAMPLE: [&str; 7] = [
    "install",
    "--namespace",
    "shop",
    "--image",
    "registry.example/strata:0.1.0",
    "--restore-into",
    "shop=shop-copy",
];

fn kinds_and_names(text: &str) -> Vec<(String, String, String)> {
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(text).expect("YAML stream");
    docs.iter()
        .map(|d| {
            let field = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                field(&d["kind"]),
                field(&d["metadata"]["namespace"]),
                field(&d["metadata"]["name"]),
            )
        })
        .collect()
}

#[test]
fn deploy_strata_yaml_is_the_output_of_strata_install() {
    let printed = ok(strata(&SAMPLE));
    let shipped = std::fs::read_to_string(DEPLOY).expect("deploy/strata.yaml");
    assert!(
        printed == shipped,
        "deploy/strata.yaml is stale: regenerate it with `strata {}` (deploy/README.md)",
        SAMPLE.join(" ")
    );
}

#[test]
fn every_document_passes_kubernetes_validate_strict() {
    let printed = ok(strata(&[
        "install",
        "--namespace",
        "shop",
        "--namespace",
        "web",
        "--image",
        "registry.example/strata:0.1.0",
    ]));
    let docs = kinds_and_names(&printed);
    let per_namespace = |ns: &str| {
        docs.iter()
            .filter(|(_, namespace, name)| namespace == ns || name.ends_with(&format!("-{ns}")))
            .map(|(kind, _, _)| kind.as_str())
            .collect::<Vec<_>>()
    };
    for ns in ["shop", "web"] {
        assert_eq!(
            per_namespace(ns),
            // The controller's read binding, then the datamover's account and bindings.
            [
                "RoleBinding",
                "ServiceAccount",
                "RoleBinding",
                "ClusterRoleBinding"
            ],
            "{ns}"
        );
    }
    assert_eq!(docs.len(), 3 + 10 + 2 * 4, "{docs:?}");
    assert_valid_manifests(&printed, docs.len());
}

#[test]
fn the_deployment_runs_the_image_it_was_given_for_itself_and_its_datamovers() {
    let printed = ok(strata(&["install", "--image", "example.org/s:9"]));
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&printed).unwrap();
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "example.org/s:9");
    assert_eq!(container["args"][0], "--datamover-image");
    assert_eq!(container["args"][1], "example.org/s:9");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    // No --namespace: no datamover account or binding anywhere (the only RoleBinding is the
    // controller's leader election one).
    let bindings: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ServiceAccount")
        .collect();
    assert!(
        bindings
            .iter()
            .all(|d| d["metadata"]["namespace"] == "strata-system"
                && d["metadata"]["name"] != "strata-datamover"),
        "{bindings:?}"
    );
}

#[test]
fn a_namespace_that_is_not_a_dns_label_is_refused_on_one_line() {
    let out = strata(&["install", "--namespace", "Shop_1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("\"Shop_1\" is not a DNS label"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn nfs_targets_are_mounted_into_the_controller_where_their_urls_point() {
    let printed = ok(strata(&[
        "install",
        "--nfs-target",
        "/targets/nas=nas.example:/exports/strata",
    ]));
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&printed).unwrap();
    let pod = &docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"];
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/targets/nas")
        .expect("the export's mount");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("its volume");
    assert_eq!(volume["nfs"]["server"], "nas.example");
    assert_eq!(volume["nfs"]["path"], "/exports/strata");
    assert_valid_manifests(&printed, docs.len());

    let out = strata(&["install", "--nfs-target", "nas.example:/exports"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not PATH=SERVER:EXPORT"), "{err}");
}

fn controller_documents() -> Vec<Value> {
    let printed = ok(strata(&SAMPLE));
    serde_saphyr::from_str_multiple(&printed).expect("YAML stream")
}

#[test]
fn the_deployment_elects_a_leader_and_serves_probes_and_metrics() {
    let docs = controller_documents();
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    // A standby is ready, so the rollout can keep every replica up while it replaces them.
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let container = &spec["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--leader-elect"), "{args:?}");
    assert_eq!(
        container["ports"],
        serde_json::json!([{ "name": "metrics", "containerPort": 8080, "protocol": "TCP" }])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let help = controller_help(&args);
    for flag in ["--leader-elect", "--lease-name", "--metrics-bind-address"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let env = container["env"].as_array().unwrap();
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = env
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name}"));
        assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
}

#[test]
fn the_election_role_grants_exactly_get_create_update_on_leases_in_the_controller_namespace() {
    let docs = controller_documents();
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role")
        .expect("a Role for leader election");
    assert_eq!(role["metadata"]["namespace"], "strata-system");
    let mut verbs = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(
            rule["apiGroups"],
            serde_json::json!(["coordination.k8s.io"])
        );
        assert_eq!(rule["resources"], serde_json::json!(["leases"]));
        verbs.extend(
            rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap()),
        );
    }
    verbs.sort();
    assert_eq!(verbs, ["create", "get", "update"]);
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "RoleBinding" && d["metadata"]["namespace"] == "strata-system")
        .expect("its RoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], "strata-controller");
    // The ClusterRole's Lease access (the per-PVC locks) is not widened to update.
    let cluster_role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "strata-controller")
        .unwrap();
    let lease_rule = cluster_role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"] == serde_json::json!(["leases"]))
        .unwrap();
    assert_eq!(
        lease_rule["verbs"],
        serde_json::json!(["get", "create", "delete"])
    );
}

/// Issue 16 item 7: no wildcard grant writes anything. The controller's ClusterRole names
/// every resource it writes; the one wildcard (read) role is bound only in the application
/// namespace; restored kinds are exactly the restore policy's, extended by `--restore-kind`,
/// and `--restore-kind`/`--restore-into` reach the controller's command line.
#[test]
fn the_rbac_writes_only_named_kinds_and_reads_everything_only_in_application_namespaces() {
    let printed = ok(strata(&[
        "install",
        "--namespace",
        "shop",
        "--restore-kind",
        "widgets.example.com",
        "--restore-into",
        "shop=shop-*",
    ]));
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&printed).expect("YAML stream");
    let role = |name: &str| {
        docs.iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("ClusterRole {name}"))["rules"]
            .as_array()
            .unwrap()
            .clone()
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    for rule in role("strata-controller") {
        let resources = strings(&rule["resources"]);
        assert!(
            !resources.contains(&"*".to_owned())
                && !strings(&rule["apiGroups"]).contains(&"*".to_owned()),
            "wildcard in the controller's ClusterRole: {rule}"
        );
    }
    let granted = |group: &str, resource: &str, verb: &str| {
        role("strata-controller").iter().any(|r| {
            strings(&r["apiGroups"]).contains(&group.to_owned())
                && strings(&r["resources"]).contains(&resource.to_owned())
                && strings(&r["verbs"]).contains(&verb.to_owned())
        })
    };
    for (group, resource) in strata::operator::policy::DEFAULT_RESTORE_KINDS
        .iter()
        .chain(&[("example.com", "widgets")])
    {
        for verb in ["get", "create", "patch"] {
            assert!(granted(group, resource, verb), "{verb} {group}/{resource}");
        }
    }
    for (group, resource) in [
        ("rbac.authorization.k8s.io", "clusterrolebindings"),
        ("rbac.authorization.k8s.io", "roles"),
        (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        ),
        ("", "pods"),
        ("", "nodes"),
    ] {
        assert!(
            !granted(group, resource, "create"),
            "create {group}/{resource}"
        );
    }

    let reader = role("strata-controller-read");
    assert_eq!(reader.len(), 1, "{reader:?}");
    assert_eq!(strings(&reader[0]["verbs"]), ["get", "list"]);
    let bindings: Vec<(&str, &str)> = docs
        .iter()
        .filter(|d| d["roleRef"]["name"] == "strata-controller-read")
        .map(|d| {
            (
                d["kind"].as_str().unwrap(),
                d["metadata"]["namespace"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(bindings, [("RoleBinding", "shop")]);

    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    let joined = args.join(" ");
    assert!(
        joined.contains("--restore-kind widgets.example.com --restore-into shop=shop-*"),
        "{joined}"
    );

    let out = strata(&["install", "--restore-into", "shop"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected FROM=INTO"), "{err}");
}

/// The controller's `--help` after `args`, which it must accept (clap refuses an unknown flag
/// before it reaches --help).
fn controller_help(args: &[&str]) -> String {
    let parsed = std::process::Command::new(env!("CARGO_BIN_EXE_strata-controller"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    String::from_utf8_lossy(&parsed.stdout).into_owned()
}

/// `--max-datamovers-per-node` passes through to the controller's command line, which takes it.
#[test]
fn the_datamover_bound_per_node_reaches_the_controller() {
    let printed = ok(strata(&[
        "install",
        "--namespace",
        "shop",
        "--max-datamovers-per-node",
        "1",
    ]));
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&printed).expect("YAML stream");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--max-datamovers-per-node", "1"]),
        "{args:?}"
    );
    assert!(controller_help(&args).contains("--max-datamovers-per-node"));
    let default = serde_json::to_string(&controller_documents()).unwrap();
    assert!(!default.contains("--max-datamovers-per-node"));
}
