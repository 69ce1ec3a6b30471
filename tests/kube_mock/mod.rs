//! An in-memory Kubernetes API server for the reconcile tests, plugged into `kube::Client::new`
//! as a tower service (the pattern of strata-csi's tests): create (`POST`, 409 when taken), get
//! and list (by URL path, also across namespaces; of the query only equality label selectors),
//! watch (`?watch=true`, in its own section), merge and apply `PATCH` (of the object or of its
//! `/status`), delete, and API discovery of the core kinds the tests use. JSON patches and the
//! finalizer semantics of deletion are in their own section at the end.
//!
//! Every write sets `metadata.resourceVersion`, and a PATCH carrying another one than the
//! stored object's is refused with 409, as the API server does; [`Mock::fail`] makes chosen
//! requests answer an error status. Events (events.k8s.io/v1) are stored like any object.

#![allow(dead_code)] // Shared by several test files, each using a part.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::client::Body;
use serde_json::{Value, json};

/// What the mock answers with: a whole body, or a watch's stream of events.
type Answer = Response<UnsyncBoxBody<Bytes, std::convert::Infallible>>;

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    requests: Vec<String>,
    next_uid: u64,
    /// The last resourceVersion handed out.
    version: u64,
    /// `("METHOD path-prefix", status code)`: requests answered with that error.
    failures: Vec<(String, u16)>,
    /// The rules every request is authorised against, once [`Mock::enforce_rbac`] is called:
    /// cluster-wide (`None`) or in one namespace (a RoleBinding's).
    rbac: Option<Vec<(Option<String>, Vec<Value>)>>,
    /// The requests RBAC refused.
    denied: Vec<String>,
    /// Every write so far, for the watches.
    changes: Vec<Change>,
}

#[derive(Clone, Default)]
pub struct Mock {
    state: Arc<Mutex<State>>,
}

fn respond(code: StatusCode, body: &Value) -> Answer {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed_unsync())
        .unwrap()
}

fn failure(code: StatusCode, reason: &str) -> Answer {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": reason, "message": reason, "code": code.as_u16()}),
    )
}

/// Whether `path` names a collection: `/api/v1/R`, `/api/v1/namespaces/N/R`,
/// `/apis/G/V/R`, `/apis/G/V/namespaces/N/R`.
fn is_collection(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.first() {
        Some(&"api") => &parts[2.min(parts.len())..],
        Some(&"apis") => &parts[3.min(parts.len())..],
        _ => return false,
    };
    match rest {
        [_] => true,
        [first, _, _] => *first == "namespaces",
        _ => false,
    }
}

/// Whether the object at `path` is in collection `collection`: directly under it, or, for a
/// collection of all namespaces (`/api/v1/pods`), under `/api/v1/namespaces/N/pods`.
fn in_collection(collection: &str, path: &str) -> bool {
    let Some((parent, name)) = path.rsplit_once('/') else {
        return false;
    };
    if name.is_empty() {
        return false;
    }
    if parent == collection {
        return true;
    }
    let Some((group, resource)) = collection.rsplit_once('/') else {
        return false;
    };
    parent
        .strip_prefix(group)
        .and_then(|rest| rest.strip_prefix("/namespaces/"))
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(namespace, rest)| !namespace.is_empty() && rest == resource)
}

/// Core kinds served by discovery: (plural, kind, namespaced).
const CORE: &[(&str, &str, bool)] = &[
    ("namespaces", "Namespace", false),
    ("persistentvolumeclaims", "PersistentVolumeClaim", true),
    ("persistentvolumes", "PersistentVolume", false),
    ("configmaps", "ConfigMap", true),
];

fn discovery(path: &str) -> Option<Value> {
    match path {
        "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": []})),
        "/apis" => Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})),
        "/api/v1" => Some(json!({"kind": "APIResourceList", "groupVersion": "v1",
            "resources": CORE.iter().map(|(plural, kind, namespaced)| json!({
                "name": plural, "singularName": kind.to_lowercase(), "namespaced": namespaced,
                "kind": kind, "verbs": ["create", "delete", "get", "list", "patch", "watch"]
            })).collect::<Vec<_>>()})),
        _ => None,
    }
}

/// The equality requirements of a list's `labelSelector` query parameter (`a=b,c==d`); the
/// other selector forms are not used by the code under test.
fn label_selector(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("labelSelector="))
        .flat_map(|value| {
            let value = value
                .replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/");
            value
                .split(',')
                .filter_map(|term| {
                    let (key, wanted) = term.split_once('=')?;
                    Some((key.to_owned(), wanted.trim_start_matches('=').to_owned()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn selects(selector: &[(String, String)], object: &Value) -> bool {
    selector
        .iter()
        .all(|(key, wanted)| object["metadata"]["labels"][key].as_str() == Some(wanted))
}

/// Whether `patch` names a resourceVersion other than `stored`'s: the API server applies a
/// patch to the stored object and refuses the result with 409 Conflict when its
/// resourceVersion differs ("Concurrency Control and Consistency", Kubernetes API conventions).
fn is_stale(patch: &Value, stored: &Value) -> bool {
    let wanted = &patch["metadata"]["resourceVersion"];
    wanted.is_string() && *wanted != stored["metadata"]["resourceVersion"]
}

impl State {
    /// Give `object` the next resourceVersion.
    fn new_version(&mut self, object: &mut Value) {
        self.version += 1;
        if object["metadata"].is_object() {
            object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        }
    }

    /// Store `object` (its resourceVersion already set) at `path`, as a watch reports it.
    fn store(&mut self, path: &str, object: Value) {
        let kind = if self.objects.contains_key(path) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.changes.push(Change {
            version: self.version,
            path: path.to_owned(),
            kind,
            object: object.clone(),
        });
        self.objects.insert(path.to_owned(), object);
    }

    /// Remove the object at `path`, as a watch reports it.
    fn erase(&mut self, path: &str) -> Option<Value> {
        let mut object = self.objects.remove(path)?;
        self.new_version(&mut object);
        self.changes.push(Change {
            version: self.version,
            path: path.to_owned(),
            kind: "DELETED",
            object: object.clone(),
        });
        Some(object)
    }

    fn injected_failure(&self, request: &str) -> Option<StatusCode> {
        self.failures
            .iter()
            .find(|(prefix, _)| request.starts_with(prefix.as_str()))
            .and_then(|(_, code)| StatusCode::from_u16(*code).ok())
    }
}

impl Mock {
    pub fn client(&self) -> kube::Client {
        let mock = self.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let mock = mock.clone();
            async move { Ok::<_, std::convert::Infallible>(mock.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Store `object` at `path` (the object's URL), as a write by another client.
    pub fn put(&self, path: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.new_version(&mut object);
        state.store(path, object);
    }

    /// The objects every operator test in namespace `shop` starts from: the hostpath driver's
    /// VolumeSnapshotClass, Target `local` on the folder `target`, and Backup `nightly` (Full)
    /// of `app=db`.
    pub fn put_snapshot_class_target_and_backup(&self, target: &std::path::Path) {
        self.put(
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses/csi-hostpath-snapclass",
            serde_json::json!({"apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshotClass", "metadata": {"name": "csi-hostpath-snapclass"},
                "driver": "hostpath.csi.k8s.io", "deletionPolicy": "Delete"}),
        );
        self.put(
            "/apis/strata.io/v1alpha1/namespaces/shop/targets/local",
            serde_json::json!({"apiVersion": "strata.io/v1alpha1", "kind": "Target",
                "metadata": {"name": "local", "namespace": "shop"},
                "spec": {"url": target.to_str().unwrap()}}),
        );
        self.put(
            "/apis/strata.io/v1alpha1/namespaces/shop/backups/nightly",
            serde_json::json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
                "metadata": {"name": "nightly", "namespace": "shop", "uid": "b-1", "generation": 1},
                "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "local"},
                    "mode": "Full"}}),
        );
    }

    /// An operator context on this mock that polls every 3 s and resyncs every 30 s.
    pub fn context(&self) -> strata::operator::Context {
        let mut ctx = strata::operator_context(self.client(), "registry.example/strata:test");
        ctx.poll = std::time::Duration::from_secs(3);
        ctx.resync = std::time::Duration::from_secs(30);
        // The tests' datamovers share the test's filesystem.
        ctx.host_folder_targets = true;
        // The tests' mapped restores (shop to shop-copy or copy), as `--restore-into` grants.
        for grant in ["shop=shop-copy", "shop=copy"] {
            ctx.restore_policy.namespaces.push(grant.parse().unwrap());
        }
        ctx
    }

    /// Backup `shop/name` as stored.
    pub fn backup(&self, name: &str) -> strata::operator::crd::Backup {
        let path = format!("/apis/strata.io/v1alpha1/namespaces/shop/backups/{name}");
        serde_json::from_value(self.get(&path).unwrap()).unwrap()
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Paths of the objects stored directly under collection `path`.
    pub fn names_under(&self, path: &str) -> Vec<String> {
        let prefix = format!("{path}/");
        self.state
            .lock()
            .unwrap()
            .objects
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).filter(|r| !r.contains('/')))
            .map(str::to_owned)
            .collect()
    }

    /// Paths of every stored object, in order.
    pub fn paths(&self) -> Vec<String> {
        self.state.lock().unwrap().objects.keys().cloned().collect()
    }

    /// Remove the object at `path` (as a controller's delete would); whether it was there.
    pub fn remove(&self, path: &str) -> bool {
        self.state.lock().unwrap().erase(path).is_some()
    }

    /// `"METHOD path"` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    async fn handle(&self, req: Request<Body>) -> Answer {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let selector = label_selector(&query);
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let mut state = self.state.lock().unwrap();
        let request = format!("{method} {path}");
        state.requests.push(request.clone());
        if let Some(code) = state.injected_failure(&request) {
            return failure(code, code.canonical_reason().unwrap_or("Failure"));
        }
        if let Some(rules) = &state.rbac {
            if let Some(attributes) = attributes(method.as_str(), &path, &query) {
                let granted = rules.iter().any(|(namespace, rules)| {
                    (namespace.is_none() || *namespace == attributes.namespace)
                        && allowed(rules, &attributes)
                });
                if !granted {
                    state.denied.push(attributes.to_string());
                    return failure(StatusCode::FORBIDDEN, "Forbidden");
                }
            }
        }
        match method.as_str() {
            "POST" => {
                let mut object: Value = serde_json::from_slice(&bytes).unwrap();
                let name = object["metadata"]["name"].as_str().unwrap().to_owned();
                let at = format!("{path}/{name}");
                if state.objects.contains_key(&at) {
                    return failure(StatusCode::CONFLICT, "AlreadyExists");
                }
                state.next_uid += 1;
                object["metadata"]["uid"] = json!(format!("uid-{}", state.next_uid));
                object["metadata"]["creationTimestamp"] =
                    json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                state.new_version(&mut object);
                state.store(&at, object.clone());
                respond(StatusCode::CREATED, &object)
            }
            "GET" => {
                if let Some(document) = discovery(&path) {
                    return respond(StatusCode::OK, &document);
                }
                if let Some(object) = state.objects.get(&path) {
                    return respond(StatusCode::OK, object);
                }
                if !is_collection(&path) {
                    return failure(StatusCode::NOT_FOUND, "NotFound");
                }
                if query_value(&query, "watch") == Some("true") {
                    let from = query_value(&query, "resourceVersion").and_then(|v| v.parse().ok());
                    return self.watch(&mut state, path, selector, from);
                }
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|(at, _)| in_collection(&path, at))
                    .filter(|(_, object)| selects(&selector, object))
                    .map(|(_, object)| object.clone())
                    .collect();
                respond(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "List",
                            "metadata": {"resourceVersion": state.version.to_string()},
                            "items": items}),
                )
            }
            "PATCH" => {
                let patch: Value = serde_json::from_slice(&bytes).unwrap();
                let (at, status_only) = match path.strip_suffix("/status") {
                    Some(object) => (object.to_owned(), true),
                    None => (path.clone(), false),
                };
                let apply = content_type.starts_with("application/apply-patch");
                if content_type.starts_with("application/json-patch") {
                    return json_patch_at(&mut state, &at, &patch);
                }
                let version = state.version + 1;
                let object = match state.objects.get_mut(&at) {
                    Some(object) => object,
                    None if apply => {
                        let mut created = patch.clone();
                        state.new_version(&mut created);
                        state.store(&at, created.clone());
                        return respond(StatusCode::CREATED, &created);
                    }
                    None => return failure(StatusCode::NOT_FOUND, "NotFound"),
                };
                if is_stale(&patch, object) {
                    return failure(StatusCode::CONFLICT, "Conflict");
                }
                if status_only {
                    json_patch::merge(&mut object["status"], &patch["status"]);
                } else {
                    json_patch::merge(object, &patch);
                }
                object["metadata"]["resourceVersion"] = json!(version.to_string());
                let object = object.clone();
                state.version = version;
                state.store(&at, object.clone());
                release_if_finalized(&mut state, &at);
                respond(StatusCode::OK, &object)
            }
            "DELETE" => delete(&mut state, &path),
            _ => failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
        }
    }
}

/// Fault injection and Events, for the tests of error handling (not every test binary that
/// includes this module uses them).
#[allow(dead_code)]
impl Mock {
    /// Answer every request whose `"METHOD path"` starts with `request` with error `code`
    /// (a Status of the code's reason), until [`Mock::heal`].
    pub fn fail(&self, request: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .failures
            .push((request.to_owned(), code));
    }

    /// Stop the failures of [`Mock::fail`].
    pub fn heal(&self) {
        self.state.lock().unwrap().failures.clear();
    }

    /// The Events stored in `namespace`.
    pub fn events(&self, namespace: &str) -> Vec<Value> {
        let collection = format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events");
        self.names_under(&collection)
            .iter()
            .filter_map(|name| self.get(&format!("{collection}/{name}")))
            .collect()
    }
}

/// A reconcile from a stale copy of its object (as after a crash before the status write, or
/// from a lagging cache): its status write is refused with 409, a transient error.
#[allow(dead_code)]
pub fn refused_as_stale(
    result: Result<kube::runtime::controller::Action, strata::operator::Error>,
) {
    let err = result.expect_err("a status write from a stale copy is refused");
    assert_eq!(
        (err.class(), err.reason()),
        (strata::operator::ErrorClass::Transient, "Conflict"),
        "{err}"
    );
}

// --- JSON patches and finalizers ------------------------------------------------------------
//
// The API server's deletion of an object with finalizers (docs "Finalizers", "Garbage
// Collection"): a DELETE only sets `metadata.deletionTimestamp`; the object goes when an update
// removes its last finalizer. JSON patches (RFC 6902) are applied whole or not at all; a failed
// `test` is 422, and a `test` for null passes on a missing member, as the API server's patch
// library has it (kube-runtime's finalizer helper relies on that).

fn delete(state: &mut State, path: &str) -> Answer {
    let Some(object) = state.objects.get_mut(path) else {
        return failure(StatusCode::NOT_FOUND, "NotFound");
    };
    let pending = object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if !pending {
        let object = state.erase(path).unwrap();
        return respond(StatusCode::OK, &object);
    }
    if object["metadata"]["deletionTimestamp"].is_null() {
        object["metadata"]["deletionTimestamp"] =
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        let mut marked = object.clone();
        state.new_version(&mut marked);
        state.store(path, marked);
    }
    respond(StatusCode::OK, &state.objects[path])
}

/// Remove the object at `path` if it is marked deleted and has no finalizer left.
fn release_if_finalized(state: &mut State, path: &str) {
    let done = state.objects.get(path).is_some_and(|object| {
        !object["metadata"]["deletionTimestamp"].is_null()
            && object["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty())
    });
    if done {
        state.erase(path);
    }
}

fn json_patch_at(state: &mut State, path: &str, ops: &Value) -> Answer {
    let Some(object) = state.objects.get_mut(path) else {
        return failure(StatusCode::NOT_FOUND, "NotFound");
    };
    let ops: Vec<Value> = ops
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|op| {
            let missing = op["path"]
                .as_str()
                .is_some_and(|p| object.pointer(p).is_none());
            !(op["op"] == "test" && op["value"].is_null() && missing)
        })
        .collect();
    let ops: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
    let mut patched = object.clone();
    if json_patch::patch(&mut patched, &ops).is_err() {
        return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
    }
    state.new_version(&mut patched);
    state.store(path, patched.clone());
    release_if_finalized(state, path);
    respond(StatusCode::OK, &patched)
}

impl Mock {
    /// The key naming the objects run `run` (a stored Backup or Restore of `shop`; `kind` is
    /// `backups` or `restores`) makes for PVC `namespace/pvc`, as the reconcilers compute it.
    pub fn run_key(
        &self,
        kind: &str,
        run: &str,
        namespace: &str,
        pvc: &str,
    ) -> strata::csi::VolumeKey {
        let path = format!("/apis/strata.io/v1alpha1/namespaces/shop/{kind}/{run}");
        let object = self.get(&path).unwrap_or_else(|| panic!("{path} stored"));
        let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "strata.io/v1alpha1".to_owned(),
            kind: object["kind"].as_str().unwrap().to_owned(),
            name: run.to_owned(),
            uid: object["metadata"]["uid"].as_str().unwrap().to_owned(),
            ..Default::default()
        };
        strata::csi::VolumeKey::of_run(&owner, "shop", namespace, pvc)
    }
}

// --- RBAC -------------------------------------------------------------------------------------
//
// The API server's RBAC authorizer (docs "Using RBAC Authorization", "Authorization: request
// attributes"): a resource request is allowed when some rule's apiGroups, resources (with
// `resource/subresource` for a subresource) and verbs contain the request's, or `*`, and its
// resourceNames, if any, contain the object's name. Discovery (`/api`, `/apis/...` without a
// resource) is granted to every authenticated user by `system:discovery`.

/// The attributes of one resource request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    pub group: String,
    pub resource: String,
    pub verb: &'static str,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

impl std::fmt::Display for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        if let Some(namespace) = &self.namespace {
            write!(f, " in {namespace}")?;
        }
        Ok(())
    }
}

/// The attributes of `METHOD path`; `None` for discovery.
fn attributes(method: &str, path: &str, query: &str) -> Option<Attributes> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, mut rest) = match parts.first() {
        Some(&"api") => (String::new(), parts.get(2..)?),
        Some(&"apis") => ((*parts.get(1)?).to_owned(), parts.get(3..)?),
        _ => return None,
    };
    let mut namespace = None;
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        namespace = Some(rest[1].to_owned());
        rest = &rest[2..];
    }
    let (resource, name, sub) = match rest {
        [] => return None,
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub, ..] => (*resource, Some(*name), Some(*sub)),
    };
    let verb = match (method, name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if query.contains("watch=true") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some(Attributes {
        group,
        resource: match sub {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        },
        verb,
        name: name.map(str::to_owned),
        namespace,
    })
}

fn allowed(rules: &[Value], request: &Attributes) -> bool {
    let has = |list: &Value, wanted: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|v| v == "*" || v == wanted))
    };
    rules.iter().any(|rule| {
        has(&rule["apiGroups"], &request.group)
            && has(&rule["resources"], &request.resource)
            && has(&rule["verbs"], request.verb)
            && match rule["resourceNames"].as_array() {
                None => true,
                Some(names) if names.is_empty() => true,
                Some(names) => request
                    .name
                    .as_ref()
                    .is_some_and(|n| names.iter().any(|v| v == n.as_str())),
            }
    })
}

impl Mock {
    /// Authorise every request from now on against `rules` (RBAC PolicyRules, e.g. the
    /// ClusterRole `strata install` generates): a request no rule allows gets 403.
    pub fn enforce_rbac(&self, rules: Vec<Value>) {
        self.state.lock().unwrap().rbac = Some(vec![(None, rules)]);
    }

    /// Also allow what `rules` allow in `namespace` (a RoleBinding's grant).
    pub fn enforce_rbac_in(&self, namespace: &str, rules: Vec<Value>) {
        let mut state = self.state.lock().unwrap();
        state
            .rbac
            .get_or_insert_with(Vec::new)
            .push((Some(namespace.to_owned()), rules));
    }

    /// The requests refused so far, as `verb group/resource [name]`.
    pub fn denied(&self) -> Vec<String> {
        self.state.lock().unwrap().denied.clone()
    }
}

// --- Watches ----------------------------------------------------------------------------------
//
// The API server's watch (docs "Kubernetes API Concepts", "Efficient detection of changes"): a
// list answers with the collection's `metadata.resourceVersion`; a GET of the collection with
// `?watch=true&resourceVersion=V` then streams every change after V, one JSON object a line,
// `{"type": "ADDED" | "MODIFIED" | "DELETED", "object": ...}`, the object as the change left it
// (as it was last, for DELETED). Without a resourceVersion the watch starts with an ADDED event
// per existing object. The label selector applies to each event's object. No bookmarks, and no
// "410 Gone": every change is kept.

/// One write, as a watch reports it.
struct Change {
    /// The resourceVersion the write made.
    version: u64,
    path: String,
    kind: &'static str,
    object: Value,
}

/// The value of `key` in a URL query.
fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

impl Mock {
    /// The event stream of a watch of `collection` from resourceVersion `from`.
    fn watch(
        &self,
        state: &mut State,
        collection: String,
        selector: Vec<(String, String)>,
        from: Option<u64>,
    ) -> Answer {
        let mut initial = Vec::new();
        let from = match from.filter(|v| *v > 0) {
            Some(version) => version,
            None => {
                for (path, object) in &state.objects {
                    if in_collection(&collection, path) && selects(&selector, object) {
                        initial.push(json!({"type": "ADDED", "object": object}));
                    }
                }
                state.version
            }
        };
        let events = futures::stream::unfold(
            (self.clone(), from, initial),
            move |(mock, mut seen, mut pending)| {
                let collection = collection.clone();
                let selector = selector.clone();
                async move {
                    while pending.is_empty() {
                        {
                            let state = mock.state.lock().unwrap();
                            let since = seen;
                            for change in state.changes.iter().filter(|c| c.version > since) {
                                seen = change.version;
                                if in_collection(&collection, &change.path)
                                    && selects(&selector, &change.object)
                                {
                                    pending.push(
                                        json!({"type": change.kind, "object": change.object}),
                                    );
                                }
                            }
                        }
                        if pending.is_empty() {
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                    }
                    let mut lines = Vec::new();
                    for event in pending.drain(..) {
                        serde_json::to_writer(&mut lines, &event).unwrap();
                        lines.push(b'\n');
                    }
                    let frame = http_body::Frame::data(Bytes::from(lines));
                    Some((
                        Ok::<_, std::convert::Infallible>(frame),
                        (mock, seen, pending),
                    ))
                }
            },
        );
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(events).boxed_unsync())
            .unwrap()
    }
}
