//! Every invalid manifest of `data/manifests.yaml` is rejected twice, each time naming its
//! field: by the generated CRD schema (its patterns and bounds, checked here the way the API
//! server's OpenAPI validation checks them, and its CEL rules, run by kube-cel) and by the
//! Rust `decode_and_validate` the controllers read objects with. The valid manifests pass
//! both. The e2e suite applies the same file to a real API server.
//!
//! And no JSON shaped like a NodeClass or NodeSet, with random values, panics the decoder or
//! the validation.

use kube::CustomResourceExt;
use kube_node_crds::{NodeClass, NodeSet};
use proptest::prelude::*;
use serde_json::{Value, json};

const MANIFESTS: &str = include_str!("data/manifests.yaml");

#[derive(serde::Deserialize)]
struct Manifests {
    invalid: Vec<Case>,
    valid: Vec<Value>,
}

#[derive(serde::Deserialize)]
struct Case {
    case: String,
    field: String,
    object: Value,
}

fn manifests() -> Manifests {
    serde_yaml::from_str(MANIFESTS).expect("manifests.yaml parses")
}

fn schema_of(kind: &str) -> Value {
    let crd = match kind {
        "NodeClass" => NodeClass::crd(),
        "NodeSet" => NodeSet::crd(),
        other => panic!("unknown kind {other}"),
    };
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("schema json")
}

/// The value validations of the API server's OpenAPI check that the generated schema uses:
/// pattern, length, item and property counts, numeric bounds, enums. Paths are written as the
/// API server writes them (`spec.capacity.cpu`, `spec.taints[0].key`).
fn openapi_errors(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    let mut err = |what: String| out.push(format!("{path}: {what}"));
    match value {
        Value::String(s) => {
            if let Some(p) = schema["pattern"].as_str() {
                let re = regex::Regex::new(p).expect("pattern compiles");
                if !re.is_match(s) {
                    err(format!("should match '{p}'"));
                }
            }
            let len = s.chars().count() as u64;
            if schema["maxLength"].as_u64().is_some_and(|m| len > m) {
                err("too long".into());
            }
            if schema["minLength"].as_u64().is_some_and(|m| len < m) {
                err("too short".into());
            }
            if let Some(e) = schema["enum"].as_array()
                && !e.contains(value)
            {
                err("unsupported value".into());
            }
        }
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or_default();
            if schema["minimum"].as_f64().is_some_and(|m| v < m) {
                err("should be greater than or equal to the minimum".into());
            }
            if schema["maximum"].as_f64().is_some_and(|m| v > m) {
                err("should be less than or equal to the maximum".into());
            }
            if schema["type"] == "string" {
                err("must be a string".into());
            }
        }
        Value::Array(items) => {
            if schema["maxItems"]
                .as_u64()
                .is_some_and(|m| items.len() as u64 > m)
            {
                err("too many items".into());
            }
            if schema["minItems"]
                .as_u64()
                .is_some_and(|m| (items.len() as u64) < m)
            {
                err("too few items".into());
            }
            for (i, item) in items.iter().enumerate() {
                openapi_errors(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            if schema["maxProperties"]
                .as_u64()
                .is_some_and(|m| map.len() as u64 > m)
            {
                err("too many properties".into());
            }
            for (k, v) in map {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if let Some(s) = schema["properties"].get(k) {
                    openapi_errors(s, v, &child, out);
                } else if schema["additionalProperties"].is_object() {
                    openapi_errors(&schema["additionalProperties"], v, &child, out);
                }
            }
        }
        _ => {}
    }
}

fn schema_errors(object: &Value) -> Vec<String> {
    let schema = schema_of(object["kind"].as_str().expect("kind"));
    let mut errors = Vec::new();
    openapi_errors(&schema, object, "", &mut errors);
    if let Err(cel) = kube_cel::Validator::new().validate(&schema, object, None) {
        errors.extend(cel.iter().map(|e| e.to_string()));
    }
    errors
}

fn rust_errors(object: &Value) -> Result<(), kube_node_crds::InvalidSpec> {
    match object["kind"].as_str() {
        Some("NodeClass") => NodeClass::decode_and_validate(object.clone()).map(|_| ()),
        Some("NodeSet") => NodeSet::decode_and_validate(object.clone()).map(|_| ()),
        other => panic!("unknown kind {other:?}"),
    }
}

#[test]
fn every_invalid_manifest_is_rejected_by_the_schema_naming_its_field() {
    let mut failures = Vec::new();
    for c in manifests().invalid {
        let errors = schema_errors(&c.object);
        if !errors.iter().any(|e| e.contains(&c.field)) {
            failures.push(format!("{}: expected {} in {errors:?}", c.case, c.field));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn every_invalid_manifest_is_rejected_by_the_controllers_decoder_naming_its_field() {
    let mut failures = Vec::new();
    for c in manifests().invalid {
        match rust_errors(&c.object) {
            Ok(()) => failures.push(format!("{}: accepted", c.case)),
            Err(e) => {
                if !e.errors.iter().any(|f| f.field.starts_with(&c.field)) {
                    failures.push(format!("{}: expected {} in {e}", c.case, c.field));
                }
                assert_eq!(e.reason(), "InvalidSpec");
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_valid_manifests_pass_the_schema_and_the_decoder() {
    for object in manifests().valid {
        let name = object["metadata"]["name"].clone();
        assert_eq!(schema_errors(&object), Vec::<String>::new(), "{name}");
        assert_eq!(rust_errors(&object), Ok(()), "{name}");
    }
}

#[test]
fn the_examples_pass_the_schema_and_the_decoder() {
    for file in [
        "nodeclass-simulated.yaml",
        "nodeclass-exec.yaml",
        "nodeclass-gke.yaml",
        "nodeset.yaml",
    ] {
        let text =
            std::fs::read_to_string(format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR")))
                .expect("example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let object: Value = serde::Deserialize::deserialize(doc).expect("yaml");
            // The credentials Secrets next to a NodeClass are core objects.
            if object.is_null() || !matches!(object["kind"].as_str(), Some("NodeClass" | "NodeSet"))
            {
                continue;
            }
            assert_eq!(schema_errors(&object), Vec::<String>::new(), "{file}");
            assert_eq!(rust_errors(&object), Ok(()), "{file}");
        }
    }
}

/// The schema patterns and the Rust checks accept the same strings.
#[test]
fn schema_patterns_and_rust_checks_agree() {
    use kube_node_crds::validation::*;
    type Check = fn(&str) -> Result<(), String>;
    // (pattern, minLength, maxLength, check), as the schema pieces pair them.
    let pairs: [(&str, usize, usize, Check); 12] = [
        (DURATION_PATTERN, 0, 64, check_duration),
        (POSITIVE_DURATION_PATTERN, 0, 64, check_positive_duration),
        (QUANTITY_PATTERN, 0, usize::MAX, check_quantity),
        (LABEL_VALUE_PATTERN, 0, 63, check_label_value),
        (DNS1123_SUBDOMAIN_PATTERN, 1, 253, check_dns1123_subdomain),
        (DNS1123_LABEL_PATTERN, 1, 63, check_dns1123_label),
        (URL_PATTERN, 0, 2048, check_url),
        (ENV_NAME_PATTERN, 1, 256, check_env_name),
        (ENDPOINT_PATTERN, 1, 512, check_endpoint),
        (GCP_PROJECT_PATTERN, 6, 94, check_gcp_project),
        (GCP_LOCATION_PATTERN, 1, 63, check_gcp_location),
        (GKE_NAME_PATTERN, 1, 40, check_gke_name),
    ];
    let long_label = "a".repeat(64);
    let long_duration = format!("{}s", "0".repeat(70));
    let mut samples = vec![
        "",
        "0",
        "0s",
        "00s",
        "5s",
        "-5s",
        "+5s",
        "1h30m",
        "1.5h",
        "1.s",
        ".5s",
        "5",
        "forever",
        "0.0s",
        "0.1s",
        "999999999h",
        "1000000000h",
        "0001000000000h",
        "1d",
        "300ms",
        "2us",
        "4",
        "500m",
        "16Gi",
        "1e3",
        "1E-3",
        "1.",
        ".5",
        "+1",
        "-1",
        "lots",
        "1Gi1",
        "a",
        "a-b",
        "-a",
        "a-",
        "a.b",
        "A",
        "a_b",
        "x.example.com",
        "has space",
        "http://127.0.0.1:5000",
        "https://x/y?z",
        "http://",
        "ftp://x",
        "not a url",
        "localhost:5000",
        "10.0.0.1:6443",
        "https://[::1]:6443",
        "host:123456",
        "API_TOKEN",
        "1BAD",
        "a=b",
        "x.y-z",
        "a..b",
        "my-project",
        "my-project-",
        "1project",
        "proj",
        "example.com:my-project",
        "example.com:My-project",
        ":my-project",
        "a-very-long-project-id-beyond-thirty",
        "europe-west1",
        "europe-west1-b",
        "us-central1-ab",
        "europe-west",
        "europe-1",
        "Europe-west1",
        "northamerica-northeast2-a",
        "pool-1",
        "pool_1",
        "p",
        "1pool",
    ];
    let name40 = "a".repeat(40);
    let name41 = "a".repeat(41);
    samples.push(&long_label);
    samples.push(&long_duration);
    samples.push(&name40);
    samples.push(&name41);
    for (pattern, min, max, check) in pairs {
        let re = regex::Regex::new(pattern).expect("pattern");
        for s in &samples {
            let len = s.chars().count();
            let schema_ok = re.is_match(s) && (min..=max).contains(&len);
            assert_eq!(
                schema_ok,
                check(s).is_ok(),
                "pattern {pattern} and its Rust check disagree on {s:?}"
            );
        }
    }
    let qn = regex::Regex::new(QUALIFIED_NAME_PATTERN).expect("pattern");
    for s in [
        "a",
        "example.com/gpu",
        "bad key!",
        "/x",
        "x/",
        "Example.com/x",
        "a/b/c",
        "kubernetes.io/os",
        "a.b-c_d",
        "-a",
    ] {
        assert_eq!(qn.is_match(s), check_qualified_name(s).is_ok(), "{s:?}");
    }
}

/// A random value of the schema's shape: mostly what the schema allows, often what it does
/// not (wrong types, hostile strings, huge numbers), so decode and validate see both.
fn random_value(schema: &Value, rng: &mut Rng, depth: u32) -> Value {
    if depth > 12 {
        return Value::Null;
    }
    if depth > 0 && rng.below(12) == 0 {
        return hostile(rng);
    }
    if schema.get("properties").is_some() {
        let mut out = serde_json::Map::new();
        if let Some(props) = schema["properties"].as_object() {
            for (k, s) in props {
                let required = schema["required"]
                    .as_array()
                    .is_some_and(|r| r.contains(&json!(k)));
                if required || rng.below(2) == 0 {
                    out.insert(k.clone(), random_value(s, rng, depth + 1));
                }
            }
        }
        return Value::Object(out);
    }
    if schema["additionalProperties"].is_object() {
        let mut out = serde_json::Map::new();
        for _ in 0..rng.below(4) {
            out.insert(
                random_string(rng),
                random_value(&schema["additionalProperties"], rng, depth + 1),
            );
        }
        return Value::Object(out);
    }
    if let Some(e) = schema["enum"].as_array()
        && !e.is_empty()
    {
        return e[rng.below(e.len() as u64) as usize].clone();
    }
    match schema["type"].as_str() {
        Some("array") => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(&schema["items"], rng, depth + 1))
                .collect(),
        ),
        Some("integer") => json!(random_int(rng)),
        Some("boolean") => json!(rng.below(2) == 0),
        _ => {
            if schema.get("x-kubernetes-int-or-string").is_some() && rng.below(2) == 0 {
                json!(random_int(rng))
            } else {
                Value::String(random_string(rng))
            }
        }
    }
}

fn random_int(rng: &mut Rng) -> i64 {
    match rng.below(5) {
        0 => 0,
        1 => -1,
        2 => i64::MAX,
        3 => i64::MIN,
        _ => rng.below(1000) as i64,
    }
}

const STRINGS: &[&str] = &[
    "",
    "0",
    "0s",
    "5s",
    "-5m",
    "forever",
    "1h30m",
    "99999999999999999999h",
    "1e309s",
    "NaNs",
    "infh",
    "4",
    "500m",
    "16Gi",
    "lots",
    "-1",
    "bad key!",
    "example.com/gpu",
    "has space",
    "UPPER_case",
    "sim",
    "50%",
    "abc",
    "101%",
    "http://127.0.0.1:5000",
    "not a url",
    "10.0.0.1:6443",
    "ünïcødé",
    "a/b/c",
    "aws:x",
    "\u{0}",
    "µs",
    "1µs",
    "9999999999999999999",
];

fn random_string(rng: &mut Rng) -> String {
    if rng.below(4) == 0 {
        (0..rng.below(20))
            .map(|_| char::from_u32(rng.below(0x250) as u32).unwrap_or('x'))
            .collect()
    } else {
        STRINGS[rng.below(STRINGS.len() as u64) as usize].to_string()
    }
}

fn hostile(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => Value::Null,
        1 => json!(random_int(rng)),
        2 => json!(1.5e300),
        3 => json!([]),
        4 => json!({}),
        _ => Value::String(random_string(rng)),
    }
}

/// A small deterministic generator driven by proptest's seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 { 0 } else { self.0 % n }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_random_nodeclass_or_nodeset_panics_the_decoder(seed in 1u64.., kind in 0u8..2) {
        let kind = if kind == 0 { "NodeClass" } else { "NodeSet" };
        let schema = schema_of(kind);
        let mut rng = Rng(seed);
        let mut object = random_value(&schema, &mut rng, 0);
        object["apiVersion"] = json!("kube-node.io/v1alpha1");
        object["kind"] = json!(kind);
        object["metadata"] = json!({"name": "x"});
        // Must return, Ok or Err, never panic; an error always names a field.
        if let Err(e) = rust_errors(&object) {
            prop_assert!(!e.errors.is_empty());
            prop_assert!(e.errors.iter().all(|f| !f.field.is_empty()), "{}", e);
        }
    }
}
