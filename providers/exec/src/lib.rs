//! The exec backend: machines made by a program of the operator's choosing (a shell script, a
//! Python tool, `terraform apply`, a vendor CLI) without recompiling kube-node.
//!
//! A NodeClass with `spec.provider.type: exec` names a command; for every provider operation
//! kube-node runs it as `command... <operation>` with a JSON request on stdin and reads one
//! JSON response from stdout. The protocol, `kube-node.io/exec-provider/v1`, is specified in
//! `providers/exec/PROTOCOL.md`; `examples/exec-provider/machines.py` is a complete reference
//! program.
//!
//! This crate owns the protocol's wire types ([`protocol`]), the validation of
//! `spec.provider.exec` ([`validate_spec`]), the process handling (no shell, a cleared
//! environment, bounded output, the timeout enforced on the whole process group, no zombies),
//! the redaction of Secret values from everything a program prints, and the mapping of
//! exit codes and malformed output to typed [`ProviderError`]s.

mod config;
pub mod protocol;
mod redact;
mod run;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;

use async_trait::async_trait;
use kube_node_crds::names::tags;
use kube_node_provider::{
    Capabilities, CreateRequest, DeleteOutcome, Instance, ListFilter, Provider, ProviderError,
    ProviderFactory, ResolvedClass, Result,
};
use tokio::sync::Semaphore;

pub use config::{
    DEFAULT_MAX_CONCURRENCY, DEFAULT_TIMEOUT, EnvVar, ExecConfig, INHERITED_ENV,
    PROTOCOL_VERSION_ENV, validate_spec,
};
pub use protocol::{Operation, PROTOCOL_NAME, PROTOCOL_VERSION};
pub use redact::{MIN_SECRET_LEN, REDACTED};
pub use run::{EXIT_GRACE, MAX_STDERR_BYTES, MAX_STDOUT_BYTES};

use protocol::{Filter, Request, Response};
use redact::{Redactor, head_chars, tail_chars};
use run::{Outcome, Run};

/// The backend's name, as in `spec.provider.type` and provider IDs (`exec:///<zone>/<id>`).
pub const PROVIDER_NAME: &str = "exec";

/// The most of stderr quoted in an error message (its tail). The whole captured tail
/// ([`MAX_STDERR_BYTES`]) goes to the debug log.
pub const ERROR_STDERR_BYTES: usize = 2 << 10;
/// The most of a program-reported error message kept.
pub const ERROR_MESSAGE_BYTES: usize = 4 << 10;
/// The most of a malformed stdout quoted in an error message (its head).
const ERROR_STDOUT_BYTES: usize = 256;

/// Builds [`ExecProvider`]s for NodeClasses of `spec.provider.type: exec`.
#[derive(Clone, Debug, Default)]
pub struct ExecFactory;

impl ExecFactory {
    /// The factory.
    pub fn new() -> Self {
        Self
    }
}

impl ProviderFactory for ExecFactory {
    fn provider_type(&self) -> &'static str {
        PROVIDER_NAME
    }

    fn build(&self, class: &ResolvedClass) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(ExecProvider::new(class)?))
    }
}

/// The exec backend bound to one NodeClass: runs its program once per operation, at most
/// `maxConcurrency` at a time.
#[derive(Debug)]
pub struct ExecProvider {
    config: ExecConfig,
    permits: Semaphore,
}

impl ExecProvider {
    /// Validates `spec.provider.exec` (see [`validate_spec`]) and binds it.
    pub fn new(class: &ResolvedClass) -> Result<Self> {
        let config = validate_spec(class)?;
        let permits = Semaphore::new(usize::try_from(config.max_concurrency).unwrap_or(1));
        Ok(Self { config, permits })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ExecConfig {
        &self.config
    }

    fn request(&self, operation: Operation) -> Request {
        Request {
            protocol_version: PROTOCOL_VERSION.to_string(),
            operation,
            cluster_name: self.config.cluster_name.clone(),
            node_class: self.config.node_class.clone(),
            config: self.config.config.clone(),
            idempotency_key: None,
            node_name: None,
            tags: None,
            user_data: None,
            provider_id: None,
            filter: None,
        }
    }

    /// Runs the program for one request and returns its response, or the typed error it
    /// reported or that its failure maps to. `subject` (a node name or provider ID) is only
    /// for logs.
    async fn call(&self, request: Request, subject: &str) -> Result<Response> {
        let op = request.operation;
        // The request's join payload and its token are as secret as the Secret's values.
        let redactor = match &request.user_data {
            Some(ud) => {
                let tokens = redact::bootstrap_tokens(ud);
                self.config
                    .redactor
                    .with(std::iter::once(ud.as_bytes()).chain(tokens.iter().map(|t| t.as_bytes())))
            }
            None => self.config.redactor.clone(),
        };
        let input = serde_json::to_vec(&request).map_err(|e| {
            ProviderError::Transient(format!("{op}: encoding the request failed: {e}"))
        })?;
        let _permit = self.permits.acquire().await.map_err(|_| {
            ProviderError::Transient(format!("{op}: the exec provider is shutting down"))
        })?;
        let run = run::run(&self.config, op, input)
            .await
            .map_err(|e| self.spawn_error(op, &e))
            .inspect_err(|e| self.log_failure(op, subject, None, e))?;
        let result = interpret(op, &run, &self.config, &redactor);
        let exit_code = match &run.outcome {
            Outcome::Exited(s) => s.code(),
            _ => None,
        };
        match &result {
            Ok(_) => tracing::debug!(
                nodeclass = %self.config.node_class,
                operation = op.as_str(),
                subject,
                pid = run.pid,
                exit_code,
                elapsed_ms = run.elapsed.as_millis() as u64,
                leftovers_killed = run.leftovers_killed,
                "ran exec provider program"
            ),
            Err(e) => self.log_failure(op, subject, Some(&run), e),
        }
        if !run.captured.stderr.is_empty() {
            tracing::debug!(
                nodeclass = %self.config.node_class,
                operation = op.as_str(),
                subject,
                stderr = %redactor.redact_tail(&run.captured.stderr, run.captured.stderr_truncated),
                "exec provider program stderr"
            );
        }
        result
    }

    fn log_failure(&self, op: Operation, subject: &str, run: Option<&Run>, e: &ProviderError) {
        tracing::warn!(
            nodeclass = %self.config.node_class,
            operation = op.as_str(),
            subject,
            pid = run.and_then(|r| r.pid),
            exit_code = run.and_then(|r| match &r.outcome {
                Outcome::Exited(s) => s.code(),
                _ => None,
            }),
            elapsed_ms = run.map(|r| r.elapsed.as_millis() as u64),
            reason = e.reason(),
            error = %e,
            "exec provider program failed"
        );
    }

    /// A program that cannot be started is a configuration error: retrying cannot help until
    /// the NodeClass (or the image kube-node runs in) changes.
    fn spawn_error(&self, op: Operation, e: &std::io::Error) -> ProviderError {
        use std::io::ErrorKind;
        if let Some(dir) = &self.config.working_dir
            && !dir.is_dir()
        {
            return ProviderError::InvalidConfig(format!(
                "spec.provider.exec.workingDir: {} is not a directory (starting the {op} \
                 program failed: {e})",
                dir.display()
            ));
        }
        let not_runnable = matches!(e.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied)
            || e.raw_os_error() == Some(nix::errno::Errno::ENOEXEC as i32);
        if not_runnable {
            ProviderError::InvalidConfig(format!(
                "spec.provider.exec.command[0]: {:?} cannot be run: {e}",
                self.config.program
            ))
        } else {
            ProviderError::Transient(format!(
                "{op}: starting {:?} failed: {e}",
                self.config.program
            ))
        }
    }

    fn malformed(op: Operation, why: impl std::fmt::Display) -> ProviderError {
        ProviderError::Transient(format!(
            "{op}: malformed response from the exec program: {why}"
        ))
    }
}

/// What a finished run means: the response, or the typed error.
fn interpret(op: Operation, run: &Run, cfg: &ExecConfig, redactor: &Redactor) -> Result<Response> {
    let c = &run.captured;
    let stderr = || {
        let text = redactor.redact_tail(&c.stderr, c.stderr_truncated);
        let text = text.trim();
        if text.is_empty() {
            String::from("; stderr was empty")
        } else {
            format!("; stderr: {}", tail_chars(text, ERROR_STDERR_BYTES))
        }
    };
    let status = match &run.outcome {
        Outcome::TimedOut => {
            return Err(ProviderError::Transient(format!(
                "{op}: the exec program did not finish within spec.provider.exec.timeout ({:?}); \
                 its process group was killed{}",
                cfg.timeout,
                stderr()
            )));
        }
        Outcome::WaitFailed(e) => {
            return Err(ProviderError::Transient(format!(
                "{op}: waiting for the exec program failed: {e}; its process group was killed{}",
                stderr()
            )));
        }
        Outcome::Exited(status) => *status,
    };
    if c.stdout_overflow {
        return Err(ProviderError::Transient(format!(
            "{op}: malformed response from the exec program: stdout exceeded {MAX_STDOUT_BYTES} \
             bytes ({}){}",
            describe(status),
            stderr()
        )));
    }
    let parsed = protocol::parse_response(&c.stdout);
    // A typed error wins whatever the exit status: programs may exit non-zero with one.
    if let Ok(Response {
        error: Some(error), ..
    }) = &parsed
    {
        let message = redactor.redact_str(error.message.as_bytes());
        let message = if message.trim().is_empty() {
            format!("the exec program reported {} for {op}", error.kind)
        } else {
            head_chars(message.trim(), ERROR_MESSAGE_BYTES)
        };
        return Err(error.into_error(message));
    }
    if !status.success() {
        return Err(ProviderError::Transient(format!(
            "{op}: the exec program {} without an error response{}",
            describe(status),
            stderr()
        )));
    }
    parsed.map_err(|why| {
        let head = redactor.redact_str(&c.stdout);
        let head = head.trim();
        let quoted = if head.is_empty() {
            String::new()
        } else {
            format!("; stdout began {:?}", head_chars(head, ERROR_STDOUT_BYTES))
        };
        ProviderError::Transient(format!(
            "{op}: malformed response from the exec program: {why}{quoted}{}",
            stderr()
        ))
    })
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => format!("ended with {status}"),
    }
}

#[async_trait]
impl Provider for ExecProvider {
    fn name(&self) -> &'static str {
        PROVIDER_NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            group_sized: false,
            // The program may front any cloud; kube-node cannot know that its list is
            // read-your-writes, so the orphan collector must allow for lag.
            eventually_consistent_list: true,
        }
    }

    async fn validate(&self) -> Result<()> {
        match self.call(self.request(Operation::Validate), "").await {
            Ok(_) => Ok(()),
            // validate is optional: a program that starts and answers is usable.
            Err(ProviderError::Unimplemented(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, request: &CreateRequest) -> Result<Instance> {
        let mut r = self.request(Operation::Create);
        r.idempotency_key = Some(request.idempotency_key.clone());
        r.node_name = Some(request.node_name.clone());
        r.tags = Some(request.tags.clone());
        r.user_data = request.user_data.as_ref().map(|s| s.0.clone());
        let resp = self.call(r, &request.node_name).await?;
        let instance = resp
            .instance
            .ok_or_else(|| Self::malformed(Operation::Create, "no \"instance\" in the response"))?
            .into_instance()
            .map_err(|why| Self::malformed(Operation::Create, why))?;
        tracing::info!(
            nodeclass = %self.config.node_class,
            node = %request.node_name,
            provider_id = %instance.provider_id,
            zone = instance.zone.as_deref(),
            instance_type = instance.instance_type.as_deref(),
            "exec program created machine"
        );
        Ok(instance)
    }

    async fn get(&self, provider_id: &str) -> Result<Instance> {
        let mut r = self.request(Operation::Get);
        r.provider_id = Some(provider_id.to_string());
        let resp = self.call(r, provider_id).await?;
        resp.instance
            .ok_or_else(|| Self::malformed(Operation::Get, "no \"instance\" in the response"))?
            .into_instance()
            .map_err(|why| Self::malformed(Operation::Get, why))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>> {
        let mut r = self.request(Operation::List);
        r.filter = Some(Filter {
            cluster: filter.cluster.clone(),
            node_class: filter.node_class.clone(),
        });
        let resp = self.call(r, "").await?;
        let wire = resp
            .instances
            .ok_or_else(|| Self::malformed(Operation::List, "no \"instances\" in the response"))?;
        let mut out = Vec::with_capacity(wire.len());
        for w in wire {
            let i = w
                .into_instance()
                .map_err(|why| Self::malformed(Operation::List, why))?;
            // The orphan collector deletes what list returns without a Node, so a program that
            // ignores the filter must not make it delete another cluster's machines.
            if !matches_filter(&i.tags, filter) {
                tracing::warn!(
                    nodeclass = %self.config.node_class,
                    provider_id = %i.provider_id,
                    "exec program listed a machine outside the filter; ignored"
                );
                continue;
            }
            out.push(i);
        }
        Ok(out)
    }

    async fn delete(&self, provider_id: &str) -> Result<DeleteOutcome> {
        let mut r = self.request(Operation::Delete);
        r.provider_id = Some(provider_id.to_string());
        let resp = match self.call(r, provider_id).await {
            Ok(resp) => resp,
            // Deleting what is gone succeeds (the contract); simple programs answer NotFound.
            Err(ProviderError::NotFound(_)) => return Ok(DeleteOutcome::Gone),
            Err(e) => return Err(e),
        };
        let deleted = resp
            .deleted
            .ok_or_else(|| Self::malformed(Operation::Delete, "no \"deleted\" in the response"))?;
        protocol::parse_deleted(&deleted).map_err(|why| Self::malformed(Operation::Delete, why))
    }
}

fn matches_filter(tags: &BTreeMap<String, String>, filter: &ListFilter) -> bool {
    tags.get(tags::CLUSTER) == Some(&filter.cluster)
        && filter
            .node_class
            .as_ref()
            .is_none_or(|class| tags.get(tags::NODE_CLASS) == Some(class))
}
