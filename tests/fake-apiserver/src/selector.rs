//! Label and field selectors, as the API server parses them.

use serde_json::Value;

#[derive(Debug)]
enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector` (terms joined by commas, all must hold).
#[derive(Debug, Default)]
pub(crate) struct LabelSelector(Vec<LabelTerm>);

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn check_key(key: &str, term: &str) -> Result<String, String> {
    let key = key.trim();
    if key.is_empty() || key.contains(|c: char| c.is_whitespace() || "=!()".contains(c)) {
        return Err(format!("invalid label key in {term:?}"));
    }
    Ok(key.to_string())
}

fn parse_set(rest: &str, term: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised set of values in {term:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e,!f,g in (x,y),h notin (z)`.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in split_terms(s) {
            let parsed = if let Some(key) = term.strip_prefix('!') {
                LabelTerm::NotExists(check_key(key, term)?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelTerm::NotEquals(check_key(k, term)?, v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelTerm::Equals(check_key(k, term)?, v.trim().to_string())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelTerm::Equals(check_key(k, term)?, v.trim().to_string())
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                LabelTerm::NotIn(check_key(k, term)?, parse_set(rest, term)?)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                LabelTerm::In(check_key(k, term)?, parse_set(rest, term)?)
            } else {
                LabelTerm::Exists(check_key(term, term)?)
            };
            terms.push(parsed);
        }
        Ok(LabelSelector(terms))
    }

    /// Whether `labels` (a JSON object, or null) satisfies every term.
    pub(crate) fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|term| match term {
            LabelTerm::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelTerm::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelTerm::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelTerm::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelTerm::Exists(k) => get(k).is_some(),
            LabelTerm::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector`: dotted paths compared with `=`, `==` or `!=`.
#[derive(Debug, Default)]
pub(crate) struct FieldSelector(Vec<(Vec<String>, bool, String)>);

impl FieldSelector {
    /// Parses `metadata.name=x,spec.nodeName!=y`.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in split_terms(s) {
            let (path, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let path = path.trim();
            if path.is_empty() {
                return Err(format!("invalid field selector term {term:?}"));
            }
            terms.push((
                path.split('.').map(str::to_string).collect(),
                equal,
                value.trim().to_string(),
            ));
        }
        Ok(FieldSelector(terms))
    }

    /// Whether `object` satisfies every term (a missing field reads as the empty string).
    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, value)| {
            let mut v = object;
            for segment in path {
                v = v.get(segment).unwrap_or(&Value::Null);
            }
            let actual = match v {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let labels = json!({"app": "web", "tier": "front"});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&labels);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(m("app in (api, web),tier notin (back)"));
        assert!(!m("app in (api)"));
        assert!(m("missing notin (x)"));
        assert!(!LabelSelector::parse("app in (x").is_ok_and(|s| s.matches(&labels)));
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn field_selectors() {
        let pod =
            json!({"metadata": {"name": "a", "namespace": "n"}, "spec": {"nodeName": "node1"}});
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&pod);
        assert!(m("spec.nodeName=node1"));
        assert!(m("metadata.name==a,metadata.namespace!=other"));
        assert!(!m("spec.nodeName=node2"));
        assert!(m("status.phase="));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
