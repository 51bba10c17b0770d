//! Test support for the moto EC2 emulator: start a server, make a network in it.
//!
//! `tests/emulators/moto.sh install` puts moto into the repository's `.venv/`;
//! `tests/run.sh` starts one server for the whole run and exports `KUBE_NODE_MOTO_ENDPOINT`.
//! [`MotoServer::from_env_or_spawn`] uses that server, or starts a private one (stopped when
//! dropped, or when the process exits). Only loopback addresses are used.
//!
//! Never build an `aws` NodeClass without a credentials Secret in a test: the SDK's default
//! chain would then query the instance metadata service, which is not on loopback.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::emulator_clients;

/// The environment variable naming a running moto server (`http://127.0.0.1:PORT`).
pub const ENDPOINT_ENV: &str = "KUBE_NODE_MOTO_ENDPOINT";

/// The region tests use.
pub const REGION: &str = "us-east-1";

/// A moto server: one named by [`ENDPOINT_ENV`], or one this process started.
#[derive(Debug)]
pub struct MotoServer {
    endpoint: String,
    child: Option<Child>,
}

impl MotoServer {
    /// The server named by `KUBE_NODE_MOTO_ENDPOINT`, else a private one from
    /// `<repo>/.venv/bin/moto_server` (with AMI validation on).
    pub fn from_env_or_spawn(repo_root: &Path) -> Result<Self, String> {
        match std::env::var(ENDPOINT_ENV) {
            Ok(url) if !url.is_empty() => Ok(Self {
                endpoint: url,
                child: None,
            }),
            _ => Self::spawn(repo_root, true),
        }
    }

    /// Starts a private server on a free loopback port and waits (at most 30 s) until it
    /// listens. `ami_validation` sets `MOTO_ENABLE_AMI_VALIDATION` (RunInstances then rejects
    /// unknown AMIs as EC2 does). The server stops when this value is dropped, or when the
    /// process exits (it watches its stdin pipe).
    pub fn spawn(repo_root: &Path, ami_validation: bool) -> Result<Self, String> {
        let bin: PathBuf = repo_root.join(".venv/bin/moto_server");
        if !bin.exists() {
            return Err(format!(
                "moto is not installed ({} is missing): run tests/emulators/moto.sh install, or \
                 set {ENDPOINT_ENV} to a running moto server",
                bin.display()
            ));
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free loopback port: {e}"))?
            .port();
        let child = Command::new("sh")
            .arg("-c")
            .arg(
                r#""$0" -H 127.0.0.1 -p "$1" >/dev/null 2>&1 & p=$!; cat >/dev/null; kill $p; wait $p"#,
            )
            .arg(&bin)
            .arg(port.to_string())
            .env(
                "MOTO_ENABLE_AMI_VALIDATION",
                if ami_validation { "true" } else { "false" },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let server = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "moto_server did not listen on port {port} within 30 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Closing stdin makes the wrapper shell kill moto and exit.
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// A network made in moto for a test: two subnets in two zones, a security group, an AMI.
#[derive(Clone, Debug)]
pub struct MotoNetwork {
    /// One of moto's built-in AMIs.
    pub ami: String,
    /// Subnets in `us-east-1a` and `us-east-1b`.
    pub subnets: Vec<String>,
    /// A security group of the VPC.
    pub security_group: String,
}

/// Makes a VPC (10.0.0.0/16, emulated only: no traffic goes anywhere), two subnets, a security
/// group, and picks an AMI, in the moto server at `endpoint`.
pub async fn setup_network(endpoint: &str) -> Result<MotoNetwork, String> {
    let client = emulator_clients(endpoint, REGION).ec2;
    let vpc = client
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .map_err(|e| format!("CreateVpc: {e:?}"))?;
    let vpc_id = vpc
        .vpc()
        .and_then(|v| v.vpc_id())
        .ok_or("CreateVpc returned no id")?
        .to_string();
    let mut subnets = Vec::new();
    for (cidr, zone) in [("10.0.1.0/24", "us-east-1a"), ("10.0.2.0/24", "us-east-1b")] {
        let s = client
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(cidr)
            .availability_zone(zone)
            .send()
            .await
            .map_err(|e| format!("CreateSubnet: {e:?}"))?;
        subnets.push(
            s.subnet()
                .and_then(|s| s.subnet_id())
                .ok_or("CreateSubnet returned no id")?
                .to_string(),
        );
    }
    let sg = client
        .create_security_group()
        .group_name(format!("kube-node-{vpc_id}"))
        .description("kube-node test")
        .vpc_id(&vpc_id)
        .send()
        .await
        .map_err(|e| format!("CreateSecurityGroup: {e:?}"))?;
    Ok(MotoNetwork {
        ami: moto_ami(&client).await?,
        subnets,
        security_group: sg
            .group_id()
            .ok_or("CreateSecurityGroup returned no id")?
            .to_string(),
    })
}

/// One of moto's built-in AMIs: a known id of its default set (fast), else the first image
/// owned by amazon (moto lists about 1300 of those, which takes seconds).
async fn moto_ami(client: &aws_sdk_ec2::Client) -> Result<String, String> {
    const KNOWN: &str = "ami-1e749f67";
    if let Ok(out) = client.describe_images().image_ids(KNOWN).send().await
        && out.images().iter().any(|i| i.image_id() == Some(KNOWN))
    {
        return Ok(KNOWN.to_string());
    }
    let images = client
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .map_err(|e| format!("DescribeImages: {e:?}"))?;
    images
        .images()
        .iter()
        .find_map(|i| i.image_id())
        .map(str::to_string)
        .ok_or_else(|| "moto lists no AMI owned by amazon".to_string())
}
