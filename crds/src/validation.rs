//! What a valid NodeClass or NodeSet is, said twice from one place: as schema pieces the API
//! server enforces (patterns and bounded CEL rules in the generated CRD) and as Rust checks the
//! controllers run on every object they read (clusters keep objects created under older, looser
//! schemas, and a schema can always miss a case).
//!
//! Every pattern here is an RE2/ECMA regular expression the API server runs; the Rust checks
//! accept exactly the same strings (a test runs both over the same table). Patterns are
//! preferred to CEL: the API server names the field in a pattern failure by itself and a
//! pattern costs nothing against the CEL budget. CEL is used only for map keys, which no
//! structural schema keyword reaches, and always on maps bounded by `maxProperties`.
//!
//! [`decode`] turns the JSON of an object into its type without ever failing more than that
//! one object, and names the field that did not decode.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::json;

/// A label value: at most 63 characters, alphanumeric at both ends, `-_.` inside.
pub const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
/// A qualified name (label, annotation and taint keys): an optional DNS subdomain prefix and
/// `/`, then a name of at most 63 characters, alphanumeric at both ends.
/// Written without backslashes, so it can stand in a CEL string literal unchanged.
pub const QUALIFIED_NAME_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A DNS-1123 subdomain (Node and NodeClass names, Secret names).
pub const DNS1123_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A DNS-1123 label (namespace names).
pub const DNS1123_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A non-negative Go duration (`0`, `90s`, `1h30m`, `1.5h`). Each number has at most nine
/// digits before the point, so no duration overflows.
pub const DURATION_PATTERN: &str = r"^(0|(0*[0-9]{1,9}(\.[0-9]+)?(ns|us|ms|s|m|h))+)$";
/// A Go duration greater than zero: as [`DURATION_PATTERN`], with at least one non-zero digit.
pub const POSITIVE_DURATION_PATTERN: &str = r"^(0*[0-9]{1,9}(\.[0-9]+)?(ns|us|ms|s|m|h))*(0*[1-9][0-9]{0,8}(\.[0-9]+)?|0*[0-9]{1,9}\.[0-9]*[1-9][0-9]*)(ns|us|ms|s|m|h)(0*[0-9]{1,9}(\.[0-9]+)?(ns|us|ms|s|m|h))*$";
/// A non-negative Kubernetes resource quantity (`4`, `500m`, `16Gi`, `1e3`).
pub const QUANTITY_PATTERN: &str = r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";
/// A percentage as `maxUnhealthy` takes it (`50%`).
pub const PERCENT_PATTERN: &str = r"^[0-9]{1,6}%$";
/// An absolute http(s) URL.
pub const URL_PATTERN: &str = r"^https?://[^\s/?#]+([/?#]\S*)?$";
/// An environment variable name, as Kubernetes accepts them.
pub const ENV_NAME_PATTERN: &str = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$";
/// An API server endpoint: `host:port` or `https://host:port`.
pub const ENDPOINT_PATTERN: &str = r"^(https://)?[^\s/]+:[0-9]{1,5}$";

/// A Google Cloud project ID: 6 to 30 lowercase letters, digits and `-`, starting with a letter
/// and not ending with `-`, optionally after a `domain:` prefix (`example.com:my-project`).
pub const GCP_PROJECT_PATTERN: &str =
    r"^([a-z0-9][-a-z0-9.]{0,61}[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$";
/// A Google Cloud region (`europe-west1`) or zone (`europe-west1-b`).
pub const GCP_LOCATION_PATTERN: &str = r"^[a-z]+-[a-z]+[0-9]+(-[a-z])?$";
/// A GKE cluster or node pool name: at most 40 lowercase letters, digits and `-`, starting
/// with a letter and ending with a letter or digit.
pub const GKE_NAME_PATTERN: &str = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$";

/// The longest duration string accepted (bounds the sum of its parts).
pub const DURATION_MAX_LENGTH: usize = 64;

/// One field that is not valid, with what is wrong with it. The message never contains the
/// field's value when the value could be large or secret; it says what the value must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, e.g. `spec.provider.simulated.bootDelay`.
    pub field: String,
    /// What is wrong, e.g. `must be a duration such as 30s or 1h30m`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why an object's spec cannot be used: every invalid field found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec {
    /// The invalid fields, in the order they were found (never empty).
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl InvalidSpec {
    /// The condition and event reason.
    pub fn reason(&self) -> &'static str {
        "InvalidSpec"
    }

    /// The first invalid field.
    pub fn field(&self) -> &str {
        self.errors.first().map_or("spec", |e| e.field.as_str())
    }

    /// One invalid field.
    pub fn one(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            errors: vec![FieldError {
                field: field.into(),
                message: message.into(),
            }],
        }
    }
}

/// Collects field errors while a spec is checked.
#[derive(Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    pub(crate) fn check(&mut self, field: impl fmt::Display, result: Result<(), String>) {
        if let Err(message) = result {
            self.0.push(FieldError {
                field: field.to_string(),
                message,
            });
        }
    }

    pub(crate) fn finish(self) -> Result<(), InvalidSpec> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(InvalidSpec { errors: self.0 })
        }
    }
}

/// Decodes one object's JSON into its type. A value the type cannot hold fails this object
/// only, naming the field (`spec.provider.simulated.bootDelay: invalid duration ...`); the
/// message is serde's, which describes the value's problem without echoing whole objects.
pub fn decode<K: DeserializeOwned>(value: serde_json::Value) -> Result<K, InvalidSpec> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            path
        };
        InvalidSpec::one(field, e.into_inner().to_string())
    })
}

fn lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Checks a DNS-1123 label (at most 63 characters).
pub fn check_dns1123_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| lower_alnum(c) || c == '-')
        && s.starts_with(lower_alnum)
        && s.ends_with(lower_alnum);
    ok.then_some(()).ok_or_else(|| {
        "must be a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit".to_string()
    })
}

/// The longest simulated group name: it is part of every Node name of the group
/// (`sim-<group>-<12 hex digits>`), which must stay a DNS-1123 label.
pub const GROUP_NAME_MAX: usize = 40;

/// Checks a group name: a DNS-1123 label of at most [`GROUP_NAME_MAX`] characters.
pub fn check_group_name(s: &str) -> Result<(), String> {
    check_dns1123_label(s)?;
    if s.len() > GROUP_NAME_MAX {
        return Err(format!(
            "must be at most {GROUP_NAME_MAX} characters (it is part of every Node name of the group)"
        ));
    }
    Ok(())
}

/// Checks a DNS-1123 subdomain (at most 253 characters).
pub fn check_dns1123_subdomain(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.chars().all(|c| lower_alnum(c) || c == '-')
                && part.starts_with(lower_alnum)
                && part.ends_with(lower_alnum)
        });
    ok.then_some(()).ok_or_else(|| {
        "must be a DNS-1123 subdomain: at most 253 lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit".to_string()
    })
}

fn is_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Checks a qualified name (a label, annotation or taint key).
pub fn check_qualified_name(s: &str) -> Result<(), String> {
    let ok = s.len() <= 316
        && match s.split_once('/') {
            Some((prefix, name)) => check_dns1123_subdomain(prefix).is_ok() && is_name_part(name),
            None => is_name_part(s),
        };
    ok.then_some(()).ok_or_else(|| {
        "must be a qualified name: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit (e.g. 'example.com/gpu')".to_string()
    })
}

/// Checks a label value (at most 63 characters, possibly empty).
pub fn check_label_value(s: &str) -> Result<(), String> {
    (s.is_empty() || is_name_part(s)).then_some(()).ok_or_else(|| {
        "must be a label value: at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit".to_string()
    })
}

/// Parses a duration as [`DURATION_PATTERN`] accepts it, without ever overflowing.
fn parse_duration(s: &str) -> Option<std::time::Duration> {
    if s.len() > DURATION_MAX_LENGTH {
        return None;
    }
    if s == "0" {
        return Some(std::time::Duration::ZERO);
    }
    let mut rest = s;
    let mut total = std::time::Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if int_len == 0 {
            return None;
        }
        let (int, after) = rest.split_at(int_len);
        if int.trim_start_matches('0').len() > 9 {
            return None;
        }
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                if n == 0 {
                    return None;
                }
                a.split_at(n)
            }
            None => ("", after),
        };
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let nanos_per: f64 = match unit {
            "ns" => 1.0,
            "us" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        let value: f64 = format!("{int}.{}", if frac.is_empty() { "0" } else { frac })
            .parse()
            .ok()?;
        // At most 999999999h per part and a few parts: far below u64 nanoseconds' range of
        // seconds, so the sum cannot overflow.
        total = total.checked_add(std::time::Duration::from_secs_f64(value * nanos_per / 1e9))?;
        rest = after;
    }
    Some(total)
}

/// Checks a non-negative duration.
pub fn check_duration(s: &str) -> Result<(), String> {
    parse_duration(s).map(|_| ()).ok_or_else(|| {
        "must be a duration such as 30s, 5m or 1h30m (units ns, us, ms, s, m, h; at most 9 digits per part)".to_string()
    })
}

/// Checks a duration greater than zero.
pub fn check_positive_duration(s: &str) -> Result<(), String> {
    check_duration(s)?;
    // Zero in every part is zero, whatever rounding says: read the digits.
    if s.chars().any(|c| ('1'..='9').contains(&c)) {
        Ok(())
    } else {
        Err("must be a duration greater than zero, such as 30s or 5m".to_string())
    }
}

/// Checks a non-negative resource quantity.
pub fn check_quantity(s: &str) -> Result<(), String> {
    let err = || {
        "must be a non-negative quantity such as 4, 500m, 16Gi or 1e3 (Kubernetes quantity syntax)"
            .to_string()
    };
    let body = s.strip_prefix('+').unwrap_or(s);
    let num_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, suffix) = body.split_at(num_end);
    if !is_decimal(num) {
        return Err(err());
    }
    let ok = match suffix {
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        s if s.starts_with(['e', 'E']) => {
            let exp = &s[1..];
            let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            is_decimal(exp)
        }
        _ => false,
    };
    ok.then_some(()).ok_or_else(err)
}

/// `[0-9]+(\.[0-9]*)?` or `\.[0-9]+`.
fn is_decimal(s: &str) -> bool {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let digits = |x: &str| x.chars().all(|c| c.is_ascii_digit());
    if !digits(int) || !frac.is_none_or(digits) {
        return false;
    }
    if int.is_empty() {
        frac.is_some_and(|f| !f.is_empty())
    } else {
        true
    }
}

/// Checks an absolute http(s) URL.
pub fn check_url(s: &str) -> Result<(), String> {
    let err = || "must be an absolute http:// or https:// URL".to_string();
    if s.len() > 2048 || s.chars().any(char::is_whitespace) {
        return Err(err());
    }
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(err)?;
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if host_end == 0 {
        return Err(err());
    }
    Ok(())
}

/// Checks a Google Cloud project ID (as [`GCP_PROJECT_PATTERN`]).
pub fn check_gcp_project(s: &str) -> Result<(), String> {
    let id = match s.rsplit_once(':') {
        Some((domain, id)) => {
            let ok = (2..=63).contains(&domain.len())
                && domain
                    .chars()
                    .all(|c| lower_alnum(c) || c == '-' || c == '.')
                && domain.starts_with(lower_alnum)
                && domain.ends_with(lower_alnum);
            if !ok {
                return Err(project_error());
            }
            id
        }
        None => s,
    };
    let ok = (6..=30).contains(&id.len())
        && id.chars().all(|c| lower_alnum(c) || c == '-')
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id.ends_with(lower_alnum);
    ok.then_some(()).ok_or_else(project_error)
}

fn project_error() -> String {
    "must be a Google Cloud project ID: 6 to 30 lowercase letters, digits and '-', starting with a letter and not ending with '-' (e.g. my-project)".to_string()
}

/// Checks a Google Cloud region or zone (as [`GCP_LOCATION_PATTERN`]).
pub fn check_gcp_location(s: &str) -> Result<(), String> {
    let err = || {
        "must be a Google Cloud region or zone such as europe-west1 or europe-west1-b".to_string()
    };
    let parts: Vec<&str> = s.split('-').collect();
    let lower = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase());
    let region_part = |p: &str| {
        let digits = p.trim_start_matches(|c: char| c.is_ascii_lowercase());
        let letters = p.len() - digits.len();
        letters > 0 && !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
    };
    let ok = match parts.as_slice() {
        [a, b] => lower(a) && region_part(b),
        [a, b, z] => lower(a) && region_part(b) && z.len() == 1 && lower(z),
        _ => false,
    };
    ok.then_some(()).ok_or_else(err)
}

/// Checks a GKE cluster or node pool name (as [`GKE_NAME_PATTERN`]).
pub fn check_gke_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 40
        && s.chars().all(|c| lower_alnum(c) || c == '-')
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.ends_with(lower_alnum);
    ok.then_some(()).ok_or_else(|| {
        "must be a GKE name: at most 40 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit".to_string()
    })
}

/// Checks an environment variable name.
pub fn check_env_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !s.starts_with(|c: char| c.is_ascii_digit());
    ok.then_some(()).ok_or_else(|| {
        "must be an environment variable name: letters, digits, '_', '-' and '.', not starting with a digit".to_string()
    })
}

/// Checks an API server endpoint.
pub fn check_endpoint(s: &str) -> Result<(), String> {
    let err = || "must be host:port or https://host:port".to_string();
    let rest = s.strip_prefix("https://").unwrap_or(s);
    let (host, port) = rest.rsplit_once(':').ok_or_else(err)?;
    let ok = !host.is_empty()
        && !host.contains('/')
        && !host.chars().any(char::is_whitespace)
        && (1..=5).contains(&port.len())
        && port.chars().all(|c| c.is_ascii_digit());
    ok.then_some(()).ok_or_else(err)
}

/// Checks a `maxUnhealthy`-style count or percentage.
pub fn check_int_or_percent(
    v: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
) -> Result<(), String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let ok = match v {
        IntOrString::Int(n) => *n >= 0,
        IntOrString::String(s) => s
            .strip_suffix('%')
            .is_some_and(|d| (1..=6).contains(&d.len()) && d.chars().all(|c| c.is_ascii_digit())),
    };
    ok.then_some(()).ok_or_else(|| {
        "must be a non-negative count (e.g. 2) or a percentage (e.g. 50%)".to_string()
    })
}

// Schema pieces. Each is used through `#[schemars(schema_with = "...")]`, so the CRD YAML
// stays generated from the types.

fn string_schema(pattern: &str, max_length: usize, nullable: bool) -> schemars::Schema {
    let mut s = json!({"type": "string", "pattern": pattern, "maxLength": max_length});
    if nullable {
        s["nullable"] = json!(true);
    }
    schemars::Schema::try_from(s).unwrap_or_default()
}

/// The CEL rule that every key of a map is a qualified name. The maps it is put on are bounded
/// by `maxProperties` so its estimated cost fits the API server's budget.
fn qualified_keys_rule(what: &str) -> serde_json::Value {
    json!({
        "rule": format!("self.all(k, size(k) <= 316 && k.matches('{QUALIFIED_NAME_PATTERN}'))"),
        "message": format!("{what} keys must be qualified names: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
    })
}

/// A label map: qualified-name keys, label values, at most `max` entries.
fn label_map_schema(max: u32) -> schemars::Schema {
    let s = json!({
        "type": "object",
        "maxProperties": max,
        "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN},
        "x-kubernetes-validations": [qualified_keys_rule("label")],
    });
    schemars::Schema::try_from(s).unwrap_or_default()
}

pub(crate) fn labels_16(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    label_map_schema(16)
}

pub(crate) fn labels_32(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    label_map_schema(32)
}

/// An annotation map: qualified-name keys, at most 64 entries.
pub(crate) fn annotations_64(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::Schema::try_from(json!({
        "type": "object",
        "nullable": true,
        "maxProperties": 64,
        "additionalProperties": {"type": "string", "maxLength": 65536},
        "x-kubernetes-validations": [qualified_keys_rule("annotation")],
    }))
    .unwrap_or_default()
}

/// A resource map (`capacity`, `allocatable`): at most 32 quantities.
fn quantity_map_schema(nullable: bool) -> schemars::Schema {
    let mut s = json!({
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {
            "x-kubernetes-int-or-string": true,
            "pattern": QUANTITY_PATTERN,
            "minimum": 0,
        },
        "x-kubernetes-validations": [{
            "rule": format!("self.all(k, size(k) <= 316 && k.matches('{QUALIFIED_NAME_PATTERN}'))"),
            "message": "resource names must be qualified names such as cpu, memory or nvidia.com/gpu",
        }],
    });
    if nullable {
        s["nullable"] = json!(true);
    }
    schemars::Schema::try_from(s).unwrap_or_default()
}

pub(crate) fn quantities(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    quantity_map_schema(false)
}

pub(crate) fn quantities_nullable(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    quantity_map_schema(true)
}

pub(crate) fn duration(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_schema(DURATION_PATTERN, DURATION_MAX_LENGTH, true)
}

pub(crate) fn positive_duration(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_schema(POSITIVE_DURATION_PATTERN, DURATION_MAX_LENGTH, true)
}

pub(crate) fn qualified_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_schema(QUALIFIED_NAME_PATTERN, 316, false);
    s.insert("minLength".into(), json!(1));
    s
}

pub(crate) fn label_value(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_schema(LABEL_VALUE_PATTERN, 63, true)
}

pub(crate) fn label_values_16(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::Schema::try_from(json!({
        "type": "array",
        "maxItems": 16,
        "items": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN},
    }))
    .unwrap_or_default()
}

pub(crate) fn label_values_32(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::Schema::try_from(json!({
        "type": "array",
        "maxItems": 32,
        "items": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN},
    }))
    .unwrap_or_default()
}

pub(crate) fn dns1123_subdomain(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_schema(DNS1123_SUBDOMAIN_PATTERN, 253, false);
    s.insert("minLength".into(), json!(1));
    s
}

pub(crate) fn dns1123_label(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_schema(DNS1123_LABEL_PATTERN, 63, false);
    s.insert("minLength".into(), json!(1));
    s
}

pub(crate) fn group_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_schema(DNS1123_LABEL_PATTERN, GROUP_NAME_MAX, false);
    s.insert("minLength".into(), json!(1));
    s
}

pub(crate) fn node_class_names(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::Schema::try_from(json!({
        "type": "array",
        "minItems": 1,
        "maxItems": 8,
        "items": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": DNS1123_SUBDOMAIN_PATTERN},
    }))
    .unwrap_or_default()
}

pub(crate) fn node_names(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::Schema::try_from(json!({
        "type": "array",
        "maxItems": 1000,
        "items": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN_PATTERN},
    }))
    .unwrap_or_default()
}

pub(crate) fn url(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_schema(URL_PATTERN, 2048, true)
}

pub(crate) fn gcp_project(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_schema(GCP_PROJECT_PATTERN, 94, false);
    s.insert("minLength".into(), json!(6));
    s
}

pub(crate) fn gcp_location(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_schema(GCP_LOCATION_PATTERN, 63, false);
    s.insert("minLength".into(), json!(1));
    s
}

pub(crate) fn gke_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_schema(GKE_NAME_PATTERN, 40, false);
    s.insert("minLength".into(), json!(1));
    s
}

pub(crate) fn env_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_schema(ENV_NAME_PATTERN, 256, false);
    s.insert("minLength".into(), json!(1));
    s
}

pub(crate) fn endpoint(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_schema(ENDPOINT_PATTERN, 512, true);
    s.insert("minLength".into(), json!(1));
    s
}

pub(crate) fn int_or_percent(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::Schema::try_from(json!({
        "x-kubernetes-int-or-string": true,
        "nullable": true,
        "pattern": PERCENT_PATTERN,
        "minimum": 0,
    }))
    .unwrap_or_default()
}

/// EC2 tags: at most 40, keys 1–128 characters and not `aws:`-prefixed, values at most 256.
pub(crate) fn aws_tags(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::Schema::try_from(json!({
        "type": "object",
        "maxProperties": 40,
        "additionalProperties": {"type": "string", "maxLength": 256},
        "x-kubernetes-validations": [{
            "rule": "self.all(k, size(k) >= 1 && size(k) <= 128 && !k.startsWith('aws:'))",
            "message": "tag keys must be 1 to 128 characters and must not start with aws:",
        }],
    }))
    .unwrap_or_default()
}

/// A bounded list of bounded strings (so CEL rules over them stay cheap).
pub(crate) fn strings(
    max_items: u32,
    max_length: u32,
    min_items: u32,
    min_length: u32,
) -> schemars::Schema {
    let mut s = json!({
        "type": "array",
        "maxItems": max_items,
        "items": {"type": "string", "minLength": min_length, "maxLength": max_length},
    });
    if min_items > 0 {
        s["minItems"] = json!(min_items);
    }
    schemars::Schema::try_from(s).unwrap_or_default()
}

/// Serde helpers for `Option<Duration>` fields: the string is checked before it is parsed, so
/// no value (e.g. `99999999999999999999h`, which overflows the parser) can panic the decoder.
pub(crate) mod duration_serde {
    use kube::core::Duration;
    use serde::{Deserialize, Deserializer};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        super::check_duration(&s).map_err(serde::de::Error::custom)?;
        s.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for ok in [
            "0",
            "0s",
            "5s",
            "1h30m",
            "1.5h",
            "300ms",
            "000000001s",
            "999999999h",
        ] {
            assert_eq!(check_duration(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "forever",
            "-5m",
            "5",
            "1e3s",
            "1.s",
            ".5s",
            "1d",
            "1h-5m",
            "9999999999h",
            "+5s",
            " 5s",
        ] {
            assert!(check_duration(bad).is_err(), "{bad}");
        }
        assert!(check_positive_duration("0s").is_err());
        assert!(check_positive_duration("0h0m0.0s").is_err());
        assert_eq!(check_positive_duration("0.1s"), Ok(()));
        assert_eq!(check_positive_duration("0h1s"), Ok(()));
    }

    #[test]
    fn names() {
        assert_eq!(check_qualified_name("example.com/gpu"), Ok(()));
        assert_eq!(check_qualified_name("dedicated"), Ok(()));
        assert!(check_qualified_name("bad key!").is_err());
        assert!(check_qualified_name("/x").is_err());
        assert!(check_qualified_name("Example.com/x").is_err());
        assert!(check_label_value("has space").is_err());
        assert_eq!(check_label_value(""), Ok(()));
        assert!(check_dns1123_subdomain("UPPER_case").is_err());
        assert_eq!(check_dns1123_subdomain("a.b-c"), Ok(()));
        assert!(check_dns1123_label("a.b").is_err());
    }

    #[test]
    fn quantities_urls_endpoints() {
        for ok in ["4", "500m", "16Gi", "1e3", "1.5", ".5", "1.", "+1"] {
            assert_eq!(check_quantity(ok), Ok(()), "{ok}");
        }
        for bad in ["lots", "", "-1", "1GiB", "1..2", "e3", "."] {
            assert!(check_quantity(bad).is_err(), "{bad}");
        }
        assert_eq!(check_url("http://127.0.0.1:5000"), Ok(()));
        assert!(check_url("not a url").is_err());
        assert!(check_url("localhost:5000").is_err());
        assert_eq!(check_endpoint("10.0.0.1:6443"), Ok(()));
        assert_eq!(check_endpoint("https://[::1]:6443"), Ok(()));
        assert!(check_endpoint("https://host:6443/path").is_err());
    }

    #[test]
    fn a_group_name_is_a_short_label() {
        assert!(check_group_name("pool-a").is_ok());
        assert!(check_group_name("Pool").is_err());
        assert!(check_group_name(&"a".repeat(GROUP_NAME_MAX)).is_ok());
        let e = check_group_name(&"a".repeat(GROUP_NAME_MAX + 1)).expect_err("too long");
        assert!(e.contains("at most 40"), "{e}");
        let spec: crate::NodeClassSpec = serde_json::from_value(json!({
            "provider": {"type": "simulated", "simulated": {"group": {"name": "Bad_Name"}}}
        }))
        .expect("decodes");
        let e = spec.validate().expect_err("invalid group name");
        assert_eq!(e.field(), "spec.provider.simulated.group.name", "{e}");
        let ok: crate::NodeClassSpec = serde_json::from_value(json!({
            "provider": {"type": "simulated", "simulated": {"group": {"name": "web"}}}
        }))
        .expect("decodes");
        let g = ok.group().expect("group-backed");
        assert_eq!(
            g.label,
            ("kube-node.io/group".to_string(), "web".to_string())
        );
    }

    #[test]
    fn decode_names_the_field() {
        let v = json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
            "metadata": {"name": "x"},
            "spec": {"provider": {"type": "simulated", "simulated": {"bootDelay": "forever"}}}});
        let e = decode::<crate::NodeClass>(v).expect_err("bad duration");
        assert_eq!(e.field(), "spec.provider.simulated.bootDelay", "{e}");
        let huge = json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
            "metadata": {"name": "x"},
            "spec": {"provider": {"type": "simulated", "simulated": {"bootDelay": "99999999999999999999h"}}}});
        assert!(decode::<crate::NodeClass>(huge).is_err());
    }
}
