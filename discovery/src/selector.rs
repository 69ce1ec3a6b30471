//! Kubernetes label selectors: parsing the text form and matching label sets.
//!
//! The grammar is the one `kubectl -l` and the API server's `labelSelector` parameter accept
//! (Kubernetes API conventions, "Label selectors"): comma-separated requirements, each one of
//! `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (v1,v2)` or
//! `key notin (v1,v2)`. All requirements must hold; the empty selector matches everything.
//! `!=` and `notin` also match objects that lack the key.

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::{Error, Result};

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key` — the label is present.
    Exists(String),
    /// `!key` — the label is absent.
    DoesNotExist(String),
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value` — absent or different.
    NotEquals(String, String),
    /// `key in (values)` — present with one of the values.
    In(String, Vec<String>),
    /// `key notin (values)` — absent or none of the values.
    NotIn(String, Vec<String>),
}

impl Requirement {
    /// Whether a label set satisfies this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
            Requirement::Equals(key, value) => labels.get(key) == Some(value),
            Requirement::NotEquals(key, value) => labels.get(key) != Some(value),
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
        }
    }
}

/// A parsed label selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The requirements, all of which must hold.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether a label set satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether optional labels (as `ObjectMeta` holds them) satisfy the selector.
    pub fn matches_opt(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.matches(labels.unwrap_or(&EMPTY))
    }

    /// The selector of a workload or Service written as `matchLabels`/`matchExpressions`
    /// (`LabelSelector` in meta/v1) or as a plain map (Service `spec.selector`).
    /// Returns `None` when the JSON is neither.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        let map = value.as_object()?;
        let structured = map.contains_key("matchLabels") || map.contains_key("matchExpressions");
        let mut requirements = Vec::new();
        let equalities = if structured {
            map.get("matchLabels").and_then(|m| m.as_object())
        } else {
            Some(map)
        };
        for (key, value) in equalities.into_iter().flatten() {
            requirements.push(Requirement::Equals(key.clone(), value.as_str()?.to_owned()));
        }
        for expr in map
            .get("matchExpressions")
            .and_then(|e| e.as_array())
            .into_iter()
            .flatten()
            .filter(|_| structured)
        {
            let key = expr.get("key")?.as_str()?.to_owned();
            let values: Vec<String> = expr
                .get("values")
                .and_then(|v| v.as_array())
                .map(|vs| {
                    vs.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            requirements.push(match expr.get("operator")?.as_str()? {
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                _ => return None,
            });
        }
        Some(Selector { requirements })
    }
}

impl FromStr for Selector {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Parser { text, pos: 0 }.selector()
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::DoesNotExist(k) => write!(f, "!{k}")?,
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
            }
        }
        Ok(())
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, reason: &'static str) -> Error {
        Error::Selector {
            selector: self.text.to_owned(),
            position: self.pos,
            reason,
        }
    }

    fn rest(&self) -> &str {
        self.text.get(self.pos..).unwrap_or("")
    }

    fn skip_spaces(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    /// A label key or value: letters, digits, `-`, `_`, `.`, and `/` in keys.
    fn word(&mut self, allow_slash: bool) -> &str {
        let start = self.pos;
        let len = self
            .rest()
            .find(|c: char| {
                !(c.is_ascii_alphanumeric()
                    || matches!(c, '-' | '_' | '.')
                    || (allow_slash && c == '/'))
            })
            .unwrap_or(self.rest().len());
        self.pos += len;
        self.text.get(start..self.pos).unwrap_or("")
    }

    fn key(&mut self) -> Result<String> {
        self.skip_spaces();
        let start = self.pos;
        let key = self.word(true).to_owned();
        if key.is_empty() {
            return Err(self.error("expected a label key"));
        }
        let (prefix, name) = key.rsplit_once('/').unwrap_or(("", &key));
        let edge_ok = |s: &str| {
            s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        };
        if name.len() > 63
            || !edge_ok(name)
            || prefix.len() > 253
            || prefix.contains('/')
            || (key.contains('/') && !edge_ok(prefix))
        {
            self.pos = start;
            return Err(self.error("label keys are [prefix/]name, name at most 63 alphanumeric, '-', '_' or '.' characters"));
        }
        Ok(key)
    }

    fn value(&mut self) -> Result<String> {
        self.skip_spaces();
        let value = self.word(false).to_owned();
        if value.len() > 63 {
            return Err(self.error("label values are at most 63 characters"));
        }
        Ok(value)
    }

    fn values(&mut self) -> Result<Vec<String>> {
        self.skip_spaces();
        if !self.eat("(") {
            return Err(self.error("expected '(' after in/notin"));
        }
        let mut values = Vec::new();
        loop {
            values.push(self.value()?);
            self.skip_spaces();
            if self.eat(")") {
                return Ok(values);
            }
            if !self.eat(",") {
                return Err(self.error("expected ',' or ')' in value set"));
            }
        }
    }

    fn requirement(&mut self) -> Result<Requirement> {
        self.skip_spaces();
        if self.eat("!") {
            return Ok(Requirement::DoesNotExist(self.key()?));
        }
        let key = self.key()?;
        let before_space = self.pos;
        self.skip_spaces();
        if self.eat("!=") {
            return Ok(Requirement::NotEquals(key, self.value()?));
        }
        if self.eat("==") || self.eat("=") {
            return Ok(Requirement::Equals(key, self.value()?));
        }
        let spaced = self.pos > before_space;
        let word_start = self.pos;
        match self.word(false) {
            "in" if spaced => Ok(Requirement::In(key, self.values()?)),
            "notin" if spaced => Ok(Requirement::NotIn(key, self.values()?)),
            "" => Ok(Requirement::Exists(key)),
            _ => {
                self.pos = word_start;
                Err(self.error("expected '=', '==', '!=', 'in', 'notin', ',' or end"))
            }
        }
    }

    fn selector(mut self) -> Result<Selector> {
        let mut requirements = Vec::new();
        self.skip_spaces();
        if self.rest().is_empty() {
            return Ok(Selector { requirements });
        }
        loop {
            requirements.push(self.requirement()?);
            self.skip_spaces();
            if self.rest().is_empty() {
                return Ok(Selector { requirements });
            }
            if !self.eat(",") {
                return Err(self.error("expected ',' between requirements"));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(text: &str) -> Selector {
        text.parse().unwrap()
    }

    #[test]
    fn parses_every_operator() {
        let s =
            sel("app=db, tier==backend,env!=dev,zone in (a, b),arch notin (arm),release,!canary");
        assert_eq!(
            s.requirements(),
            &[
                Requirement::Equals("app".into(), "db".into()),
                Requirement::Equals("tier".into(), "backend".into()),
                Requirement::NotEquals("env".into(), "dev".into()),
                Requirement::In("zone".into(), vec!["a".into(), "b".into()]),
                Requirement::NotIn("arch".into(), vec!["arm".into()]),
                Requirement::Exists("release".into()),
                Requirement::DoesNotExist("canary".into()),
            ]
        );
    }

    #[test]
    fn matching_follows_kubernetes_semantics() {
        let l = labels(&[("app.kubernetes.io/name", "postgresql"), ("env", "prod")]);
        assert!(sel("app.kubernetes.io/name=postgresql").matches(&l));
        assert!(sel("missing!=x").matches(&l), "!= matches absent keys");
        assert!(
            sel("missing notin (x)").matches(&l),
            "notin matches absent keys"
        );
        assert!(!sel("missing in (x)").matches(&l), "in requires the key");
        assert!(!sel("!env").matches(&l));
        assert!(sel("env in (prod,staging),!canary").matches(&l));
        assert!(!sel("env in (staging)").matches(&l));
        assert!(sel("").matches(&l), "the empty selector matches everything");
        assert!(sel("env=prod,app.kubernetes.io/name").matches(&l));
    }

    #[test]
    fn empty_value_matches_empty_label() {
        assert!(sel("flag=").matches(&labels(&[("flag", "")])));
        assert!(!sel("flag=").matches(&labels(&[("flag", "x")])));
    }

    #[test]
    fn rejects_malformed_selectors_with_position() {
        for (text, pos) in [
            ("app=db,", 7),
            ("app in a", 7),
            ("app in (a", 9),
            ("=x", 0),
            ("app ~ x", 4),
            ("-bad=x", 0),
        ] {
            match text.parse::<Selector>() {
                Err(Error::Selector { position, .. }) => assert_eq!(position, pos, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn display_round_trips() {
        let s = sel("a=1,b!=2,c in (x,y),d notin (z),e,!f");
        assert_eq!(s.to_string().parse::<Selector>().unwrap(), s);
    }

    #[test]
    fn structured_selector_from_json() {
        let s = Selector::from_json(&serde_json::json!({
            "matchLabels": {"app": "db"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]
        }))
        .unwrap();
        assert!(s.matches(&labels(&[("app", "db"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[("app", "db")])));
        let plain = Selector::from_json(&serde_json::json!({"app": "db"})).unwrap();
        assert_eq!(
            plain.requirements(),
            &[Requirement::Equals("app".into(), "db".into())]
        );
    }
}
