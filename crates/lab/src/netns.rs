//! A handle on one named network namespace.

use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Output;
use std::thread;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::addr::{Cidr, ensure_lab_addr, ensure_lab_route};
use crate::cmd::{self, ADMIN_TIMEOUT, DEFAULT_EXEC_TIMEOUT};
use crate::error::LabError;

/// Where `ip netns` keeps its bind-mounted namespace files.
pub(crate) const NETNS_RUN_DIR: &str = "/run/netns";

/// Where `ip netns exec` looks for per-namespace overrides of `/etc` files.
pub(crate) const NETNS_ETC_DIR: &str = "/etc/netns";

/// A named network namespace (`/run/netns/NAME`).
///
/// It is a plain name, cheap to clone and `Send`, so tests can hand it to threads. It does
/// not own the namespace: the [`crate::Lab`] that created it deletes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Netns {
    /// The namespace's name as `ip netns list` shows it.
    pub name: String,
}

impl Netns {
    /// A handle for an existing namespace name.
    pub fn new(name: impl Into<String>) -> Self {
        Netns { name: name.into() }
    }

    /// The namespace file, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// The directory whose files `ip netns exec` bind-mounts over `/etc`
    /// (`/etc/netns/NAME`); the lab puts a `resolv.conf` there.
    pub fn etc_dir(&self) -> PathBuf {
        PathBuf::from(NETNS_ETC_DIR).join(&self.name)
    }

    /// Runs `argv` inside the namespace via `ip netns exec` (so it also sees the namespace's
    /// `/etc/netns/NAME/resolv.conf`) and waits for it, at most [`DEFAULT_EXEC_TIMEOUT`].
    /// A non-zero exit is an error carrying the command line and its stderr.
    pub fn exec(&self, argv: &[&str]) -> Result<Output, LabError> {
        self.exec_timeout(argv, DEFAULT_EXEC_TIMEOUT)
    }

    /// Like [`Netns::exec`] with an explicit deadline.
    pub fn exec_timeout(&self, argv: &[&str], timeout: Duration) -> Result<Output, LabError> {
        let full = self.exec_argv(argv)?;
        cmd::run_checked(&full, None, timeout)
    }

    /// Runs `argv` inside the namespace and returns its output whatever the exit code (for
    /// commands whose failure is the expected result, like a ping that must not pass).
    /// Errors only when it cannot run or overstays [`DEFAULT_EXEC_TIMEOUT`].
    pub fn exec_status(&self, argv: &[&str]) -> Result<Output, LabError> {
        self.exec_status_timeout(argv, DEFAULT_EXEC_TIMEOUT)
    }

    /// Like [`Netns::exec_status`] with an explicit deadline.
    pub fn exec_status_timeout(
        &self,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output, LabError> {
        let full = self.exec_argv(argv)?;
        cmd::run_status(&full, None, timeout)
    }

    /// `ip netns exec NAME argv...`, after checking that the program exists: otherwise
    /// `ip` would report it only as exit status 255.
    pub(crate) fn exec_argv<'a>(&'a self, argv: &[&'a str]) -> Result<Vec<&'a str>, LabError> {
        let Some(program) = argv.first() else {
            return Err(LabError::invalid("command", "empty argv"));
        };
        cmd::require_tool(program, package_for(program))?;
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(argv);
        Ok(full)
    }

    /// Runs `f` on a fresh thread that has entered this namespace and returns its result.
    ///
    /// Only the network namespace is entered (`setns(CLONE_NEWNET)` on `/run/netns/NAME`),
    /// so the closure shares memory, files and the mount namespace with the caller; sockets
    /// it creates belong to this namespace for their whole life, even when used later from
    /// other threads. That is how the in-process services and clients work. Name lookups
    /// inside `f` still read the host's `/etc/resolv.conf`: use literal addresses.
    ///
    /// A fresh thread is used because the calling thread's namespace must not change (test
    /// harness threads are reused). A panic inside `f` is propagated to the caller.
    pub fn run<F, R>(&self, f: F) -> Result<R, LabError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        let ns_file = File::open(&path)
            .map_err(|e| LabError::io(format!("opening namespace {}", path.display()), e))?;
        let name = &self.name;
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name("lab-netns".into())
                .spawn_scoped(scope, move || {
                    setns(&ns_file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                        LabError::sys(format!("setns into network namespace {name}"), e)
                    })?;
                    drop(ns_file);
                    Ok(f())
                })
                .map_err(|e| LabError::io("spawning a namespace thread", e))?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `ip -n NAME args...` from the host. `ip -n` only switches its own network
    /// namespace, which is cheaper than `ip netns exec` and enough for configuration.
    pub fn ip(&self, args: &[&str]) -> Result<Output, LabError> {
        let mut argv = vec!["ip", "-n", self.name.as_str()];
        argv.extend_from_slice(args);
        cmd::run_checked(&argv, None, ADMIN_TIMEOUT)
    }

    /// Adds `cidr` (e.g. `198.51.100.1/24`) to `iface`. IPv6 addresses are added with
    /// `nodad`, so they are usable at once instead of "tentative" for a second or two.
    pub fn add_addr(&self, iface: &str, cidr: &str) -> Result<(), LabError> {
        let parsed: Cidr = cidr.parse()?;
        ensure_lab_addr(parsed.addr, "address")?;
        let text = parsed.to_string();
        let mut args = vec!["addr", "add", text.as_str(), "dev", iface];
        if parsed.is_ipv6() {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// Brings `iface` up.
    pub fn set_up(&self, iface: &str) -> Result<(), LabError> {
        self.ip(&["link", "set", "dev", iface, "up"]).map(drop)
    }

    /// Creates a bridge named `name` (STP off, so ports forward as soon as they are up) and
    /// brings it up.
    pub fn add_bridge(&self, name: &str) -> Result<(), LabError> {
        crate::lab::validate_ifname(name)?;
        self.ip(&[
            "link",
            "add",
            "name",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
        ])?;
        self.set_up(name)
    }

    /// Makes `port` a port of `bridge`.
    pub fn enslave(&self, port: &str, bridge: &str) -> Result<(), LabError> {
        self.ip(&["link", "set", "dev", port, "master", bridge, "up"])
            .map(drop)
    }

    /// Adds a route to `dest` (`default` or a CIDR) via the gateway `via`; the address
    /// family follows `via`.
    pub fn add_route(&self, dest: &str, via: IpAddr) -> Result<(), LabError> {
        ensure_lab_route(dest)?;
        ensure_lab_addr(via, "gateway")?;
        let via = via.to_string();
        let family = if via.contains(':') { "-6" } else { "-4" };
        self.ip(&[family, "route", "add", dest, "via", via.as_str()])
            .map(drop)
    }

    /// Adds a default route via `via` (IPv4 or IPv6).
    pub fn set_default_route(&self, via: IpAddr) -> Result<(), LabError> {
        self.add_route("default", via)
    }

    /// Sets a sysctl of this namespace, e.g. `net.ipv4.ip_forward` = `1`.
    ///
    /// Written from a thread inside the namespace (see [`Netns::run`]): `/proc/sys/net`
    /// shows the network namespace of the thread that opens it, and this avoids depending
    /// on procps' `sysctl` and a process spawn per setting.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        if key.is_empty() || key.contains("..") || key.starts_with('.') || key.contains('/') {
            return Err(LabError::invalid("sysctl key", key));
        }
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?
            .map_err(|e| LabError::io(format!("{}: writing {}", self.name, path.display()), e))
    }

    /// Reads a sysctl of this namespace (see [`Netns::sysctl`]).
    pub fn sysctl_get(&self, key: &str) -> Result<String, LabError> {
        if key.is_empty() || key.contains("..") || key.starts_with('.') || key.contains('/') {
            return Err(LabError::invalid("sysctl key", key));
        }
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.run(|| std::fs::read_to_string(&path))?
            .map(|s| s.trim().to_owned())
            .map_err(|e| LabError::io(format!("{}: reading {}", self.name, path.display()), e))
    }

    /// Loads an nftables script (`nft -f -`) into this namespace. Rulesets are per
    /// namespace, so this never touches the host's firewall.
    pub fn nft(&self, script: &str) -> Result<(), LabError> {
        cmd::require_tool("nft", "nftables")?;
        let argv = ["ip", "netns", "exec", self.name.as_str(), "nft", "-f", "-"];
        cmd::run_checked(&argv, Some(script.as_bytes()), ADMIN_TIMEOUT).map(drop)
    }

    /// PIDs of all processes whose network namespace is this one (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<u32>, LabError> {
        let out = cmd::run_checked(
            &["ip", "netns", "pids", self.name.as_str()],
            None,
            ADMIN_TIMEOUT,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }
}

/// The Debian package that provides a tool, for [`LabError::MissingTool`] messages.
pub(crate) fn package_for(tool: &str) -> &str {
    match tool.rsplit('/').next().unwrap_or(tool) {
        "ip" | "bridge" | "ss" => "iproute2",
        "nft" => "nftables",
        "ping" => "iputils-ping",
        "wg" => "wireguard-tools",
        other => other,
    }
}
