//! kube-node-autoscaler: cluster-autoscaler drives NodeSets through its `externalgrpc` cloud
//! provider.
//!
//! This crate owns a gRPC server implementing
//! `clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider` (the upstream
//! `externalgrpc.proto`, vendored in `proto/`) as a thin facade over NodeSets: every NodeSet
//! with `spec.minSize` and `spec.maxSize` is a node group; scaling writes the NodeSet (its
//! `/scale` subresource, or the nodeset-controller's one-write named removal); the
//! nodeset-controller and node-controller do the rest. It never talks to a cloud.
//!
//! One server answers both generations of cluster-autoscaler: the template Node is sent as
//! the `nodeInfo` message (CA <= 1.33) and as `nodeBytes` (CA >= 1.34), and option durations
//! in the legacy meta/v1 fields and in the `google.protobuf.Duration` fields.
//!
//! Transport: mutual TLS (server certificate + client CA), matching the `cert`, `key` and
//! `cacert` of CA's cloud-config; plaintext only on a loopback address and only when asked.

pub mod instances;
pub mod options;
mod service;
pub mod template;

/// The generated messages, client and server of `externalgrpc.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("clusterautoscaler.cloudprovider.v1.externalgrpc");
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::info;

pub use service::{NodeSetCloudProvider, effective_max_size};

/// PEM files of the server's TLS identity and of the CA that signs client certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate (chain), PEM.
    pub cert: PathBuf,
    /// The server certificate's private key, PEM.
    pub key: PathBuf,
    /// The CA bundle that signed the client certificate cluster-autoscaler presents (the
    /// `cert`/`key` of its cloud-config), PEM.
    pub client_ca: PathBuf,
}

/// How the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The address to listen on.
    pub addr: SocketAddr,
    /// TLS with client-certificate verification. Required unless plaintext is allowed.
    pub tls: Option<TlsFiles>,
    /// Serve without TLS; refused unless the address is a loopback address.
    pub allow_plaintext: bool,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No TLS configured, and plaintext is not allowed on this address.
    #[error(
        "refusing plaintext gRPC on {0}: configure TLS, or allow plaintext on a loopback address"
    )]
    PlaintextNotAllowed(SocketAddr),
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS configuration was rejected or the server failed.
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
}

impl Error {
    /// The PascalCase reason, for logs and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PlaintextNotAllowed(_) => "PlaintextNotAllowed",
            Self::TlsFile { .. } => "TlsFileUnreadable",
            Self::Bind { .. } => "BindFailed",
            Self::Server(_) => "ServerFailed",
        }
    }
}

impl Config {
    /// Checks the transport rules for serving on `addr`: TLS, or plaintext on loopback when
    /// allowed.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Error> {
        if self.tls.is_none() && !(self.allow_plaintext && addr.ip().is_loopback()) {
            return Err(Error::PlaintextNotAllowed(addr));
        }
        Ok(())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::TlsFile {
        path: path.to_path_buf(),
        source,
    })
}

fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig, Error> {
    let identity = Identity::from_pem(read(&files.cert)?, read(&files.key)?);
    let client_ca = Certificate::from_pem(read(&files.client_ca)?);
    Ok(ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(client_ca))
}

/// Serves the CloudProvider service on `config.addr` until `shutdown` completes.
pub async fn serve(
    client: kube::Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.check(config.addr)?;
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| Error::Bind {
            addr: config.addr,
            source,
        })?;
    serve_on(client, listener, config, shutdown).await
}

/// Serves on an already bound listener (tests bind `127.0.0.1:0`); `config.addr` is ignored,
/// the listener's address is checked instead.
pub async fn serve_on(
    client: kube::Client,
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.addr,
        source,
    })?;
    config.check(addr)?;
    let mut server = Server::builder();
    if let Some(files) = &config.tls {
        // tonic builds its rustls config with the process default provider; make it ring
        // (an error only means a provider is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        server = server.tls_config(tls_config(files)?)?;
    }
    let service =
        proto::cloud_provider_server::CloudProviderServer::new(NodeSetCloudProvider::new(client));
    info!(%addr, tls = config.tls.is_some(), "serving cluster-autoscaler externalgrpc");
    server
        .add_service(service)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_on_loopback_when_allowed() {
        let cfg = |allow, tls: bool| Config {
            addr: "127.0.0.1:1".parse().expect("addr"),
            tls: tls.then(|| TlsFiles {
                cert: "c".into(),
                key: "k".into(),
                client_ca: "ca".into(),
            }),
            allow_plaintext: allow,
        };
        let lo: SocketAddr = "127.0.0.1:8086".parse().expect("addr");
        let lo6: SocketAddr = "[::1]:8086".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:8086".parse().expect("addr");
        assert!(cfg(true, false).check(lo).is_ok());
        assert!(cfg(true, false).check(lo6).is_ok());
        assert!(matches!(
            cfg(true, false).check(any),
            Err(Error::PlaintextNotAllowed(_))
        ));
        assert!(cfg(false, false).check(lo).is_err());
        assert!(cfg(false, true).check(any).is_ok());
    }
}
