//! The lab's error type.
//!
//! Lab failures are almost always environmental (a missing tool, a kernel feature, a typo in
//! an address), and the person reading a failed CI log needs the exact command line and what
//! it printed on stderr to fix it without rerunning. Every variant therefore carries enough
//! context to be understood on its own.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::lab::ProcId;

/// Everything that can go wrong while building or using a lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A command ran and exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The full command line, including any `ip netns exec NAME` prefix.
        cmd: String,
        /// How it exited.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
        /// Its standard output, trimmed (some tools report errors there).
        stdout: String,
    },

    /// A command could not be started at all.
    #[error("could not start `{cmd}`: {source}")]
    Spawn {
        /// The command line that was attempted.
        cmd: String,
        /// The error from `fork`/`exec`.
        #[source]
        source: io::Error,
    },

    /// A command did not finish in time; it was killed (by PID).
    #[error("`{cmd}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The command line.
        cmd: String,
        /// The limit that was exceeded.
        timeout: Duration,
    },

    /// Something awaited did not happen in time.
    #[error("{what}: not within {within:?}")]
    NotWithin {
        /// What was awaited.
        what: String,
        /// How long it was given.
        within: Duration,
    },

    /// A file-system or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path or address involved.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A raw system call (setns, flock, kill, ...) failed.
    #[error("{context}: {source}")]
    Sys {
        /// What was being done.
        context: String,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },

    /// A caller passed something the lab refuses (bad name, address outside the lab's
    /// ranges, foreign namespace, ...).
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which kind of argument.
        what: &'static str,
        /// Why it was refused.
        detail: String,
    },

    /// The lab needs root: creating namespaces and veths requires CAP_SYS_ADMIN/CAP_NET_ADMIN.
    #[error("the lab must run as root (needs CAP_SYS_ADMIN and CAP_NET_ADMIN); euid is {euid}")]
    NotRoot {
        /// The effective uid we run as.
        euid: u32,
    },

    /// A tool the lab shells out to is not installed.
    #[error("required tool `{tool}` is not in PATH (install the Debian package `{package}`)")]
    MissingTool {
        /// Executable name.
        tool: String,
        /// Debian package that provides it.
        package: String,
    },

    /// `add_ns` was called twice with the same role.
    #[error("namespace role `{0}` already exists in this lab")]
    DuplicateRole(String),

    /// A [`ProcId`] that this lab did not hand out.
    #[error("unknown process {0:?}")]
    UnknownProcess(ProcId),

    /// A non-terminating signal was sent to a process that has already exited.
    #[error("process {id:?} (pid {pid}) has already exited ({status})")]
    ProcessExited {
        /// The lab's handle.
        id: ProcId,
        /// Its former PID.
        pid: u32,
        /// How it exited.
        status: ExitStatus,
    },

    /// A process did not exit after SIGKILL within the bounded wait (stuck in the kernel).
    #[error("process {id:?} (pid {pid}) did not exit within {waited:?} after SIGKILL")]
    ProcessStuck {
        /// The lab's handle.
        id: ProcId,
        /// Its PID.
        pid: u32,
        /// How long we waited.
        waited: Duration,
    },

    /// Something started but did not become ready in time (e.g. tcpdump never said
    /// "listening on").
    #[error("{what} did not become ready within {timeout:?}: {detail}")]
    NotReady {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        timeout: Duration,
        /// Whatever diagnostics we have (log contents, exit status).
        detail: String,
    },

    /// An HTTP exchange made by [`crate::http_get`] failed after the connection was made.
    #[error("HTTP exchange with {peer} failed: {detail}")]
    Http {
        /// The server.
        peer: SocketAddr,
        /// What went wrong.
        detail: String,
    },

    /// A path that should exist (e.g. a capture file) does not.
    #[error("missing file {0}")]
    MissingFile(PathBuf),
}

impl LabError {
    /// Wraps an [`io::Error`] with a description of what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps an errno with a description of what was being done.
    pub(crate) fn sys(context: impl Into<String>, source: nix::errno::Errno) -> Self {
        LabError::Sys {
            context: context.into(),
            source,
        }
    }

    /// Builds an [`LabError::Invalid`].
    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        LabError::Invalid {
            what,
            detail: detail.into(),
        }
    }
}
