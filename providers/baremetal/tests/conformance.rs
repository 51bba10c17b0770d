//! The provider conformance suite (providers/core/src/conformance.rs) against sushy-tools and
//! openssh-server, with the in-process claim store; and the claim-store check against it.

use std::sync::Arc;
use std::time::Duration;

use kube_node_crds::NodeClassSpec;
use kube_node_crds::v1alpha1::{BaremetalProviderSpec, ProviderSpec, ProviderType};
use kube_node_provider::conformance::{self, Conformance};
use kube_node_provider::{ClaimStore, MemoryClaimStore, Provider, ProviderError, ResolvedClass};
use kube_node_provider_baremetal::BaremetalFactory;
use kube_node_provider_baremetal::testenv::Lab;

/// This test's slice of the emulated rack.
const FIRST: usize = 0;
const HOSTS: usize = 10;

fn class(lab: &Lab, claims: Arc<dyn ClaimStore>) -> ResolvedClass {
    let spec: NodeClassSpec = serde_json::from_value(serde_json::json!({
        "provider": {"type": "baremetal"},
    }))
    .expect("minimal NodeClassSpec");
    ResolvedClass {
        name: "conf".into(),
        generation: 1,
        spec: NodeClassSpec {
            provider: ProviderSpec {
                type_: ProviderType::Baremetal,
                baremetal: Some(BaremetalProviderSpec {
                    hosts: lab.hosts("conf", FIRST, HOSTS),
                    ssh_user: Some(lab.ssh_user.clone()),
                    shutdown_timeout: Some(Duration::from_secs(20).into()),
                    ..Default::default()
                }),
                ..spec.provider
            },
            ..spec
        },
        credentials: Some(lab.credentials()),
        cluster_name: "conformance".into(),
        inventory: None,
        claims: Some(claims),
    }
}

#[tokio::test]
async fn conformance_against_sushy_and_sshd() {
    let lab = Lab::shared();
    let claims: Arc<dyn ClaimStore> = Arc::new(MemoryClaimStore::new());
    let provider = BaremetalFactory::new()
        .build_baremetal(&class(lab, claims.clone()))
        .expect("build");
    // A just-started emulator may answer a first burst with a 5xx: retry what is retryable.
    let mut attempt = 0;
    loop {
        match provider.validate().await {
            Ok(()) => break,
            Err(e) if e.is_retryable() && attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("validate against sushy-tools: {e}"),
        }
    }
    let stats = provider.stats();
    let mut c = Conformance::new("conformance");
    c.node_class = Some("conf".into());
    c.unknown_provider_id = "baremetal:///rack-a/no-such-host".into();
    // The emulator applies a power change 1 to 11 s after the request.
    c.wait_gone_timeout = Duration::from_secs(60);
    c.eventual_consistency_timeout = Duration::from_secs(5);
    c.poll_interval = Duration::from_millis(500);
    let hook = provider.clone();
    c.inject_create_error = Some(Arc::new(move |e: ProviderError| {
        hook.inject_create_error(e);
        true
    }));
    let report = conformance::run_all(&provider, &c).await;
    match report.into_result() {
        Ok(r) => {
            assert!(r.skipped.is_empty(), "skipped {:?}", r.skipped);
            assert_eq!(r.passed.len(), 7, "{:?}", r.passed);
        }
        Err(failures) => panic!("the baremetal backend fails conformance: {failures:#?}"),
    }
    println!(
        "conformance: {} Redfish requests, {} SSH sessions",
        stats.redfish_requests(),
        stats.ssh_sessions()
    );
}

#[tokio::test]
async fn wrong_password_is_unauthorized_naming_the_host() {
    let lab = Lab::shared();
    let mut rc = class(lab, Arc::new(MemoryClaimStore::new()));
    let mut creds = lab.credentials();
    creds
        .0
        .insert("bmc-password".into(), b"not-the-password".to_vec());
    rc.credentials = Some(creds);
    let provider = BaremetalFactory::new().build_baremetal(&rc).expect("build");
    let e = provider
        .validate()
        .await
        .expect_err("a wrong password fails");
    assert_eq!(e.reason(), "Unauthorized", "{e}");
    assert!(e.message().contains("host conf-"), "{e}");
    assert!(!e.message().contains("not-the-password"), "{e}");
}

#[tokio::test]
async fn missing_system_is_invalid_config_naming_the_entry() {
    let lab = Lab::shared();
    let mut rc = class(lab, Arc::new(MemoryClaimStore::new()));
    let b = rc.spec.provider.baremetal.as_mut().expect("baremetal");
    b.hosts.truncate(1);
    b.hosts[0].redfish_url = format!("{}/redfish/v1/Systems/no-such-system", lab.redfish_endpoint);
    let provider = BaremetalFactory::new().build_baremetal(&rc).expect("build");
    let e = provider
        .validate()
        .await
        .expect_err("a missing system fails");
    assert_eq!(e.reason(), "InvalidConfig", "{e}");
    assert!(
        e.message()
            .contains("spec.provider.baremetal.hosts[0] (conf-00)"),
        "{e}"
    );
}

#[tokio::test]
async fn unreachable_bmc_is_transient() {
    let lab = Lab::shared();
    let mut rc = class(lab, Arc::new(MemoryClaimStore::new()));
    let b = rc.spec.provider.baremetal.as_mut().expect("baremetal");
    b.hosts.truncate(1);
    // A loopback port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    b.hosts[0].redfish_url = format!("http://127.0.0.1:{port}/redfish/v1/Systems/1");
    let provider = BaremetalFactory::new().build_baremetal(&rc).expect("build");
    let e = provider.validate().await.expect_err("no BMC answers");
    assert_eq!(e.reason(), "Transient", "{e}");
    assert!(e.is_retryable());
}

/// Prints the calls of one host's lifecycle (create with a join payload, join, delete, release),
/// and checks it against the design: three Redfish calls to bring a host up, one SSH session
/// to join it, one to reset it, and a power-state read per poll while it shuts down.
#[tokio::test]
async fn one_host_lifecycle_costs_few_calls() {
    let lab = Lab::shared();
    const FIRST_HOST: usize = 30;
    let mut rc = class(lab, Arc::new(MemoryClaimStore::new()));
    rc.spec
        .provider
        .baremetal
        .as_mut()
        .expect("baremetal")
        .hosts = lab.hosts("life", FIRST_HOST, 1);
    let provider = BaremetalFactory::new().build_baremetal(&rc).expect("build");
    if lab.power_state(FIRST_HOST).as_deref() != Some("Off") {
        lab.reset(FIRST_HOST, "ForceOff");
        tokio::time::sleep(Duration::from_secs(12)).await;
    }
    let stats = provider.stats();
    let mut req =
        Conformance::default_request("life", "00000000-0000-4000-8000-00000000life", "life-node");
    // Into this run's directory: the "host" is the machine running the test.
    let path = lab.join_config_path("life");
    req.user_data = Some(kube_node_provider::Sensitive(format!(
        "#cloud-config\nwrite_files:\n- path: {path}\n  permissions: '0600'\n  content: |\n    kind: JoinConfiguration\n    nodeRegistration:\n      name: life-node\nruncmd:\n- [kubeadm, join, --config, {path}]\n"
    )));
    let i = provider.create(&req).await.expect("create");
    let up_requests = stats.redfish_requests();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while provider.get(&i.provider_id).await.expect("get").state
        != kube_node_provider::InstanceState::Running
    {
        assert!(tokio::time::Instant::now() < deadline, "the host joins");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (joined_requests, joined_sessions) = (stats.redfish_requests(), stats.ssh_sessions());
    provider.delete(&i.provider_id).await.expect("delete");
    let mut polls = 0;
    loop {
        polls += 1;
        match provider.get(&i.provider_id).await {
            Err(ProviderError::NotFound(_)) => break,
            Ok(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(e) => panic!("{e}"),
        }
        assert!(polls < 120, "released");
    }
    println!(
        "one host lifecycle: create {up_requests} Redfish requests; joined after {joined_requests} Redfish / {joined_sessions} SSH sessions; delete + release {} Redfish ({polls} get polls at 1 s) / {} SSH sessions in all",
        stats.redfish_requests() - joined_requests,
        stats.ssh_sessions(),
    );
    assert_eq!(
        up_requests, 3,
        "GET system, PATCH boot override, POST Reset On"
    );
    assert_eq!(joined_requests, 3, "no Redfish call while joining");
    assert_eq!(
        joined_sessions, 1,
        "one SSH session joins the host (its sshd is already up)"
    );
    assert_eq!(stats.ssh_sessions(), 2, "one more resets kubeadm on delete");
}
