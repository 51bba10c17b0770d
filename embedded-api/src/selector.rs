//! Label and field selectors.

use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Eq,
    NotEq,
    In,
    NotIn,
    Exists,
    NotExists,
    Gt,
    Lt,
}

#[derive(Clone, Debug, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

/// A parsed label selector (all requirements ANDed). The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct LabelSelector {
    reqs: Vec<Requirement>,
    /// A `nil` selector in a PodDisruptionBudget matches nothing.
    match_nothing: bool,
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b'/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
}

/// Split on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced parenthesis in selector {s:?}"));
                }
            }
            ',' if depth == 0 => {
                parts.push(s.get(start..i).unwrap_or_default());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced parenthesis in selector {s:?}"));
    }
    parts.push(s.get(start..).unwrap_or_default());
    Ok(parts)
}

fn parse_set(rest: &str, whole: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("found '{rest}', expected: '(' in selector {whole:?}"))?;
    let mut out = Vec::new();
    for v in inner.split(',') {
        let v = v.trim();
        if !valid_value(v) {
            return Err(format!("invalid label value: {v:?}"));
        }
        out.push(v.to_string());
    }
    Ok(out)
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let mut reqs = Vec::new();
        if s.is_empty() {
            return Ok(Self::default());
        }
        for part in split_top_level(s)? {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("found ',', expected: identifier in selector {s:?}"));
            }
            if let Some(k) = part.strip_prefix('!') {
                let k = k.trim();
                if !valid_key(k) {
                    return Err(format!("invalid label key {k:?}"));
                }
                reqs.push(Requirement {
                    key: k.to_string(),
                    op: Op::NotExists,
                    values: vec![],
                });
                continue;
            }
            let key_end = part
                .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')))
                .unwrap_or(part.len());
            let key = part.get(..key_end).unwrap_or_default();
            if !valid_key(key) {
                return Err(format!("invalid label key in requirement {part:?}"));
            }
            let rest = part.get(key_end..).unwrap_or_default();
            let trimmed = rest.trim_start();
            let (op, values) = if trimmed.is_empty() {
                (Op::Exists, vec![])
            } else if let Some(v) = trimmed.strip_prefix("!=") {
                (Op::NotEq, vec![v.trim().to_string()])
            } else if let Some(v) = trimmed.strip_prefix("==") {
                (Op::Eq, vec![v.trim().to_string()])
            } else if let Some(v) = trimmed.strip_prefix('=') {
                (Op::Eq, vec![v.trim().to_string()])
            } else if let Some(v) = trimmed.strip_prefix('>') {
                (Op::Gt, vec![v.trim().to_string()])
            } else if let Some(v) = trimmed.strip_prefix('<') {
                (Op::Lt, vec![v.trim().to_string()])
            } else if let Some(v) = trimmed.strip_prefix("notin")
                && (v.starts_with('(') || v.starts_with(char::is_whitespace))
                && rest.starts_with(char::is_whitespace)
            {
                (Op::NotIn, parse_set(v, s)?)
            } else if let Some(v) = trimmed.strip_prefix("in")
                && (v.starts_with('(') || v.starts_with(char::is_whitespace))
                && rest.starts_with(char::is_whitespace)
            {
                (Op::In, parse_set(v, s)?)
            } else {
                return Err(format!("unable to parse requirement {part:?}"));
            };
            let eq_like = matches!(op, Op::Eq | Op::NotEq);
            if eq_like && values.iter().any(|v| !valid_value(v)) {
                return Err(format!("invalid label value in requirement {part:?}"));
            }
            let cmp_like = matches!(op, Op::Gt | Op::Lt);
            if cmp_like && values.iter().any(|v| v.parse::<i64>().is_err()) {
                return Err(format!(
                    "for 'Gt', 'Lt' operators, the value must be an integer: {part:?}"
                ));
            }
            reqs.push(Requirement {
                key: key.to_string(),
                op,
                values,
            });
        }
        Ok(LabelSelector {
            reqs,
            match_nothing: false,
        })
    }

    /// Build from a `metav1.LabelSelector` JSON value (`matchLabels` + `matchExpressions`).
    /// `None`/null yields a selector that matches nothing (PDB semantics).
    pub fn from_json(v: Option<&Value>) -> Result<Self, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(LabelSelector {
                reqs: vec![],
                match_nothing: true,
            });
        };
        let mut reqs = Vec::new();
        if let Some(ml) = v.get("matchLabels").and_then(Value::as_object) {
            for (k, val) in ml {
                reqs.push(Requirement {
                    key: k.clone(),
                    op: Op::Eq,
                    values: vec![val.as_str().unwrap_or_default().to_string()],
                });
            }
        }
        if let Some(me) = v.get("matchExpressions").and_then(Value::as_array) {
            for e in me {
                let key = e
                    .get("key")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let values: Vec<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let op = match e.get("operator").and_then(Value::as_str) {
                    Some("In") => Op::In,
                    Some("NotIn") => Op::NotIn,
                    Some("Exists") => Op::Exists,
                    Some("DoesNotExist") => Op::NotExists,
                    other => {
                        return Err(format!("{other:?} is not a valid label selector operator"));
                    }
                };
                reqs.push(Requirement { key, op, values });
            }
        }
        Ok(LabelSelector {
            reqs,
            match_nothing: false,
        })
    }

    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        if self.match_nothing {
            return false;
        }
        self.reqs.iter().all(|r| {
            let val = labels.and_then(|l| l.get(&r.key)).and_then(Value::as_str);
            let first = r.values.first().map(String::as_str).unwrap_or_default();
            match r.op {
                Op::Eq => val == Some(first),
                Op::NotEq => val != Some(first),
                Op::In => val.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::NotIn => !val.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::Exists => val.is_some(),
                Op::NotExists => val.is_none(),
                Op::Gt | Op::Lt => {
                    let (Some(Ok(have)), Ok(want)) =
                        (val.map(str::parse::<i64>), first.parse::<i64>())
                    else {
                        return false;
                    };
                    if r.op == Op::Gt {
                        have > want
                    } else {
                        have < want
                    }
                }
            }
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
struct FieldReq {
    path: Vec<String>,
    raw: String,
    eq: bool,
    value: String,
}

/// A parsed field selector: `path=value`, `path==value`, `path!=value`, ANDed.
/// Any dotted path is accepted (more lenient than the real apiserver, which
/// only supports a per-resource set of fields).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FieldSelector {
    reqs: Vec<FieldReq>,
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let mut reqs = Vec::new();
        if s.is_empty() {
            return Ok(Self::default());
        }
        for part in s.split(',') {
            let part = part.trim();
            let (k, eq, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let k = k.trim();
            if k.is_empty()
                || !k
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
            {
                return Err(format!("invalid field selector key {k:?}"));
            }
            reqs.push(FieldReq {
                path: k.split('.').map(str::to_string).collect(),
                raw: k.to_string(),
                eq,
                value: v.trim().to_string(),
            });
        }
        Ok(FieldSelector { reqs })
    }

    /// The value of `metadata.name` if the selector pins it with `=`.
    pub fn pinned_name(&self) -> Option<&str> {
        self.reqs
            .iter()
            .find(|r| r.eq && r.raw == "metadata.name")
            .map(|r| r.value.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|r| {
            let have = field_value(obj, r);
            (have == r.value) == r.eq
        })
    }
}

fn field_value(obj: &Value, r: &FieldReq) -> String {
    match crate::util::get_path(obj, &r.path) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Null) | None => {
            if r.raw == "spec.unschedulable" {
                "false".to_string()
            } else {
                String::new()
            }
        }
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn label_ops() {
        let l = labels(json!({"app": "web", "tier": "fe", "n": "5"}));
        let m = |s: &str| LabelSelector::parse(s).expect("parse").matches(Some(&l));
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web"));
        assert!(!m("app!=web"));
        assert!(m("missing!=x"));
        assert!(m("app in (web, db)"));
        assert!(!m("app notin (web,db)"));
        assert!(m("missing notin (a)"));
        assert!(m("tier"));
        assert!(!m("!tier"));
        assert!(m("!missing"));
        assert!(m("app=web,tier in (fe),!missing"));
        assert!(!m("app=web,tier=be"));
        assert!(m("n>4"));
        assert!(!m("n<4"));
        assert!(m("example.com/x notin (a),app"));
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("app=we b").is_err());
        assert!(LabelSelector::parse("a,,b").is_err());
        assert!(LabelSelector::parse("a in (b").is_err());
        assert!(LabelSelector::parse("=x").is_err());
        // "index" is a key, not "in" + "dex"
        assert!(
            LabelSelector::parse("index=1")
                .expect("parse")
                .matches(Some(&labels(json!({"index": "1"}))))
        );
    }

    #[test]
    fn label_json() {
        let l = labels(json!({"app": "web"}));
        let s = LabelSelector::from_json(Some(&json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}))).expect("ok");
        assert!(s.matches(Some(&l)));
        assert!(
            !LabelSelector::from_json(None)
                .expect("ok")
                .matches(Some(&l))
        );
        assert!(
            LabelSelector::from_json(Some(&json!({})))
                .expect("ok")
                .matches(Some(&l))
        );
    }

    #[test]
    fn fields() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let m = |s: &str| FieldSelector::parse(s).expect("parse").matches(&pod);
        assert!(m("metadata.name=p"));
        assert!(m("metadata.name==p,metadata.namespace=ns"));
        assert!(!m("spec.nodeName!=n1"));
        assert!(m("spec.nodeName!="));
        assert!(m("status.phase="));
        assert!(m("spec.unschedulable=false"));
        assert!(FieldSelector::parse("nonsense").is_err());
        assert_eq!(
            FieldSelector::parse("metadata.name=x")
                .expect("p")
                .pinned_name(),
            Some("x")
        );
    }
}
