//! Running external commands with a deadline.
//!
//! The lab drives `ip`, `nft`, `tcpdump`, `ping` and friends. `std::process::Command::output`
//! waits forever, and a hung helper would hang the whole test binary (and CI), so every
//! command here runs under a deadline and is killed by its PID when it overstays.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::LabError;

/// Deadline for the short administrative commands the lab runs itself (`ip`, `nft`).
pub(crate) const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline for [`crate::Netns::exec`] and [`crate::Netns::exec_status`]: long enough for a
/// short iperf3 run, short enough that a hung command cannot stall CI for long.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// Renders an argv as a shell-like command line for error messages; arguments with spaces
/// or quotes are single-quoted so the line can be pasted into a shell.
pub(crate) fn display_argv<S: AsRef<str>>(argv: &[S]) -> String {
    let mut out = String::new();
    for (i, arg) in argv.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let arg = arg.as_ref();
        let plain = !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%[]".contains(c));
        if plain {
            out.push_str(arg);
        } else {
            out.push('\'');
            out.push_str(&arg.replace('\'', r"'\''"));
            out.push('\'');
        }
    }
    out
}

/// Looks an executable up in `PATH` (or a conventional default when `PATH` is unset), the
/// way `execvp` would. Used to report a missing tool as [`LabError::MissingTool`] up front
/// instead of as an obscure exit code from `ip netns exec`.
pub fn which(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_exec(p))
}

/// Fails with [`LabError::MissingTool`] unless `tool` is installed.
pub(crate) fn require_tool(tool: &str, package: &str) -> Result<(), LabError> {
    match which(tool) {
        Some(_) => Ok(()),
        None => Err(LabError::MissingTool {
            tool: tool.to_owned(),
            package: package.to_owned(),
        }),
    }
}

/// Runs `argv` to completion (or until `timeout`), feeding it `stdin`, and returns its output
/// whatever the exit status.
pub(crate) fn run_status<S: AsRef<str>>(
    argv: &[S],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, LabError> {
    let cmd_line = display_argv(argv);
    let Some((program, args)) = argv.split_first() else {
        return Err(LabError::invalid("command", "empty argv"));
    };
    let mut child = Command::new(program.as_ref())
        .args(args.iter().map(AsRef::as_ref))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            cmd: cmd_line.clone(),
            source,
        })?;

    // Readers on their own threads so a chatty child cannot fill a pipe and deadlock us.
    let stdout_rx = drain(child.stdout.take());
    let stderr_rx = drain(child.stderr.take());
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // The inputs are small scripts (nft rulesets); a failed write means the child died
        // early, which its exit status and stderr will explain better than EPIPE.
        let _ = pipe.write_all(data);
    }

    let deadline = Instant::now() + timeout;
    let status = match wait_until(&mut child, deadline) {
        Ok(Some(status)) => status,
        Ok(None) => {
            kill_and_reap(&mut child);
            return Err(LabError::Timeout {
                cmd: cmd_line,
                timeout,
            });
        }
        Err(source) => {
            kill_and_reap(&mut child);
            return Err(LabError::io(format!("waiting for `{cmd_line}`"), source));
        }
    };
    // A grandchild that inherited the pipes could keep them open after the child exits;
    // collect what we can within the deadline and do not wait beyond it.
    let grace = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let stdout = stdout_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = stderr_rx.recv_timeout(grace).unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run_status`] but a non-zero exit becomes [`LabError::Command`].
pub(crate) fn run_checked<S: AsRef<str>>(
    argv: &[S],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, LabError> {
    let output = run_status(argv, stdin, timeout)?;
    check(display_argv(argv), output)
}

/// Turns an unsuccessful [`Output`] into [`LabError::Command`].
pub(crate) fn check(cmd: String, output: Output) -> Result<Output, LabError> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(command_error(
            cmd,
            output.status,
            &output.stdout,
            &output.stderr,
        ))
    }
}

/// Builds a [`LabError::Command`] from raw output.
pub(crate) fn command_error(
    cmd: String,
    status: ExitStatus,
    stdout: &[u8],
    stderr: &[u8],
) -> LabError {
    LabError::Command {
        cmd,
        status,
        stderr: String::from_utf8_lossy(stderr).trim().to_owned(),
        stdout: String::from_utf8_lossy(stdout).trim().to_owned(),
    }
}

/// Reads a pipe to its end on a helper thread; the result arrives on the channel. If the
/// thread cannot be started (or there is no pipe) the sender is dropped and the receiver
/// sees an empty stream, which is better than failing a command that otherwise worked.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        let _ = thread::Builder::new()
            .name("lab-cmd-pipe".into())
            .spawn(move || {
                let mut buf = Vec::new();
                // A read error leaves a partial buffer, which is still the best we have.
                let _ = pipe.read_to_end(&mut buf);
                let _ = tx.send(buf);
            });
    }
    rx
}

/// Polls `child` until it exits or `deadline` passes (`Ok(None)`), backing off from 1 ms to
/// 20 ms so that the many short `ip` commands return quickly without burning a core.
pub(crate) fn wait_until(
    child: &mut Child,
    deadline: Instant,
) -> std::io::Result<Option<ExitStatus>> {
    let mut step = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(step.min(deadline - now));
        step = (step * 2).min(Duration::from_millis(20));
    }
}

/// SIGKILLs `child` by its PID and reaps it, bounded: a child stuck in uninterruptible
/// sleep is left behind rather than hanging the caller.
pub(crate) fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = wait_until(child, Instant::now() + Duration::from_secs(2));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_when_needed() {
        assert_eq!(
            display_argv(&["ip", "-n", "x", "addr", "add", "198.51.100.1/24"]),
            "ip -n x addr add 198.51.100.1/24"
        );
        assert_eq!(
            display_argv(&["sh", "-c", "echo it's"]),
            r"sh -c 'echo it'\''s'"
        );
        assert_eq!(display_argv(&["a", ""]), "a ''");
    }

    #[test]
    fn runs_and_reports_failures() {
        let out = run_checked(&["sh", "-c", "printf hi"], None, ADMIN_TIMEOUT);
        assert_eq!(out.map(|o| o.stdout).ok(), Some(b"hi".to_vec()));

        let err = run_checked(&["sh", "-c", "echo boom >&2; exit 3"], None, ADMIN_TIMEOUT)
            .expect_err("must fail");
        match err {
            LabError::Command {
                cmd,
                status,
                stderr,
                ..
            } => {
                assert_eq!(cmd, "sh -c 'echo boom >&2; exit 3'");
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "boom");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn feeds_stdin() {
        let out = run_checked(&["cat"], Some(b"table ip x {}\n"), ADMIN_TIMEOUT).expect("cat runs");
        assert_eq!(out.stdout, b"table ip x {}\n");
    }

    #[test]
    fn times_out_and_kills() {
        let started = Instant::now();
        let err = run_status(&["sleep", "30"], None, Duration::from_millis(200))
            .expect_err("must time out");
        assert!(matches!(err, LabError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run_status(&["/nonexistent/tsunagu-lab-tool"], None, ADMIN_TIMEOUT)
            .expect_err("must fail");
        assert!(matches!(err, LabError::Spawn { .. }), "{err:?}");
        assert!(which("tsunagu-lab-no-such-tool").is_none());
        assert!(which("sh").is_some());
    }
}
