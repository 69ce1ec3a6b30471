//! A live cluster through kube-rs, with API discovery.

use std::future::Future;

use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, TypeMeta};
use kube::discovery::{Discovery, Scope, verbs};

use super::{ObjectSource, ResourceKind};
use crate::{Error, Result};

/// Page size for list calls.
const PAGE: u32 = 500;

/// Objects read from a cluster's API server.
///
/// [`ObjectSource::kinds`] runs API discovery and returns the preferred version of every
/// resource that supports `list` (subresources excluded), so custom resources are found too.
#[derive(Clone)]
pub struct LiveSource {
    client: Client,
}

impl LiveSource {
    /// A source over this client.
    pub fn new(client: Client) -> Self {
        LiveSource { client }
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl ObjectSource for LiveSource {
    fn kinds(&self) -> impl Future<Output = Result<Vec<ResourceKind>>> + Send {
        let client = self.client.clone();
        async move {
            let discovery = Discovery::new(client)
                .run()
                .await
                .map_err(|e| Error::kube("discovering API resources", e))?;
            let mut kinds = Vec::new();
            for group in discovery.groups() {
                for (ar, caps) in group.recommended_resources() {
                    if !caps.supports_operation(verbs::LIST) {
                        continue;
                    }
                    kinds.push(ResourceKind {
                        group: ar.group,
                        version: ar.version,
                        kind: ar.kind,
                        plural: ar.plural,
                        namespaced: caps.scope == Scope::Namespaced,
                    });
                }
            }
            kinds.sort();
            Ok(kinds)
        }
    }

    fn list(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
    ) -> impl Future<Output = Result<Vec<DynamicObject>>> + Send {
        let ar = kind.api_resource();
        let api: Api<DynamicObject> = match namespace {
            Some(ns) if kind.namespaced => Api::namespaced_with(self.client.clone(), ns, &ar),
            _ => Api::all_with(self.client.clone(), &ar),
        };
        let types = TypeMeta {
            api_version: kind.api_version(),
            kind: kind.kind.clone(),
        };
        let what = format!(
            "listing {} {}",
            ar.plural,
            namespace.unwrap_or("(all namespaces)")
        );
        async move {
            let mut objects = Vec::new();
            let mut params = ListParams::default().limit(PAGE);
            loop {
                let page = api
                    .list(&params)
                    .await
                    .map_err(|e| Error::kube(what.clone(), e))?;
                for mut object in page.items {
                    // The API server omits apiVersion/kind on the items of typed lists.
                    object.types = Some(types.clone());
                    objects.push(object);
                }
                match page.metadata.continue_.filter(|c| !c.is_empty()) {
                    Some(token) => params = params.continue_token(&token),
                    None => return Ok(objects),
                }
            }
        }
    }
}
