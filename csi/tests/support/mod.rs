//! A tiny in-memory API server for the client helpers: create (`POST`, 409 when the name is
//! taken), get (404 when absent), list of a collection, JSON merge `PATCH` (RFC 7386; 404 when
//! absent) and delete of objects by URL path, plugged into
//! `kube::Client::new` as a tower service. Tests may script the successive states a `GET` returns,
//! standing in for the snapshot controller updating a status, and may answer `POST`s to a path
//! with a function of the body (subresources such as a service account's `token`).

// Each test binary uses its own subset of the helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    scripted: BTreeMap<String, VecDeque<Value>>,
    requests: Vec<String>,
    answers: BTreeMap<String, Answer>,
}

type Answer = Arc<dyn Fn(&Value) -> Value + Send + Sync>;

#[derive(Clone, Default)]
pub struct Mock {
    state: Arc<Mutex<State>>,
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn failure(code: StatusCode, reason: &str) -> Response<Body> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": reason, "message": reason, "code": code.as_u16()}),
    )
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

    /// Store `object` at `path` (the object's URL without query).
    pub fn put(&self, path: &str, object: Value) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(path.to_owned(), object);
    }

    /// Successive `GET`s of `path` return these states; the last one stays.
    pub fn script(&self, path: &str, states: Vec<Value>) {
        self.state
            .lock()
            .unwrap()
            .scripted
            .insert(path.to_owned(), states.into());
    }

    /// `POST`s to `path` are answered with `answer(body)`, status 201.
    pub fn answer(&self, path: &str, answer: impl Fn(&Value) -> Value + Send + Sync + 'static) {
        self.state
            .lock()
            .unwrap()
            .answers
            .insert(path.to_owned(), Arc::new(answer));
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// `"METHOD path"` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let mut state = self.state.lock().unwrap();
        state.requests.push(format!("{method} {path}"));
        match method.as_str() {
            "POST" if state.answers.contains_key(&path) => {
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                respond(StatusCode::CREATED, &state.answers[&path](&body))
            }
            "POST" => {
                let mut object: Value = serde_json::from_slice(&bytes).unwrap();
                let name = object["metadata"]["name"].as_str().unwrap().to_owned();
                let at = format!("{path}/{name}");
                if state.objects.contains_key(&at) {
                    return failure(StatusCode::CONFLICT, "AlreadyExists");
                }
                object["metadata"]["uid"] = json!(format!("uid-{}", state.objects.len()));
                state.objects.insert(at, object.clone());
                respond(StatusCode::CREATED, &object)
            }
            "GET" => {
                if let Some(script) = state.scripted.get_mut(&path) {
                    let next = if script.len() > 1 {
                        script.pop_front()
                    } else {
                        script.front().cloned()
                    };
                    if let Some(object) = next {
                        return respond(StatusCode::OK, &object);
                    }
                }
                if let Some(object) = state.objects.get(&path) {
                    return respond(StatusCode::OK, object);
                }
                let prefix = format!("{path}/");
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|(at, _)| {
                        at.strip_prefix(&prefix)
                            .is_some_and(|rest| !rest.contains('/'))
                    })
                    .map(|(_, object)| object.clone())
                    .collect();
                if items.is_empty() {
                    return failure(StatusCode::NOT_FOUND, "NotFound");
                }
                respond(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}),
                )
            }
            "PATCH" => {
                let patch: Value = serde_json::from_slice(&bytes).unwrap();
                match state.objects.get_mut(&path) {
                    Some(object) => {
                        json_patch::merge(object, &patch);
                        respond(StatusCode::OK, object)
                    }
                    None => failure(StatusCode::NOT_FOUND, "NotFound"),
                }
            }
            "DELETE" => match state.objects.remove(&path) {
                Some(object) => respond(StatusCode::OK, &object),
                None => failure(StatusCode::NOT_FOUND, "NotFound"),
            },
            _ => failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
        }
    }
}
