//! YAML streams (several documents separated by `---`), as Helm manifests and dump folders hold them.

use crate::{Error, Result};

/// The non-empty documents of a YAML stream, as JSON values.
///
/// Documents that are empty or hold only comments (Helm renders those for templates whose
/// conditions are false) are skipped.
pub fn documents(text: &str, what: &str) -> Result<Vec<serde_json::Value>> {
    let docs: Vec<Option<serde_json::Value>> =
        serde_saphyr::from_str_multiple(text).map_err(|source| Error::Yaml {
            what: what.to_owned(),
            source: Box::new(source),
        })?;
    Ok(docs
        .into_iter()
        .flatten()
        .filter(|d| !d.is_null())
        .collect())
}

/// One object as a YAML document.
pub fn to_yaml(value: &serde_json::Value, what: &str) -> Result<String> {
    serde_saphyr::to_string(value).map_err(|source| Error::YamlWrite {
        what: what.to_owned(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn skips_empty_and_comment_only_documents() {
        let text = "---\n# Source: db/templates/a.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n# Source: db/templates/empty.yaml\n---\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: b\n";
        let docs = documents(text, "test").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["kind"], "Service");
    }

    #[test]
    fn yaml_round_trips_json_values() {
        let value = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
            "data": {"a": "1", "multi": "line1\nline2\n", "yes": "yes", "num": "007"}});
        let text = to_yaml(&value, "x").unwrap();
        assert_eq!(documents(&text, "x").unwrap(), vec![value]);
    }
}
