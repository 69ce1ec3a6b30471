//! Where objects come from: a live cluster or an offline dump, behind one trait.

mod dump;
mod live;

use std::future::Future;

use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};

use crate::Result;

pub use dump::DumpSource;
pub use live::LiveSource;

/// A kind of resource a source can list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKind {
    /// API group, empty for core.
    pub group: String,
    /// The version objects are read through.
    pub version: String,
    /// Kind, e.g. `Deployment`.
    pub kind: String,
    /// The URL path segment, e.g. `deployments`.
    pub plural: String,
    /// Whether objects of this kind live in namespaces.
    pub namespaced: bool,
}

impl ResourceKind {
    /// A kind whose plural is guessed the way kube-rs guesses it (fine for built-in kinds;
    /// custom resources should name theirs).
    pub fn guess(group: &str, version: &str, kind: &str, namespaced: bool) -> Self {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        ResourceKind {
            group: group.to_owned(),
            version: version.to_owned(),
            kind: kind.to_owned(),
            plural: ar.plural,
            namespaced,
        }
    }

    /// `group/version` or `version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The kube-rs description used to build a dynamic `Api`.
    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&self.group, &self.version, &self.kind),
            &self.plural,
        )
    }
}

/// A source of Kubernetes objects.
///
/// Both methods are async because a live cluster answers over the network; the offline
/// [`DumpSource`] answers at once. Every object returned carries `apiVersion` and `kind`.
pub trait ObjectSource {
    /// Every kind the caller may list.
    fn kinds(&self) -> impl Future<Output = Result<Vec<ResourceKind>>> + Send;

    /// The objects of one kind, in one namespace or (for `None`) across the cluster.
    fn list(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
    ) -> impl Future<Output = Result<Vec<DynamicObject>>> + Send;
}
