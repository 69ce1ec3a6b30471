//! Restore: order, transforms, and applying to a cluster.

mod apply;
mod order;
mod transform;

use serde_json::Value;

pub use apply::{ApplyOptions, ApplyReport, ExistingPolicy, apply};
pub use order::{DEFAULT_ORDER, OrderEntry, RestoreOrder};
pub use transform::{TargetedPatch, Transforms};

use crate::object::ObjectRef;
use crate::{Error, Result};

/// Objects ready to apply, transformed and in restore order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestorePlan {
    /// The objects, first to restore first.
    pub objects: Vec<Value>,
}

impl RestorePlan {
    /// Transform the (sanitized) objects, then order them.
    pub fn new(objects: Vec<Value>, order: &RestoreOrder, transforms: &Transforms) -> Result<Self> {
        let mut objects = objects
            .into_iter()
            .map(|o| transforms.apply(o))
            .collect::<Result<Vec<_>>>()?;
        order.sort(&mut objects);
        Ok(RestorePlan { objects })
    }

    /// The objects' references, in order.
    pub fn references(&self) -> Result<Vec<ObjectRef>> {
        self.objects.iter().map(reference).collect()
    }
}

/// The reference of a JSON object.
pub(crate) fn reference(object: &Value) -> Result<ObjectRef> {
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let what = || text("/metadata/name").unwrap_or_else(|| "?".to_owned());
    Ok(ObjectRef {
        api_version: text("/apiVersion").ok_or_else(|| Error::MissingField {
            what: what(),
            field: "apiVersion",
        })?,
        kind: text("/kind").ok_or_else(|| Error::MissingField {
            what: what(),
            field: "kind",
        })?,
        namespace: text("/metadata/namespace"),
        name: text("/metadata/name").ok_or_else(|| Error::MissingField {
            what: what(),
            field: "metadata.name",
        })?,
    })
}
