//! Every way a program can misbehave becomes a clear typed error: no panic, no zombie, no
//! process left running, no Secret in the message.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kube_node_provider::conformance::Conformance;
use kube_node_provider::{
    CreateRequest, DeleteOutcome, ListFilter, Provider, ProviderError, ProviderFactory, Sensitive,
};
use kube_node_provider_exec::{ERROR_STDERR_BYTES, ExecFactory, ExecProvider};

fn provider(spec: kube_node_crds::v1alpha1::ExecProviderSpec) -> ExecProvider {
    ExecProvider::new(&class(spec, None)).expect("valid spec")
}

/// A program that writes its pid to `<dir>/pid` and then runs `body`.
fn program(dir: &TempDir, body: &str) -> kube_node_crds::v1alpha1::ExecProviderSpec {
    let pid = dir.join("pid");
    let path = script(
        dir,
        "prog.sh",
        &format!("echo $$ > '{}'\n{body}", pid.display()),
    );
    let mut s = spec(&[path.to_str().expect("utf-8 path")]);
    s.timeout = Some("10s".parse().expect("duration"));
    s
}

fn expect_transient(r: Result<(), ProviderError>, contains: &[&str]) -> ProviderError {
    let e = r.expect_err("the call fails");
    assert_eq!(e.reason(), "Transient", "{e}");
    assert!(e.is_retryable());
    for c in contains {
        assert!(e.message().contains(c), "{e:?} lacks {c:?}");
    }
    e
}

#[tokio::test]
async fn malformed_output_is_transient() {
    let dir = TempDir::new("malformed");
    let p = provider(program(&dir, "echo 'this is not json'"));
    expect_transient(
        p.validate().await,
        &[
            "malformed response",
            "not one JSON document",
            "this is not json",
        ],
    );
    assert_reaped(read_pid(&dir.join("pid")));

    // Valid JSON of the wrong shape for the operation.
    let dir = TempDir::new("wrong-shape");
    let p = provider(program(&dir, r#"echo '{"instances": []}'"#));
    let e = p.get("exec:///z/m-1").await.expect_err("no instance");
    assert_eq!(e.reason(), "Transient");
    assert!(e.message().contains("no \"instance\""), "{e}");

    let dir = TempDir::new("bad-state");
    let p = provider(program(
        &dir,
        r#"echo '{"instance": {"id": "m-1", "providerId": "exec:///z/m-1", "state": "Exploded"}}'"#,
    ));
    let e = p.get("exec:///z/m-1").await.expect_err("bad state");
    assert_eq!(e.reason(), "Transient");
    assert!(e.message().contains("Exploded"), "{e}");

    let dir = TempDir::new("empty");
    let p = provider(program(&dir, "true"));
    expect_transient(p.validate().await, &["stdout is empty"]);
}

#[tokio::test]
async fn non_zero_exit_is_transient_with_stderr() {
    let dir = TempDir::new("exit");
    let p = provider(program(&dir, "echo 'disk on fire' >&2\nexit 3"));
    expect_transient(
        p.validate().await,
        &[
            "exited with status 3",
            "without an error response",
            "disk on fire",
        ],
    );
    assert_reaped(read_pid(&dir.join("pid")));

    let dir = TempDir::new("signal");
    let p = provider(program(&dir, "kill -TERM $$"));
    expect_transient(p.validate().await, &["killed by signal 15"]);
}

#[tokio::test]
async fn an_error_response_wins_over_the_exit_status() {
    let dir = TempDir::new("typed");
    let p = provider(program(
        &dir,
        r#"echo '{"error":{"kind":"QuotaExceeded","message":"10 of 10 machines used"}}'
exit 1"#,
    ));
    let e = p
        .create(&Conformance::default_request(CLUSTER, "u", "n"))
        .await
        .expect_err("quota");
    assert_eq!(
        e,
        ProviderError::QuotaExceeded("10 of 10 machines used".into())
    );
    assert!(e.is_out_of_resources());

    let dir = TempDir::new("throttled");
    let p = provider(program(
        &dir,
        r#"echo '{"error":{"kind":"Throttled","message":"slow down","retryAfterSeconds":7}}'"#,
    ));
    let e = p.list(&ListFilter::default()).await.expect_err("throttled");
    assert_eq!(e.reason(), "Throttled");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn unknown_error_kind_is_transient_naming_it() {
    let dir = TempDir::new("unknown-kind");
    let p = provider(program(
        &dir,
        r#"echo '{"error":{"kind":"Exploded","message":"boom"}}'"#,
    ));
    expect_transient(
        p.validate().await,
        &["unknown error kind \"Exploded\"", "boom"],
    );
}

#[tokio::test]
async fn hang_past_the_timeout_kills_the_program() {
    let dir = TempDir::new("hang");
    let mut s = program(&dir, "echo 'about to hang' >&2\nsleep 30");
    s.timeout = Some("500ms".parse().expect("duration"));
    let p = provider(s);
    let started = std::time::Instant::now();
    expect_transient(
        p.validate().await,
        &[
            "did not finish within",
            "process group was killed",
            "about to hang",
        ],
    );
    // Far below the program's 30s: the kill, not the program, ended the call.
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_reaped(read_pid(&dir.join("pid")));
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let dir = TempDir::new("group");
    let gpid = dir.join("gpid");
    // The background grandchild closes its stdio so only the group kill can end it.
    let mut s = program(
        &dir,
        &format!(
            "sleep 30 </dev/null >/dev/null 2>&1 &\necho $! > '{}'\nsleep 30",
            gpid.display()
        ),
    );
    s.timeout = Some("500ms".parse().expect("duration"));
    let p = provider(s);
    expect_transient(p.validate().await, &["did not finish within"]);
    assert_reaped(read_pid(&dir.join("pid")));
    assert_dies(read_pid(&gpid)).await;
}

#[tokio::test]
async fn leftovers_holding_the_pipes_are_killed_after_exit() {
    let dir = TempDir::new("leftover");
    let gpid = dir.join("gpid");
    // The program answers and exits, but its background job keeps stdout open.
    let p = provider(program(
        &dir,
        &format!("sleep 30 &\necho $! > '{}'\necho '{{}}'", gpid.display()),
    ));
    p.validate().await.expect("the response counts");
    assert_reaped(read_pid(&dir.join("pid")));
    assert_dies(read_pid(&gpid)).await;
}

#[tokio::test]
async fn a_cancelled_call_kills_the_program() {
    let dir = TempDir::new("cancel");
    let gpid = dir.join("gpid");
    let p = provider(program(
        &dir,
        &format!(
            "sleep 30 </dev/null >/dev/null 2>&1 &\necho $! > '{}.tmp'\nmv '{0}.tmp' '{0}'\nsleep 30",
            gpid.display()
        ),
    ));
    let call = p.validate();
    // Once the program and its background child run, the call is dropped (kube-node shutting
    // down, a caller's timeout): neither may be left running.
    tokio::select! {
        _ = call => panic!("the program cannot finish"),
        () = wait_for_file(&gpid) => {}
    }
    assert_dies(read_pid(&dir.join("pid"))).await;
    assert_dies(read_pid(&gpid)).await;
}

#[tokio::test]
async fn huge_stderr_is_bounded_in_the_error() {
    let dir = TempDir::new("huge-stderr");
    let p = provider(program(
        &dir,
        "head -c 8000000 /dev/zero | tr '\\0' 'x' >&2\necho ' the end' >&2\nexit 1",
    ));
    let e = expect_transient(p.validate().await, &["exited with status 1", "the end"]);
    assert!(
        e.message().len() < ERROR_STDERR_BYTES + 512,
        "message of {} bytes",
        e.message().len()
    );

    let dir = TempDir::new("huge-stdout");
    let p = provider(program(&dir, "head -c 6000000 /dev/zero | tr '\\0' 'x'"));
    let e = expect_transient(p.validate().await, &["stdout exceeded"]);
    assert!(e.message().len() < ERROR_STDERR_BYTES + 512);
}

#[tokio::test]
async fn secrets_and_tokens_are_redacted() {
    let dir = TempDir::new("redact");
    let mut s = program(
        &dir,
        r#"echo "using token $API_TOKEN" >&2
cat >&2
echo "{\"error\":{\"kind\":\"Unauthorized\",\"message\":\"token $API_TOKEN rejected\"}}""#,
    );
    s.env = vec![from_secret("API_TOKEN", "token")];
    let secret = "s3cr3t-api-token-value";
    let p = ExecProvider::new(&class(
        s.clone(),
        Some(&[("token", secret), ("other", "another-secret")]),
    ))
    .expect("valid");
    let e = p
        .create(&Conformance::default_request(CLUSTER, "u", "n"))
        .await
        .expect_err("unauthorized");
    assert_eq!(e.reason(), "Unauthorized");
    assert_eq!(e.message(), "token <redacted> rejected");

    // Non-zero exit: stderr goes into the message; it echoed the secret and the request with
    // its bootstrap token.
    let body = r#"echo "using token $API_TOKEN and another-secret" >&2
cat >&2
exit 2"#;
    let mut s2 = program(&dir, body);
    s2.env = s.env.clone();
    let p = ExecProvider::new(&class(
        s2,
        Some(&[("token", secret), ("other", "another-secret")]),
    ))
    .expect("valid");
    let req = CreateRequest {
        user_data: Some(Sensitive(
            "#cloud-config\njoin: {token: abcdef.0123456789abcdef}\n".into(),
        )),
        ..Conformance::default_request(CLUSTER, "u", "n")
    };
    let e = p.create(&req).await.expect_err("exit 2");
    let text = e.to_string();
    assert!(
        text.contains("using token <redacted> and <redacted>"),
        "{text}"
    );
    assert!(!text.contains(secret), "{text}");
    assert!(!text.contains("another-secret"), "{text}");
    assert!(!text.contains("0123456789abcdef"), "{text}");
    assert!(
        text.contains("\"idempotencyKey\":\"u\""),
        "the request was echoed: {text}"
    );
}

#[tokio::test]
async fn a_missing_program_is_invalid_config() {
    let p = provider(spec(&["/nonexistent/kube-node-exec-program"]));
    let e = p.validate().await.expect_err("missing");
    assert_eq!(e.reason(), "InvalidConfig");
    assert!(
        e.message().starts_with("spec.provider.exec.command[0]:"),
        "{e}"
    );

    let p = provider(spec(&["no-such-program-on-path-kube-node"]));
    let e = p.validate().await.expect_err("missing");
    assert!(
        e.message().starts_with("spec.provider.exec.command[0]:"),
        "{e}"
    );

    // Not executable.
    let dir = TempDir::new("noexec");
    let path = dir.join("prog.sh");
    std::fs::write(&path, "#!/bin/sh\necho '{}'\n").expect("write");
    let p = provider(spec(&[path.to_str().expect("utf-8")]));
    let e = p.validate().await.expect_err("not executable");
    assert!(
        e.message().starts_with("spec.provider.exec.command[0]:"),
        "{e}"
    );

    // A working directory that does not exist.
    let mut s = spec(&["/bin/true"]);
    s.working_dir = Some("/nonexistent/kube-node-dir".into());
    let e = provider(s).validate().await.expect_err("no dir");
    assert_eq!(e.reason(), "InvalidConfig");
    assert!(
        e.message().starts_with("spec.provider.exec.workingDir:"),
        "{e}"
    );
}

#[tokio::test]
async fn concurrency_is_bounded() {
    let dir = TempDir::new("concurrency");
    // Counts the programs running at once under a lock and records the maximum.
    let body = format!(
        r#"d='{d}'
exec 9>>"$d/lock"
flock 9
n=$(( $(cat "$d/cur" 2>/dev/null || echo 0) + 1 ))
echo $n > "$d/cur"
m=$(cat "$d/max" 2>/dev/null || echo 0)
[ "$n" -gt "$m" ] && echo $n > "$d/max"
flock -u 9
sleep 0.2
flock 9
echo $(( $(cat "$d/cur") - 1 )) > "$d/cur"
flock -u 9
echo '{{}}'"#,
        d = dir.path().display()
    );
    let mut s = program(&dir, &body);
    s.max_concurrency = Some(2);
    let p = Arc::new(provider(s));
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move { p.validate().await })
        })
        .collect();
    for c in calls {
        c.await.expect("task").expect("validate");
    }
    let max: u32 = std::fs::read_to_string(dir.join("max"))
        .expect("max")
        .trim()
        .parse()
        .expect("number");
    assert!((1..=2).contains(&max), "{max} programs ran at once");
    assert_eq!(
        std::fs::read_to_string(dir.join("cur"))
            .expect("cur")
            .trim(),
        "0"
    );
}

#[tokio::test]
async fn the_request_and_environment_are_as_documented() {
    let dir = TempDir::new("request");
    let out = dir.path().display().to_string();
    let body = format!(
        r#"cat > '{out}/request.json'
echo "$@" > '{out}/args'
env > '{out}/env'
pwd > '{out}/cwd'
echo '{{"instance":{{"id":"m-1","providerId":"exec:///z/m-1","state":"Pending","zone":"z","instanceType":"t","addresses":[{{"type":"InternalIP","address":"10.0.0.9"}}],"tags":{{"a":"b"}},"createdUnix":1700000000}}}}'"#
    );
    let mut s = program(&dir, &body);
    s.command.push("--flag".into());
    s.env = vec![plain("PLAIN", "value with spaces; $(not expanded)")];
    s.working_dir = Some(dir.path().display().to_string());
    s.config = Some(serde_json::json!({"region": "lab", "n": 3}));
    let p = provider(s);
    let req = CreateRequest {
        user_data: Some(Sensitive("#cloud-config\n".into())),
        ..Conformance::default_request(CLUSTER, "uid-1", "node-1")
    };
    let i = p.create(&req).await.expect("create");
    assert_eq!(i.id, "m-1");
    assert_eq!(i.state, kube_node_provider::InstanceState::Pending);
    assert_eq!(i.zone.as_deref(), Some("z"));
    assert_eq!(i.addresses[0].address, "10.0.0.9");
    assert_eq!(i.created_unix, Some(1_700_000_000));

    let request: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("request.json")).expect("request"))
            .expect("json");
    assert_eq!(request["protocolVersion"], "v1");
    assert_eq!(request["operation"], "create");
    assert_eq!(request["idempotencyKey"], "uid-1");
    assert_eq!(request["nodeName"], "node-1");
    assert_eq!(request["nodeClass"], CLASS);
    assert_eq!(request["clusterName"], CLUSTER);
    assert_eq!(
        request["config"],
        serde_json::json!({"region": "lab", "n": 3})
    );
    assert_eq!(request["userData"], "#cloud-config\n");
    assert_eq!(request["tags"]["kube-node.io/node-uid"], "uid-1");
    assert!(request.get("providerId").is_none());

    assert_eq!(
        std::fs::read_to_string(dir.join("args"))
            .expect("args")
            .trim(),
        "--flag create"
    );
    let env = std::fs::read_to_string(dir.join("env")).expect("env");
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    assert!(env.contains("KUBE_NODE_PROTOCOL_VERSION=v1\n"), "{env}");
    assert!(
        env.contains("PLAIN=value with spaces; $(not expanded)\n"),
        "{env}"
    );
    // Only the inherited and configured variables (sh adds PWD, SHLVL, `_` itself).
    for name in names {
        assert!(
            [
                "PATH",
                "HOME",
                "LANG",
                "PLAIN",
                "KUBE_NODE_PROTOCOL_VERSION",
                "PWD",
                "SHLVL",
                "_",
                "OLDPWD"
            ]
            .contains(&name),
            "unexpected variable {name} in the program's environment"
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("cwd"))
            .expect("cwd")
            .trim(),
        dir.path().display().to_string()
    );
}

#[tokio::test]
async fn validate_unimplemented_is_ok_and_delete_not_found_is_gone() {
    let dir = TempDir::new("lenient");
    let p = provider(program(
        &dir,
        r#"case "$1" in
validate) echo '{"error":{"kind":"Unimplemented","message":"no validate"}}' ;;
delete) echo '{"error":{"kind":"NotFound","message":"no such machine"}}' ;;
esac"#,
    ));
    p.validate().await.expect("validate is optional");
    assert_eq!(
        p.delete("exec:///z/m-1").await.expect("gone"),
        DeleteOutcome::Gone
    );
}

#[tokio::test]
async fn list_drops_machines_outside_the_filter() {
    let dir = TempDir::new("filter");
    let p = provider(program(
        &dir,
        r#"echo '{"instances":[
 {"id":"m-1","providerId":"exec:///z/m-1","state":"Running","tags":{"kube-node.io/cluster":"exec-test"}},
 {"id":"m-2","providerId":"exec:///z/m-2","state":"Running","tags":{"kube-node.io/cluster":"someone-else"}},
 {"id":"m-3","providerId":"exec:///z/m-3","state":"Running"}]}'"#,
    ));
    let list = p
        .list(&ListFilter {
            cluster: CLUSTER.into(),
            node_class: None,
        })
        .await
        .expect("list");
    assert_eq!(
        list.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        vec!["m-1"]
    );
}

#[test]
fn the_factory_builds_and_rejects() {
    let f = ExecFactory::new();
    assert_eq!(f.provider_type(), "exec");
    let p = f.build(&class(spec(&["/bin/true"]), None)).expect("builds");
    assert_eq!(p.name(), "exec");
    let e = f
        .build(&class(spec(&[]), None))
        .err()
        .expect("empty command");
    assert_eq!(
        e,
        ProviderError::InvalidConfig("spec.provider.exec.command: must not be empty".into())
    );
    let mut s = spec(&["/bin/true"]);
    s.env = vec![
        plain("A", "1"),
        from_secret("B", "present"),
        from_secret("C", "absent"),
    ];
    let e = f
        .build(&class(s, Some(&[("present", "the-secret-value")])))
        .err()
        .expect("absent key");
    assert_eq!(e.reason(), "InvalidConfig");
    assert!(
        e.message()
            .starts_with("spec.provider.exec.env[2].secretKey:"),
        "{e}"
    );
    assert!(!e.to_string().contains("the-secret-value"));
}

#[test]
fn the_example_nodeclass_parses_and_builds() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nodeclass-exec.yaml");
    let nc: kube_node_crds::NodeClass =
        serde_yaml::from_str(&std::fs::read_to_string(path).expect("example")).expect("parses");
    assert_eq!(
        nc.spec.provider.type_,
        kube_node_crds::v1alpha1::ProviderType::Exec
    );
    let exec = nc.spec.provider.exec.clone().expect("exec section");
    let resolved = kube_node_provider::ResolvedClass {
        name: "exec-lab".into(),
        generation: 1,
        spec: nc.spec,
        credentials: Some(kube_node_provider::Credentials(
            [("apiToken".to_string(), b"token-value".to_vec())].into(),
        )),
        cluster_name: CLUSTER.into(),
        inventory: None,
        claims: None,
    };
    let p = ExecProvider::new(&resolved).expect("the example is valid");
    assert_eq!(p.config().max_concurrency, 4);
    assert_eq!(p.config().timeout, Duration::from_secs(120));
    assert_eq!(exec.command[0], "python3");
}
