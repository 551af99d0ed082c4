//! A tailnet of `tsunagud` daemons in the lab, configured by files (no control server).
//!
//! Used by the integration tests, the benchmark and the demo: each node gets a key, a
//! tailnet address (100.64.0.N, fd7a:115c:a1e0::N) and a config file naming every other
//! node as a peer; nodes with a public address get it as their endpoint, nodes behind a
//! NAT get none (their peers learn where they are from their first handshake).

use crate::{Lab, LabError, Netns, ProcId, Signal};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tsunagu_proto::NodePrivate;

/// The port every lab node listens on (Tailscale's).
pub const NODE_PORT: u16 = 41641;
/// Tunnel interface name used in the lab.
pub const TUN: &str = "tsunagu0";

/// One node of the lab tailnet.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// Namespace role it runs in.
    pub role: String,
    pub key: NodePrivate,
    /// Tailnet addresses.
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Public address peers can reach it on, if any.
    pub public: Option<IpAddr>,
    /// Offers to be an exit node.
    pub exit: bool,
}

/// Per-start choices of one node.
#[derive(Debug, Clone, Default)]
pub struct NodeOpts {
    /// Name (or tailnet IP) of the exit node to use.
    pub exit_node: Option<String>,
    pub allow_lan: bool,
    /// Tunnel MTU (default: the daemon's).
    pub mtu: Option<u16>,
    /// Peers (by name) that may *not* use this node as their exit node; all others may.
    pub refuse_exit_to: Vec<String>,
}

/// The nodes of a lab tailnet and the daemon binary that runs them.
#[derive(Debug, Clone)]
pub struct Tailnet {
    pub tsunagud: PathBuf,
    pub nodes: Vec<Node>,
}

impl Tailnet {
    pub fn new(tsunagud: impl Into<PathBuf>) -> Self {
        Tailnet {
            tsunagud: tsunagud.into(),
            nodes: Vec::new(),
        }
    }

    /// Add a node; its tailnet addresses are 100.64.0.N and fd7a:115c:a1e0::N, N counting
    /// from 1 in order of addition.
    pub fn add(&mut self, name: &str, role: &str, public: Option<IpAddr>, exit: bool) -> &Node {
        let n = u8::try_from(self.nodes.len() + 1).expect("fewer than 255 lab nodes");
        self.nodes.push(Node {
            name: name.into(),
            role: role.into(),
            key: NodePrivate::generate(),
            ip4: Ipv4Addr::new(100, 64, 0, n),
            ip6: Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, u16::from(n)),
            public,
            exit,
        });
        self.nodes.last().expect("just pushed")
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no lab node {name:?}"))
    }

    /// The config file text for `name`.
    pub fn config(&self, name: &str, opts: &NodeOpts) -> String {
        let me = self.node(name);
        let mut s = String::new();
        let _ = writeln!(s, "name = {:?}", me.name);
        let _ = writeln!(s, "private_key = {:?}", me.key.to_base64());
        let _ = writeln!(s, "addresses = [\"{}/32\", \"{}/128\"]", me.ip4, me.ip6);
        let _ = writeln!(s, "listen_port = {NODE_PORT}");
        let _ = writeln!(s, "tun = {TUN:?}");
        if let Some(mtu) = opts.mtu {
            let _ = writeln!(s, "mtu = {mtu}");
        }
        let _ = writeln!(s, "advertise_exit_node = {}", me.exit);
        let _ = writeln!(
            s,
            "exit_node = {:?}",
            opts.exit_node.as_deref().unwrap_or("")
        );
        let _ = writeln!(s, "exit_node_allow_lan_access = {}", opts.allow_lan);
        for peer in self.nodes.iter().filter(|n| n.name != name) {
            let _ = writeln!(s, "\n[[peer]]\nname = {:?}", peer.name);
            let _ = writeln!(s, "public_key = {:?}", peer.key.public().to_string());
            if let Some(ip) = peer.public {
                let _ = writeln!(
                    s,
                    "endpoint = {:?}",
                    SocketAddr::new(ip, NODE_PORT).to_string()
                );
            }
            let _ = writeln!(
                s,
                "allowed_ips = [\"{}/32\", \"{}/128\"]",
                peer.ip4, peer.ip6
            );
            let _ = writeln!(s, "offers_exit_node = {}", peer.exit);
            let may = !opts.refuse_exit_to.contains(&peer.name);
            let _ = writeln!(s, "may_use_exit_node = {may}");
            if me.public.is_none() {
                // Behind a NAT: keep the mapping alive.
                let _ = writeln!(s, "persistent_keepalive = 25");
            }
        }
        s
    }

    fn paths(lab: &Lab, name: &str) -> (PathBuf, PathBuf) {
        (
            lab.log_path(&format!("{name}.toml")),
            lab.log_path(&format!("{name}.log")),
        )
    }

    /// Write the node's config and start its daemon; returns once the daemon reports it is
    /// running (tunnel, routes and NAT in place).
    pub fn start(&self, lab: &mut Lab, name: &str, opts: &NodeOpts) -> Result<ProcId, LabError> {
        let node = self.node(name);
        let ns = lab.ns(&node.role);
        let (config, log) = Self::paths(lab, name);
        write(&config, &self.config(name, opts))?;
        let before = count_in(&log, "running");
        let bin = self.tsunagud.to_string_lossy().into_owned();
        let cfg = config.to_string_lossy().into_owned();
        let id = lab.spawn(&ns, &[&bin, "--config", &cfg], Some(&log))?;
        wait_log(lab, id, &log, "running", before)?;
        Ok(id)
    }

    /// Rewrite the node's config and make the running daemon reload it (SIGHUP).
    pub fn reload(
        &self,
        lab: &mut Lab,
        id: ProcId,
        name: &str,
        opts: &NodeOpts,
    ) -> Result<(), LabError> {
        let (config, log) = Self::paths(lab, name);
        write(&config, &self.config(name, opts))?;
        let before = count_in(&log, "configuration reloaded");
        lab.kill(id, Signal::SIGHUP)?;
        wait_log(lab, id, &log, "configuration reloaded", before)
    }

    /// The daemon's log so far (for failure messages).
    pub fn log(&self, lab: &Lab, name: &str) -> String {
        std::fs::read_to_string(Self::paths(lab, name).1).unwrap_or_default()
    }

    /// The namespace the node runs in.
    pub fn ns(&self, lab: &Lab, name: &str) -> Netns {
        lab.ns(&self.node(name).role)
    }
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(|e| LabError::io(format!("writing {}", path.display()), e))
}

fn count_in(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .map(|s| s.matches(needle).count())
        .unwrap_or(0)
}

/// How long a daemon may take to start or reload.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

fn wait_log(
    lab: &mut Lab,
    id: ProcId,
    log: &Path,
    needle: &str,
    before: usize,
) -> Result<(), LabError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if count_in(log, needle) > before {
            return Ok(());
        }
        let text = || std::fs::read_to_string(log).unwrap_or_default();
        if let Some(status) = lab.try_wait(id)? {
            return Err(LabError::invalid(
                "tsunagud",
                format!("exited with {status} before {needle:?}; log:\n{}", text()),
            ));
        }
        if Instant::now() > deadline {
            return Err(LabError::invalid(
                "tsunagud",
                format!("no {needle:?} within {READY_TIMEOUT:?}; log:\n{}", text()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
