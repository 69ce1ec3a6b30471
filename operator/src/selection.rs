//! The application a Backup selects, in the shape of strata-discovery's [`AppSpec`].
//!
//! The discovery types hold parsed selectors and are not serializable, so the resource mirrors
//! them with plain fields and [`ApplicationSelection::app_spec`] parses them; a bad selector is
//! reported when the Backup is reconciled, with the position the parser gives.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use strata_discovery::{AppSpec, OperatorRef, Selector};

/// Which objects and volumes of the Backup's namespace make up the application. The fields
/// combine: the application is the union of what each selects, plus what those objects need.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationSelection {
    /// Helm release names (read from Helm's storage Secrets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub helm_releases: Vec<String>,
    /// Custom resources reconciled by operators: the instance, its CRD and what it owns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<OperatorSelection>,
    /// Label selectors in `kubectl -l` syntax, e.g. `app.kubernetes.io/name=db,tier in (a,b)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
    /// Also take the operators themselves (Deployment, RBAC, CRDs, OLM objects).
    #[serde(default)]
    pub include_operators: bool,
}

/// A custom resource managed by an operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OperatorSelection {
    /// API group of the custom resource, e.g. `postgresql.cnpg.io`.
    #[schemars(length(min = 1))]
    pub group: String,
    /// Its kind, e.g. `Cluster`.
    #[schemars(length(min = 1))]
    pub kind: String,
    /// Its name in the Backup's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
}

impl ApplicationSelection {
    /// Whether nothing is selected (the Backup would hold only the Namespace).
    pub fn is_empty(&self) -> bool {
        self.helm_releases.is_empty() && self.operators.is_empty() && self.selectors.is_empty()
    }

    /// The discovery spec for `namespace`, with every selector parsed.
    pub fn app_spec(&self, namespace: &str) -> strata_discovery::Result<AppSpec> {
        Ok(AppSpec {
            namespace: namespace.to_owned(),
            helm_releases: self.helm_releases.clone(),
            operators: self
                .operators
                .iter()
                .map(|o| OperatorRef {
                    group: o.group.clone(),
                    kind: o.kind.clone(),
                    name: o.name.clone(),
                })
                .collect(),
            selectors: self
                .selectors
                .iter()
                .map(|s| s.parse::<Selector>())
                .collect::<Result<_, _>>()?,
            include_operators: self.include_operators,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_parsed_and_errors_keep_their_position() {
        let selection = ApplicationSelection {
            helm_releases: vec!["db".into()],
            selectors: vec!["app=db,tier in (a,b)".into()],
            ..Default::default()
        };
        let spec = selection.app_spec("shop").unwrap();
        assert_eq!(spec.namespace, "shop");
        assert_eq!(spec.selectors[0].requirements().len(), 2);
        let bad = ApplicationSelection {
            selectors: vec!["app in (a".into()],
            ..Default::default()
        };
        assert!(matches!(
            bad.app_spec("shop"),
            Err(strata_discovery::Error::Selector { position: 9, .. })
        ));
    }
}
