//! Mutual TLS as cluster-autoscaler's externalgrpc cloud-config sets it up, and the plaintext
//! rules.

mod common;

use std::path::Path;
use std::time::Duration;

use kube::CustomResourceExt;
use kube_node_autoscaler::proto::NodeGroupsRequest;
use kube_node_autoscaler::proto::cloud_provider_client::CloudProviderClient;
use kube_node_autoscaler::{Config, Error, TlsFiles, serve, serve_on};
use kube_node_crds::v1alpha1::{NodeClass, NodeSet};
use kube_node_embedded_api::EmbeddedApi;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    rogue_client: (String, String),
}

fn leaf(
    issuer: &CertifiedIssuer<'_, KeyPair>,
    cn: &str,
    sans: Vec<String>,
    eku: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(sans).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![eku];
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn new_ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
}

fn pki() -> Pki {
    let ca = new_ca("kube-node test CA");
    let rogue = new_ca("someone else's CA");
    Pki {
        ca_pem: ca.pem(),
        server: leaf(
            &ca,
            "kube-node",
            vec!["localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(
            &ca,
            "cluster-autoscaler",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        rogue_client: leaf(
            &rogue,
            "cluster-autoscaler",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    }
}

fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p
}

async fn channel(
    port: u16,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{port}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn call(ch: Result<Channel, String>) -> Result<usize, String> {
    let mut c = CloudProviderClient::new(ch?);
    c.node_groups(NodeGroupsRequest {})
        .await
        .map(|r| r.into_inner().node_groups.len())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn mutual_tls() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let files = TlsFiles {
        cert: write(dir.path(), "tls.crt", &pki.server.0),
        key: write(dir.path(), "tls.key", &pki.server.1),
        client_ca: write(dir.path(), "ca.crt", &pki.ca_pem),
    };
    let api = EmbeddedApi::new();
    api.register_crd(&NodeClass::crd()).expect("crd");
    api.register_crd(&NodeSet::crd()).expect("crd");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let config = Config {
        addr: listener.local_addr().expect("addr"),
        tls: Some(files),
        allow_plaintext: false,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(api.client(), listener, config, async {
        let _ = stopped.await;
    }));

    // A client certificate signed by the configured CA: served.
    assert_eq!(
        call(channel(port, &pki.ca_pem, Some(&pki.client)).await).await,
        Ok(0)
    );
    // No client certificate: refused (at the handshake or on the first call).
    let no_cert = call(channel(port, &pki.ca_pem, None).await).await;
    assert!(no_cert.is_err(), "{no_cert:?}");
    // A client certificate from another CA: refused.
    let rogue = call(channel(port, &pki.ca_pem, Some(&pki.rogue_client)).await).await;
    assert!(rogue.is_err(), "{rogue:?}");
    // Plaintext to the TLS port: refused.
    let plain = CloudProviderClient::connect(format!("http://127.0.0.1:{port}")).await;
    if let Ok(mut c) = plain {
        assert!(c.node_groups(NodeGroupsRequest {}).await.is_err());
    }

    let _ = stop.send(());
    server.await.expect("join").expect("server stopped cleanly");
}

#[tokio::test]
async fn plaintext_refused_off_loopback_and_unless_allowed() {
    let api = EmbeddedApi::new();
    let off_loopback = Config {
        addr: "0.0.0.0:0".parse().expect("addr"),
        tls: None,
        allow_plaintext: true,
    };
    let err = serve(api.client(), off_loopback, async {})
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::PlaintextNotAllowed(_)), "{err}");
    let not_allowed = Config {
        addr: "127.0.0.1:0".parse().expect("addr"),
        tls: None,
        allow_plaintext: false,
    };
    let err = serve(api.client(), not_allowed, async {})
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), "PlaintextNotAllowed");
    // Missing TLS files are reported, not panicked on.
    let missing = Config {
        addr: "127.0.0.1:0".parse().expect("addr"),
        tls: Some(TlsFiles {
            cert: "/nonexistent/tls.crt".into(),
            key: "/nonexistent/tls.key".into(),
            client_ca: "/nonexistent/ca.crt".into(),
        }),
        allow_plaintext: false,
    };
    let err = serve(api.client(), missing, async {})
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), "TlsFileUnreadable");
}
