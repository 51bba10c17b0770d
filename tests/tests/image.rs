//! The container image, as far as it can be checked without building it: the Dockerfile's build
//! stage runs the release build of the one binary with CI's lock file, the runtime stage holds
//! only that binary and runs as the non-root user deploy/ requires, and deploy/ names the image
//! the Dockerfile's instructions produce.

use std::path::Path;

use clap::Parser as _;

fn repo_file(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The Dockerfile's instructions, continuation lines joined, comments kept apart.
struct Dockerfile {
    comments: String,
    /// (instruction, arguments), in order.
    lines: Vec<(String, String)>,
}

fn dockerfile() -> Dockerfile {
    let text = repo_file("Dockerfile");
    let mut comments = String::new();
    let mut lines = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') {
            comments.push_str(t.trim_start_matches('#').trim());
            comments.push('\n');
            continue;
        }
        if t.is_empty() && pending.is_empty() {
            continue;
        }
        pending.push_str(t.trim_end_matches('\\').trim());
        pending.push(' ');
        if !t.ends_with('\\') {
            let full = pending.trim().to_string();
            pending.clear();
            let (instr, args) = full.split_once(' ').unwrap_or((&full, ""));
            lines.push((instr.to_uppercase(), args.trim().to_string()));
        }
    }
    Dockerfile { comments, lines }
}

/// The stages: (FROM arguments, the instructions after it).
fn stages(d: &Dockerfile) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (instr, args) in &d.lines {
        if instr == "FROM" {
            out.push((args.clone(), Vec::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push((instr.clone(), args.clone()));
        }
    }
    out
}

fn workspace_rust_version() -> (u32, u32) {
    let cargo = repo_file("Cargo.toml");
    let v = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version")
        .trim_matches('"')
        .to_string();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().expect("number"));
    (parts.next().expect("major"), parts.next().expect("minor"))
}

#[test]
fn the_build_stage_runs_the_locked_release_build_of_the_binary() {
    let d = dockerfile();
    let stages = stages(&d);
    assert!(stages.len() >= 2, "multi-stage: {:?}", d.lines);
    let (from, build) = &stages[0];
    let image = from.split_whitespace().next().expect("image");
    assert!(image.starts_with("rust:"), "a Rust toolchain image: {from}");
    // The toolchain is at least the workspace's rust-version.
    let tag = image.trim_start_matches("rust:");
    let mut v = tag.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let toolchain = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    assert!(toolchain >= workspace_rust_version(), "{tag}");
    let runs: Vec<&String> = build
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a)
        .collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --release --locked -p kube-node")),
        "the build stage runs `cargo build --release --locked -p kube-node`: {runs:?}"
    );
    // The lock file CI tests with is in the context (COPY . . and not ignored).
    let ignore = repo_file(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "no build output in the context"
    );
    assert!(!ignore.lines().any(|l| l.contains("Cargo.lock")));
}

#[test]
fn the_runtime_stage_is_small_non_root_and_holds_only_the_binary() {
    let d = dockerfile();
    let stages = stages(&d);
    let (from, runtime) = stages.last().expect("a runtime stage");
    assert!(
        from.contains("distroless/cc") || from.contains("-slim"),
        "a small runtime image: {from}"
    );
    let copies: Vec<&String> = runtime
        .iter()
        .filter(|(i, _)| i == "COPY" || i == "ADD")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(copies.len(), 1, "the binary only: {copies:?}");
    assert!(copies[0].starts_with("--from="), "{copies:?}");
    let dest = copies[0].split_whitespace().last().expect("destination");
    assert!(dest.ends_with("/kube-node"), "{dest}");
    assert!(
        !runtime.iter().any(|(i, _)| i == "RUN"),
        "nothing is installed into the runtime image"
    );
    let user = runtime
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.clone())
        .expect("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("numeric UID");
    assert_ne!(uid, 0, "non-root");
    // The Deployment's runAsUser is that user (runAsNonRoot needs a numeric USER).
    let deployment = repo_file("deploy/deployment.yaml");
    assert!(
        deployment.contains(&format!("runAsUser: {uid}")),
        "deploy/deployment.yaml runs as {uid}"
    );
    let entrypoint = runtime
        .iter()
        .find(|(i, _)| i == "ENTRYPOINT")
        .map(|(_, a)| a.clone())
        .expect("ENTRYPOINT");
    assert!(entrypoint.contains(dest), "{entrypoint}");
}

#[test]
fn deploy_names_the_image_the_dockerfile_docs_build() {
    let d = dockerfile();
    let built = d
        .comments
        .lines()
        .find_map(|l| l.strip_prefix("docker build -t "))
        .and_then(|r| r.split_whitespace().next())
        .expect("the Dockerfile says how to build it: `docker build -t <image> .`")
        .to_string();
    let (name, tag) = built.split_once(':').expect("name:tag");
    let kustomization: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("deploy/kustomization.yaml")).expect("kustomization");
    let images = kustomization["images"].as_sequence().expect("images");
    let deployment: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("deploy/deployment.yaml")).expect("deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let placeholder = container["image"].as_str().expect("image");
    let image = images
        .iter()
        .find(|i| i["name"].as_str() == Some(placeholder))
        .expect("the kustomization sets the Deployment's image");
    assert_eq!(image["newName"].as_str(), Some(name));
    assert_eq!(image["newTag"].as_str(), Some(tag));
    // The Deployment's arguments are ones the binary accepts.
    let args: Vec<String> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string").to_string())
        .collect();
    kube_node::cli::Cli::try_parse_from(std::iter::once("kube-node".to_string()).chain(args))
        .expect("the Deployment's args parse");
    // The README says how to build and push it.
    let readme = repo_file("README.md");
    assert!(
        readme.contains(&format!("docker build -t {built} .")),
        "README builds {built}"
    );
    assert!(readme.contains("docker push"), "README pushes the image");
}
