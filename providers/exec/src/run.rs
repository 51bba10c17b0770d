//! Running the program once: no shell, its own process group, a cleared environment, the
//! request on stdin, bounded capture of stdout and stderr, the timeout enforced by killing the
//! whole group, and the child always reaped.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio::time::Instant;

use crate::config::{ExecConfig, INHERITED_ENV, PROTOCOL_VERSION_ENV};
use crate::protocol::{Operation, PROTOCOL_VERSION};

/// The most stdout kept: a list response of a few thousand machines fits.
pub const MAX_STDOUT_BYTES: usize = 4 << 20;
/// The most stderr kept (its tail: the end of a log says what failed).
pub const MAX_STDERR_BYTES: usize = 64 << 10;
/// How long stdout/stderr may stay open after the program exited. Past it, whatever is left
/// of the program's process group (a background job holding the pipes) is killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(1);
/// How long reaping a killed program, and draining its pipes after the kill, may take.
const AFTER_KILL: Duration = Duration::from_secs(5);
/// `PATH` when kube-node itself has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What the program printed, bounded.
#[derive(Debug, Default)]
pub(crate) struct Captured {
    /// The first [`MAX_STDOUT_BYTES`] of stdout.
    pub stdout: Vec<u8>,
    /// Stdout was longer than [`MAX_STDOUT_BYTES`].
    pub stdout_overflow: bool,
    /// The last [`MAX_STDERR_BYTES`] of stderr.
    pub stderr: Vec<u8>,
    /// Stderr was longer than [`MAX_STDERR_BYTES`] (its start was dropped).
    pub stderr_truncated: bool,
}

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The program exited (and was reaped).
    Exited(ExitStatus),
    /// The timeout passed; the process group was killed.
    TimedOut,
    /// Waiting for the program failed; the process group was killed.
    WaitFailed(io::Error),
}

/// One finished run.
#[derive(Debug)]
pub(crate) struct Run {
    /// The program's pid (its process group id), for logs.
    pub pid: Option<u32>,
    pub outcome: Outcome,
    pub captured: Captured,
    /// Processes of the group outlived the program holding its pipes and were killed.
    pub leftovers_killed: bool,
    pub elapsed: Duration,
}

/// Kills the program's process group on drop unless disarmed: a cancelled call (the caller's
/// future dropped mid-run) must not leave the program and its children running.
struct GroupKill {
    pgid: Option<Pid>,
    armed: bool,
}

impl GroupKill {
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // ESRCH (the group is already gone) is the outcome we want anyway.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

/// Builds the command: argv without a shell, a cleared environment, its own process group.
fn command(cfg: &ExecConfig, op: Operation) -> Command {
    let mut cmd = Command::new(&cfg.program);
    cmd.args(&cfg.args).arg(op.as_str()).env_clear();
    for name in INHERITED_ENV {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        } else if name == "PATH" {
            cmd.env(name, DEFAULT_PATH);
        }
    }
    for var in &cfg.env {
        cmd.env(&var.name, &var.value);
    }
    cmd.env(PROTOCOL_VERSION_ENV, PROTOCOL_VERSION);
    if let Some(dir) = &cfg.working_dir {
        cmd.current_dir(dir);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The group lets a timeout kill the program's children too (a shell script's
        // `terraform apply`); kill_on_drop is the backstop that also has tokio reap it.
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// Runs the program for `op` with `input` on stdin. `Err` only when it could not be started.
pub(crate) async fn run(cfg: &ExecConfig, op: Operation, input: Vec<u8>) -> io::Result<Run> {
    let started = Instant::now();
    let deadline = started + cfg.timeout;
    let mut child = command(cfg, op).spawn()?;
    let pid = child.id();
    let mut group = GroupKill {
        pgid: pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw),
        armed: true,
    };
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let mut captured = Captured::default();
    let mut exited: Option<io::Result<ExitStatus>> = None;
    let mut timed_out = false;
    let mut leftovers_killed = false;
    {
        let io = capture(stdin, input, stdout, stderr, &mut captured);
        tokio::pin!(io);
        let mut io_done = false;
        let mut grace_until = deadline;
        loop {
            if io_done && exited.is_some() {
                break;
            }
            tokio::select! {
                () = &mut io, if !io_done => io_done = true,
                status = child.wait(), if exited.is_none() => {
                    exited = Some(status);
                    grace_until = Instant::now() + EXIT_GRACE;
                }
                () = tokio::time::sleep_until(deadline), if exited.is_none() => {
                    timed_out = true;
                    break;
                }
                () = tokio::time::sleep_until(grace_until), if exited.is_some() && !io_done => {
                    // The program exited but something it started still holds its stdout or
                    // stderr: the operation is over, so the rest of the group goes too.
                    leftovers_killed = true;
                    break;
                }
            }
        }
        let failed_wait = matches!(exited, Some(Err(_)));
        if timed_out || leftovers_killed || failed_wait {
            group.kill();
        }
        if timed_out {
            // Reap the killed leader so no zombie stays behind. SIGKILL cannot be caught; only
            // a process stuck in the kernel outlives the bound, and kill_on_drop reaps it later.
            exited = tokio::time::timeout(AFTER_KILL, child.wait()).await.ok();
        }
        if !io_done {
            // The pipes close as the killed group dies; what arrived until then is kept so the
            // error can show the end of stderr.
            let _ = tokio::time::timeout(AFTER_KILL, &mut io).await;
        }
    }
    // Once the leader is reaped its pid may be reused, so the group is not signalled again.
    if matches!(exited, Some(Ok(_))) {
        group.armed = false;
    }
    let outcome = match exited {
        _ if timed_out => Outcome::TimedOut,
        Some(Ok(status)) => Outcome::Exited(status),
        Some(Err(e)) => Outcome::WaitFailed(e),
        None => Outcome::WaitFailed(io::Error::other("the program did not exit")),
    };
    Ok(Run {
        pid,
        outcome,
        captured,
        leftovers_killed,
        elapsed: started.elapsed(),
    })
}

/// Writes the request and closes stdin while reading stdout and stderr, all at once: a program
/// may print before it has read all its input.
async fn capture(
    stdin: Option<ChildStdin>,
    input: Vec<u8>,
    stdout: Option<impl AsyncRead + Unpin>,
    stderr: Option<impl AsyncRead + Unpin>,
    captured: &mut Captured,
) {
    let Captured {
        stdout: out,
        stdout_overflow,
        stderr: err,
        stderr_truncated,
    } = captured;
    let write = async move {
        if let Some(mut pipe) = stdin {
            // A program that does not read its request closes the pipe (EPIPE); its response
            // decides the outcome, so a write error is not one.
            if let Err(e) = pipe.write_all(&input).await {
                tracing::trace!(error = %e, "exec program did not read its whole request");
            }
            let _ = pipe.shutdown().await;
        }
    };
    let read_out = async {
        if let Some(mut pipe) = stdout {
            read_head(&mut pipe, out, MAX_STDOUT_BYTES, stdout_overflow).await;
        }
    };
    let read_err = async {
        if let Some(mut pipe) = stderr {
            read_tail(&mut pipe, err, MAX_STDERR_BYTES, stderr_truncated).await;
        }
    };
    tokio::join!(write, read_out, read_err);
}

/// Reads to EOF keeping the first `cap` bytes; the rest is drained so the program never blocks
/// on a full pipe.
async fn read_head(
    r: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    cap: usize,
    over: &mut bool,
) {
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let room = cap.saturating_sub(buf.len());
        if n > room {
            *over = true;
        }
        buf.extend_from_slice(&chunk[..n.min(room)]);
    }
}

/// Reads to EOF keeping the last `cap` bytes.
async fn read_tail(
    r: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    cap: usize,
    cut: &mut bool,
) {
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        // Trim in batches so a chatty program costs amortised O(1) per byte.
        if buf.len() > 2 * cap {
            buf.drain(..buf.len() - cap);
            *cut = true;
        }
    }
    if buf.len() > cap {
        buf.drain(..buf.len() - cap);
        *cut = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn head_and_tail_are_bounded() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (mut buf, mut over) = (Vec::new(), false);
        read_head(&mut data.as_slice(), &mut buf, 1000, &mut over).await;
        assert_eq!(buf, data[..1000]);
        assert!(over);
        let (mut buf, mut cut) = (Vec::new(), false);
        read_tail(&mut data.as_slice(), &mut buf, 1000, &mut cut).await;
        assert_eq!(buf, data[data.len() - 1000..]);
        assert!(cut);
        let (mut buf, mut cut) = (Vec::new(), false);
        read_tail(&mut b"short".as_slice(), &mut buf, 1000, &mut cut).await;
        assert_eq!(buf, b"short");
        assert!(!cut);
    }
}
