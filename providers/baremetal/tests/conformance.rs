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
    provider
        .validate()
        .await
        .expect("validate against sushy-tools");
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
