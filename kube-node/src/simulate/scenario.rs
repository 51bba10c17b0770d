//! The scenario file format (see `examples/scenario-default.yaml`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// A scenario: steps run in order; each acts, then waits until its expectation holds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// The steps.
    pub steps: Vec<Step>,
}

/// One step: at most one action, then an expectation.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Step {
    /// Shown in the progress view and the summary.
    pub name: String,
    /// Objects to create or update: file names (next to the scenario) or inline manifests.
    #[serde(default)]
    pub apply: Vec<serde_yaml::Value>,
    /// Change a NodeSet's replicas through its /scale subresource.
    #[serde(default)]
    pub scale: Option<ScaleStep>,
    /// Remove this many Nodes of a NodeSet by name, in one write.
    #[serde(default)]
    pub remove_nodes: Option<RemoveNodesStep>,
    /// Make this many machines vanish behind the controllers' back.
    #[serde(default)]
    pub terminate_machines: Option<usize>,
    /// Merge-patch objects (e.g. inject faults into a NodeClass).
    #[serde(default)]
    pub patch: Vec<PatchStep>,
    /// Delete objects.
    #[serde(default)]
    pub delete: Vec<ObjectRef>,
    /// What must hold before the next step.
    #[serde(default)]
    pub expect: Option<Expect>,
    /// How long the expectation may take. Default 120 s.
    #[serde(default)]
    pub timeout: Option<kube::core::Duration>,
}

/// `scale: {nodeSet, replicas}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScaleStep {
    /// The NodeSet.
    pub node_set: String,
    /// The new replicas.
    pub replicas: i32,
}

/// `removeNodes: {nodeSet, count}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RemoveNodesStep {
    /// The NodeSet.
    pub node_set: String,
    /// How many of its Nodes (the oldest) to remove.
    pub count: usize,
}

/// `patch: [{kind, name, patch}]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PatchStep {
    /// `NodeClass`, `NodeSet` or `Node`.
    pub kind: String,
    /// The object's name.
    pub name: String,
    /// A JSON merge patch.
    pub patch: serde_json::Value,
}

/// `{kind, name}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectRef {
    /// `NodeClass`, `NodeSet` or `Node`.
    pub kind: String,
    /// The object's name.
    pub name: String,
}

/// Counts that must all hold at once.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Expect {
    /// The NodeSet whose status is checked.
    #[serde(default)]
    pub node_set: Option<String>,
    /// Its `status.readyReplicas`.
    #[serde(default)]
    pub ready_replicas: Option<i32>,
    /// Nodes that ask for a machine (annotated with a NodeClass), in the whole cluster.
    #[serde(default)]
    pub nodes: Option<usize>,
    /// Live machines of the simulated cloud.
    #[serde(default)]
    pub machines: Option<usize>,
    /// Whether every Node of the NodeSet (not being deleted) was built from what the NodeSet
    /// and its NodeClass say now (no drift: a rollout is done).
    #[serde(default)]
    pub up_to_date: Option<bool>,
}

impl Scenario {
    /// Parses a scenario, resolving file names under `apply` against `files`.
    pub fn parse(text: &str, files: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        let mut scenario: Scenario = serde_yaml::from_str(text).context("parsing the scenario")?;
        for (i, step) in scenario.steps.iter_mut().enumerate() {
            let mut objects = Vec::new();
            for item in &step.apply {
                match item {
                    serde_yaml::Value::String(name) => {
                        let text = files.get(name).with_context(|| {
                            format!("steps[{i}].apply: no file {name:?} next to the scenario")
                        })?;
                        for doc in serde_yaml::Deserializer::from_str(text) {
                            let v = serde_yaml::Value::deserialize(doc)
                                .with_context(|| format!("steps[{i}].apply: parsing {name}"))?;
                            if !v.is_null() {
                                objects.push(v);
                            }
                        }
                    }
                    serde_yaml::Value::Mapping(_) => objects.push(item.clone()),
                    _ => bail!("steps[{i}].apply: each entry is a file name or a manifest"),
                }
            }
            step.apply = objects;
        }
        Ok(scenario)
    }

    /// The built-in default scenario (a copy of `examples/scenario-default.yaml` and the files
    /// it names), so `kube-node simulate` works from any directory.
    pub fn builtin() -> anyhow::Result<Self> {
        let files = BTreeMap::from([
            (
                "nodeclass-simulated.yaml".to_string(),
                include_str!("../../../examples/nodeclass-simulated.yaml").to_string(),
            ),
            (
                "nodeset.yaml".to_string(),
                include_str!("../../../examples/nodeset.yaml").to_string(),
            ),
            (
                "node.yaml".to_string(),
                include_str!("../../../examples/node.yaml").to_string(),
            ),
        ]);
        Self::parse(
            include_str!("../../../examples/scenario-default.yaml"),
            &files,
        )
    }

    /// Reads a scenario file and the files it names.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let raw: Scenario =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut files = BTreeMap::new();
        for step in &raw.steps {
            for item in &step.apply {
                if let serde_yaml::Value::String(name) = item {
                    let p = dir.join(name);
                    let body = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    files.insert(name.clone(), body);
                }
            }
        }
        Self::parse(&text, &files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_scenario_parses_and_resolves_its_files() {
        let s = Scenario::builtin().expect("builtin scenario");
        assert!(s.steps.len() >= 5);
        assert_eq!(s.steps[0].apply.len(), 2, "NodeClass and NodeSet");
        assert_eq!(s.steps[1].scale.as_ref().map(|x| x.replicas), Some(20));
        // A rollout step waits for every Node to be up to date.
        assert!(
            s.steps
                .iter()
                .any(|st| st.expect.as_ref().and_then(|e| e.up_to_date) == Some(true))
        );
    }

    #[test]
    fn an_unknown_step_field_names_itself() {
        let err = Scenario::parse("steps:\n- name: x\n  scael: {}\n", &BTreeMap::new())
            .expect_err("unknown field");
        assert!(format!("{err:#}").contains("scael"), "{err:#}");
    }

    #[test]
    fn a_missing_file_names_the_step() {
        let err = Scenario::parse(
            "steps:\n- name: x\n  apply: [nope.yaml]\n",
            &BTreeMap::new(),
        )
        .expect_err("missing file");
        assert!(format!("{err:#}").contains("steps[0].apply"), "{err:#}");
    }
}
