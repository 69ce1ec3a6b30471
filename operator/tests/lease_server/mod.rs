//! A small in-memory API server for Leases (`coordination.k8s.io/v1`), plugged into
//! `kube::Client::new` as a tower service. It keeps the API server's concurrency rules that
//! leader election depends on (Kubernetes API concepts, "Resource versions" and "Conflicts";
//! API conventions, "Concurrency Control and Consistency"):
//!
//! - `POST` creates, 409 `AlreadyExists` when the name is taken;
//! - `GET` reads, 404 when absent;
//! - `PUT` replaces; a body whose `metadata.resourceVersion` is not the stored one gets 409
//!   `Conflict` and changes nothing (a body without one is an unconditional update);
//! - every write stores a new `resourceVersion`.
//!
//! Faults: refuse every write with 500, let another writer change the Lease just before the
//! next `PUT` (so that `PUT` carries a stale version), and hold `GET`s until several have
//! arrived (so that candidates read the same version and race).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::core::Status;
use serde_json::{Value, json};
use tokio::sync::Barrier;

const PREFIX: &str = "/apis/coordination.k8s.io/v1/namespaces/";

type Edit = Box<dyn FnOnce(&mut Value) + Send>;

#[derive(Default)]
struct State {
    /// By `namespace/name`.
    leases: BTreeMap<String, Value>,
    version: u64,
    refuse_writes: bool,
    before_next_put: Option<Edit>,
    get_barrier: Option<Arc<Barrier>>,
    conflicts: usize,
}

impl State {
    fn store(&mut self, key: &str, mut lease: Value) -> Value {
        self.version += 1;
        lease["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.leases.insert(key.to_owned(), lease.clone());
        lease
    }
}

/// The server; clones share it.
#[derive(Clone, Default)]
pub struct LeaseServer {
    state: Arc<Mutex<State>>,
}

/// A JSON answer; failures carry a `Status` as the API server's do.
fn json_response(code: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    let mut response = Response::new(Body::from(serde_json::to_vec(body).unwrap()));
    *response.status_mut() = code;
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn failure(code: StatusCode, reason: &str) -> Response<Body> {
    json_response(
        code,
        &Status::failure(reason, reason).with_code(code.as_u16()),
    )
}

impl LeaseServer {
    /// A client of this server.
    pub fn client(&self) -> kube::Client {
        let server = self.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let server = server.clone();
            async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// The stored Lease `namespace/name`.
    pub fn lease(&self, key: &str) -> Option<Value> {
        self.state.lock().unwrap().leases.get(key).cloned()
    }

    /// Store `lease` as `namespace/name` (as another writer would), with a new version.
    pub fn put(&self, key: &str, lease: Value) {
        self.state.lock().unwrap().store(key, lease);
    }

    /// Answer every `POST` and `PUT` with 500 from now on (or no longer).
    pub fn refuse_writes(&self, refuse: bool) {
        self.state.lock().unwrap().refuse_writes = refuse;
    }

    /// Just before handling the next `PUT`, another writer applies `edit` to the stored Lease.
    pub fn before_next_put(&self, edit: impl FnOnce(&mut Value) + Send + 'static) {
        self.state.lock().unwrap().before_next_put = Some(Box::new(edit));
    }

    /// Answer each `GET` only once `readers` of them have read the Lease.
    pub fn hold_gets_until(&self, readers: usize) {
        self.state.lock().unwrap().get_barrier = Some(Arc::new(Barrier::new(readers)));
    }

    /// How many writes were refused with 409.
    pub fn conflicts(&self) -> usize {
        self.state.lock().unwrap().conflicts
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let Some(rest) = path.strip_prefix(PREFIX) else {
            return failure(StatusCode::NOT_FOUND, "NotFound");
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (namespace, name) = match parts.as_slice() {
            [ns, "leases"] => (ns.to_string(), None),
            [ns, "leases", name] => (ns.to_string(), Some(name.to_string())),
            _ => return failure(StatusCode::NOT_FOUND, "NotFound"),
        };
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if let (&Method::GET, Some(name)) = (&method, &name) {
            // Read first, then wait for the other readers: all of them answer the same.
            let (read, barrier) = {
                let state = self.state.lock().unwrap();
                let read = match state.leases.get(&format!("{namespace}/{name}")) {
                    Some(lease) => json_response(StatusCode::OK, lease),
                    None => failure(StatusCode::NOT_FOUND, "NotFound"),
                };
                (read, state.get_barrier.clone())
            };
            if let Some(barrier) = barrier {
                barrier.wait().await;
            }
            return read;
        }
        let mut state = self.state.lock().unwrap();
        match (method, name) {
            (Method::POST, None) => {
                if state.refuse_writes {
                    return failure(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
                }
                let Some(name) = body["metadata"]["name"].as_str() else {
                    return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
                };
                let key = format!("{namespace}/{name}");
                if state.leases.contains_key(&key) {
                    state.conflicts += 1;
                    return failure(StatusCode::CONFLICT, "AlreadyExists");
                }
                let created = state.store(&key, body);
                json_response(StatusCode::CREATED, &created)
            }
            (Method::PUT, Some(name)) => {
                if state.refuse_writes {
                    return failure(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
                }
                let key = format!("{namespace}/{name}");
                if let Some(edit) = state.before_next_put.take()
                    && let Some(mut lease) = state.leases.get(&key).cloned()
                {
                    edit(&mut lease);
                    state.store(&key, lease);
                }
                let Some(stored) = state.leases.get(&key) else {
                    return failure(StatusCode::NOT_FOUND, "NotFound");
                };
                let sent = &body["metadata"]["resourceVersion"];
                if !sent.is_null() && *sent != stored["metadata"]["resourceVersion"] {
                    state.conflicts += 1;
                    return failure(StatusCode::CONFLICT, "Conflict");
                }
                let replaced = state.store(&key, body);
                json_response(StatusCode::OK, &replaced)
            }
            _ => failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
        }
    }
}
