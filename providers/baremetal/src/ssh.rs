//! SSH to a host's OS with russh (pure Rust, no `ssh` binary): the host key is pinned, so a
//! host that presents any other key is refused before authentication, and nothing is ever
//! "trusted on first use".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};

/// Why an SSH step failed. Messages carry no key material and no command output that could
/// echo a token.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// Nothing answers on the address, or the connection broke (the host may be booting).
    #[error("cannot reach {0}: {1}")]
    Unreachable(String, String),
    /// The host presented a key other than the pinned one.
    #[error("{0} presented SSH host key {1}, not the pinned key: refused")]
    HostKeyMismatch(String, String),
    /// The user key was refused.
    #[error("{0} refused the SSH key of user {1}")]
    AuthFailed(String, String),
    /// The command ran and failed.
    #[error("{what} on {addr} exited with status {status}")]
    Failed {
        /// The address.
        addr: String,
        /// Which step.
        what: String,
        /// Its exit status.
        status: u32,
    },
}

struct Pinned {
    expected: PublicKey,
    mismatch: Arc<AtomicBool>,
    presented: Arc<std::sync::Mutex<Option<String>>>,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            // Host certificates are not configured for any host: refuse them too.
            self.mismatch.store(true, Ordering::SeqCst);
            return Ok(false);
        };
        let ok = key.key_data() == self.expected.key_data();
        if !ok {
            self.mismatch.store(true, Ordering::SeqCst);
            if let Ok(mut p) = self.presented.lock() {
                *p = Some(key.fingerprint(Default::default()).to_string());
            }
        }
        Ok(ok)
    }
}

/// How to reach one host.
#[derive(Clone)]
pub struct Target {
    /// `host:port`.
    pub addr: String,
    /// The pinned host key.
    pub host_key: PublicKey,
    /// The login.
    pub user: String,
    /// The user key.
    pub key: Arc<PrivateKey>,
}

/// An authenticated session.
pub struct Session {
    handle: client::Handle<Pinned>,
    addr: String,
}

/// Parses an OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
pub fn parse_public_key(line: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(line.trim()).map_err(|_| "is not an OpenSSH public key".to_string())
}

/// Parses an OpenSSH private key (unencrypted).
pub fn parse_private_key(pem: &str) -> Result<PrivateKey, String> {
    russh::keys::decode_secret_key(pem, None)
        .map_err(|_| "is not an unencrypted OpenSSH private key".to_string())
}

/// Connects and authenticates within `timeout`.
pub async fn connect(t: &Target, timeout: Duration) -> Result<Session, SshError> {
    let config = Arc::new(client::Config {
        inactivity_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    });
    let mismatch = Arc::new(AtomicBool::new(false));
    let presented = Arc::new(std::sync::Mutex::new(None));
    let handler = Pinned {
        expected: t.host_key.clone(),
        mismatch: mismatch.clone(),
        presented: presented.clone(),
    };
    let connected =
        tokio::time::timeout(timeout, client::connect(config, t.addr.as_str(), handler))
            .await
            .map_err(|_| SshError::Unreachable(t.addr.clone(), "timed out".into()))?;
    let mut handle = match connected {
        Ok(h) => h,
        Err(e) => {
            if mismatch.load(Ordering::SeqCst) {
                let fp = presented
                    .lock()
                    .ok()
                    .and_then(|p| p.clone())
                    .unwrap_or_else(|| "(a certificate)".into());
                return Err(SshError::HostKeyMismatch(t.addr.clone(), fp));
            }
            return Err(SshError::Unreachable(t.addr.clone(), e.to_string()));
        }
    };
    let hash = handle
        .best_supported_rsa_hash()
        .await
        .map_err(|e| SshError::Unreachable(t.addr.clone(), e.to_string()))?
        .flatten();
    let auth = tokio::time::timeout(
        timeout,
        handle.authenticate_publickey(
            t.user.clone(),
            PrivateKeyWithHashAlg::new(t.key.clone(), hash),
        ),
    )
    .await
    .map_err(|_| SshError::Unreachable(t.addr.clone(), "authentication timed out".into()))?
    .map_err(|e| SshError::Unreachable(t.addr.clone(), e.to_string()))?;
    if !auth.success() {
        return Err(SshError::AuthFailed(t.addr.clone(), t.user.clone()));
    }
    Ok(Session {
        handle,
        addr: t.addr.clone(),
    })
}

impl Session {
    /// Runs `command` (through the login shell), feeding `stdin`, within `timeout`. Output is
    /// drained and dropped: it may echo what was fed (a join payload).
    pub async fn run(
        &self,
        what: &str,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), SshError> {
        let addr = self.addr.clone();
        let unreachable = |e: russh::Error| SshError::Unreachable(addr.clone(), e.to_string());
        let fut = async {
            let mut ch = self
                .handle
                .channel_open_session()
                .await
                .map_err(unreachable)?;
            ch.exec(true, command).await.map_err(unreachable)?;
            if let Some(data) = stdin {
                ch.data(data).await.map_err(unreachable)?;
            }
            ch.eof().await.map_err(unreachable)?;
            let mut status = None;
            while let Some(msg) = ch.wait().await {
                if let russh::ChannelMsg::ExitStatus { exit_status } = msg {
                    status = Some(exit_status);
                }
            }
            match status {
                Some(0) => Ok(()),
                Some(s) => Err(SshError::Failed {
                    addr: addr.clone(),
                    what: what.to_string(),
                    status: s,
                }),
                None => Err(SshError::Unreachable(
                    addr.clone(),
                    format!("{what}: the channel closed without an exit status"),
                )),
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| SshError::Unreachable(self.addr.clone(), format!("{what} timed out")))?
    }

    /// Ends the session.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}
