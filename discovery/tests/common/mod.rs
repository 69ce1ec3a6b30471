//! Shared test helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod mock;

use std::path::PathBuf;

use strata_discovery::{AppSpec, Application, DumpSource, Inventory, ObjectRef, discover};

pub fn sample_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/data/sample-app.json")
}

pub fn sample_source() -> DumpSource {
    DumpSource::from_path(&sample_path()).unwrap()
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The sample dump's inventory over `shop` and `operators`.
pub fn sample_inventory() -> Inventory {
    let source = sample_source();
    block_on(Inventory::collect(
        &source,
        &["shop".to_owned(), "operators".to_owned()],
    ))
    .unwrap()
}

pub fn discover_sample(spec: AppSpec) -> Application {
    discover(&sample_inventory(), &spec).unwrap()
}

/// `Kind/name` (with `ns/` for namespaced objects) of every object, sorted.
pub fn names(app: &Application) -> Vec<String> {
    let mut v: Vec<String> = app
        .objects
        .iter()
        .map(|o| short(&ObjectRef::of(o).unwrap()))
        .collect();
    v.sort();
    v
}

pub fn short(r: &ObjectRef) -> String {
    match &r.namespace {
        Some(ns) => format!("{}/{ns}/{}", r.kind, r.name),
        None => format!("{}/{}", r.kind, r.name),
    }
}

/// [`sample_inventory`] for async tests.
pub async fn sample_inventory_async() -> Inventory {
    Inventory::collect(
        &sample_source(),
        &["shop".to_owned(), "operators".to_owned()],
    )
    .await
    .unwrap()
}
