//! An in-memory Kubernetes API server for client tests: serves discovery (`/api`, `/apis`,
//! resource lists), list and get of the objects it holds (with paging), and server-side apply
//! (`PATCH` with `application/apply-patch+yaml`), plugged into `kube::Client::new` as a tower
//! service. It records every request so tests can assert what the client sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// One served kind: group, version, kind, plural, namespaced.
#[derive(Clone, Debug)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
}

pub const fn kind(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
) -> Kind {
    Kind {
        group,
        version,
        kind,
        plural,
        namespaced,
    }
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Option<Value>,
}

#[derive(Default)]
pub struct State {
    pub kinds: Vec<Kind>,
    pub objects: Vec<Value>,
    pub requests: Vec<Seen>,
    next_uid: u64,
    /// Page size the server uses for lists regardless of `limit` (0: no paging).
    pub page: usize,
}

#[derive(Clone, Default)]
pub struct MockServer {
    pub state: Arc<Mutex<State>>,
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn ok(value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(value).unwrap()))
        .unwrap()
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(|x| x.as_str()).unwrap_or("")
}

fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

impl MockServer {
    pub fn new(kinds: Vec<Kind>, objects: Vec<Value>) -> Self {
        let server = MockServer::default();
        {
            let mut s = server.state.lock().unwrap();
            s.kinds = kinds;
            s.objects = objects;
        }
        server
    }

    /// A kube client talking to this server.
    pub fn client(&self) -> kube::Client {
        let server = self.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let server = server.clone();
            async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn objects(&self) -> Vec<Value> {
        self.state.lock().unwrap().objects.clone()
    }

    pub fn find(&self, kind: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        self.objects().into_iter().find(|o| {
            text(o, "/kind") == kind
                && text(o, "/metadata/name") == name
                && o.pointer("/metadata/namespace").and_then(|n| n.as_str()) == ns
        })
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().to_string();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|c| c.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let mut state = self.state.lock().unwrap();
        state.requests.push(Seen {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type,
            body: body.clone(),
        });
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["api"] => {
                return ok(
                    &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
                );
            }
            ["apis"] => {
                let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                for k in state.kinds.iter().filter(|k| !k.group.is_empty()) {
                    let versions = groups.entry(k.group).or_default();
                    if !versions.contains(&k.version) {
                        versions.push(k.version);
                    }
                }
                let groups: Vec<Value> = groups
                    .into_iter()
                    .map(|(g, vs)| {
                        let versions: Vec<Value> = vs
                            .iter()
                            .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                            .collect();
                        json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                    })
                    .collect();
                return ok(&json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
            }
            _ => {}
        }
        let (group, version, rest) = match parts.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("no route {path}"),
                );
            }
        };
        let group_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        if rest.is_empty() {
            let resources: Vec<Value> = state
                .kinds
                .iter()
                .filter(|k| k.group == group && k.version == version)
                .map(|k| json!({"name": k.plural, "singularName": "", "namespaced": k.namespaced, "kind": k.kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}))
                .collect();
            if resources.is_empty() {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("no group {group_version}"),
                );
            }
            return ok(
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
            );
        }
        let (ns, plural, name) = match rest {
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
            ["namespaces", ns, plural] => (Some(*ns), *plural, None),
            [plural, name] => (None, *plural, Some(*name)),
            [plural] => (None, *plural, None),
            _ => {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("no route {path}"),
                );
            }
        };
        let Some(kind) = state
            .kinds
            .iter()
            .find(|k| k.group == group && k.plural == plural)
            .cloned()
        else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no resource {plural}"),
            );
        };
        let matches = |o: &Value| {
            text(o, "/kind") == kind.kind
                && group_of(text(o, "/apiVersion")) == kind.group
                && (ns.is_none() || o.pointer("/metadata/namespace").and_then(|n| n.as_str()) == ns)
        };
        match (method.as_str(), name) {
            ("GET", None) => {
                let all: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|o| matches(o))
                    .cloned()
                    .collect();
                let start: usize = query
                    .split('&')
                    .find_map(|p| p.strip_prefix("continue="))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let page = if state.page == 0 {
                    all.len()
                } else {
                    state.page
                };
                let end = (start + page).min(all.len());
                // Typed lists: items carry no apiVersion/kind, as the real API server sends them.
                let items: Vec<Value> = all[start..end]
                    .iter()
                    .map(|o| {
                        let mut o = o.clone();
                        o.as_object_mut().unwrap().remove("apiVersion");
                        o.as_object_mut().unwrap().remove("kind");
                        o
                    })
                    .collect();
                let cont = if end < all.len() {
                    end.to_string()
                } else {
                    String::new()
                };
                ok(
                    &json!({"kind": format!("{}List", kind.kind), "apiVersion": group_version,
                    "metadata": {"resourceVersion": "900", "continue": cont}, "items": items}),
                )
            }
            ("GET", Some(name)) => match state
                .objects
                .iter()
                .find(|o| matches(o) && text(o, "/metadata/name") == name)
            {
                Some(o) => ok(o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{plural} \"{name}\" not found"),
                ),
            },
            ("PATCH", Some(name)) => {
                let Some(mut body) = body else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "no body".into());
                };
                if text(&body, "/metadata/name") != name {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "name mismatch".into(),
                    );
                }
                state.next_uid += 1;
                let uid = format!("restored-{}", state.next_uid);
                let existing = state
                    .objects
                    .iter()
                    .position(|o| matches(o) && text(o, "/metadata/name") == name);
                let meta = body
                    .pointer_mut("/metadata")
                    .and_then(|m| m.as_object_mut())
                    .unwrap();
                if let Some(ns) = ns {
                    meta.insert("namespace".into(), ns.into());
                }
                match existing {
                    Some(i) => {
                        let old_uid = state.objects[i]
                            .pointer("/metadata/uid")
                            .cloned()
                            .unwrap_or(Value::Null);
                        meta.insert("uid".into(), old_uid);
                        state.objects[i] = body.clone();
                    }
                    None => {
                        meta.insert("uid".into(), uid.into());
                        state.objects.push(body.clone());
                    }
                }
                ok(&body)
            }
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} {path}"),
            ),
        }
    }
}

/// The kinds of the sample dump, as a 1.33 cluster with the sample CRD installed serves them.
pub fn sample_kinds() -> Vec<Kind> {
    vec![
        kind("", "v1", "Namespace", "namespaces", false),
        kind("", "v1", "Node", "nodes", false),
        kind("", "v1", "PersistentVolume", "persistentvolumes", false),
        kind(
            "",
            "v1",
            "PersistentVolumeClaim",
            "persistentvolumeclaims",
            true,
        ),
        kind("", "v1", "Pod", "pods", true),
        kind("", "v1", "Service", "services", true),
        kind("", "v1", "Endpoints", "endpoints", true),
        kind("", "v1", "Secret", "secrets", true),
        kind("", "v1", "ConfigMap", "configmaps", true),
        kind("", "v1", "ServiceAccount", "serviceaccounts", true),
        kind("", "v1", "Event", "events", true),
        kind("events.k8s.io", "v1", "Event", "events", true),
        kind("apps", "v1", "Deployment", "deployments", true),
        kind("apps", "v1", "StatefulSet", "statefulsets", true),
        kind("apps", "v1", "ReplicaSet", "replicasets", true),
        kind(
            "apps",
            "v1",
            "ControllerRevision",
            "controllerrevisions",
            true,
        ),
        kind("batch", "v1", "Job", "jobs", true),
        kind(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
        ),
        kind(
            "storage.k8s.io",
            "v1",
            "StorageClass",
            "storageclasses",
            false,
        ),
        kind(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
        ),
        kind(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        ),
        kind(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        ),
        kind(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingWebhookConfiguration",
            "validatingwebhookconfigurations",
            false,
        ),
        kind(
            "cache.example.com",
            "v1",
            "RedisCluster",
            "redisclusters",
            true,
        ),
    ]
}
