//! The engine: a [`Device`] plus the kernel state around it, driven by network maps.
//!
//! Start-up order matters for leaks and for crash recovery:
//! 1. remove leftovers of a crashed run (our rules, our table, our NAT table);
//! 2. create the TUN and the UDP socket (marked, so policy routing lets it out);
//! 3. start the device (packets can flow as soon as routes exist);
//! 4. install routes and rules (the exit-node default only with its fail-closed guard);
//! 5. when serving as exit node, install the NAT table and turn forwarding on.
//!
//! [`Engine::shutdown`] undoes 4 and 5 and stops the device. A crash leaves 4 and 5 in
//! place on purpose: with an exit node selected, traffic stays blocked (fail closed)
//! until the daemon is back, and its start-up cleans up. After a reboot nothing is left;
//! a daemon with an exit node in its settings calls [`block_internet`] before it has a
//! map, and step 4 converges from that block.

use crate::device::Device;
use crate::filter::Filter;
use crate::os::host::host_nets;
use crate::os::nat::{self, ExitNat, ExitNatConfig, NatError};
use crate::os::route::{self, RouteConfig, RouteError, RouteManager, RouteState};
use crate::scope::{self, HostNets};
use crate::tun::{TunDevice, TunError};
use crate::udp::{UdpError, UdpSock};
use ipnet::IpNet;
use std::sync::Arc;
use tsunagu_proto::{NetMap, NetMapError};

/// Local settings of the engine (not part of the network map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub tun_name: String,
    /// UDP port; 0 picks a free one.
    pub listen_port: u16,
    /// Mark on our own packets, exempting them from the tunnel routes.
    pub fwmark: u32,
    pub route_table: u32,
    pub rule_priority_base: u32,
    pub nat_table: String,
    /// Start standing by (a standby host of an exit node: see `Device::set_standby`).
    pub standby: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            tun_name: "tsunagu0".into(),
            listen_port: 41641,
            fwmark: route::DEFAULT_FWMARK,
            route_table: route::DEFAULT_TABLE,
            rule_priority_base: route::DEFAULT_RULE_PRIORITY_BASE,
            nat_table: nat::DEFAULT_TABLE.into(),
            standby: false,
        }
    }
}

/// Why the engine could not start or take a map.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("network map refused: {0}")]
    Map(#[from] NetMapError),
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error(transparent)]
    Udp(#[from] UdpError),
    #[error("routing: {0}")]
    Route(#[from] RouteError),
    #[error("exit-node NAT: {0}")]
    Nat(#[from] NatError),
    #[error("starting the packet threads: {0}")]
    Threads(#[source] std::io::Error),
}

/// A running node data plane.
pub struct Engine {
    cfg: EngineConfig,
    map: NetMap,
    device: Device,
    routes: Option<RouteManager>,
    nat: Option<ExitNat>,
    port: u16,
    /// The host's own networks when last looked at (closed to what we forward).
    host: HostNets,
}

fn route_state(map: &NetMap) -> RouteState {
    // The node's resolver lives on the tun too (see `route::SERVICE_IPV4`).
    let mut addresses = map.self_node.addresses.clone();
    addresses.push(IpNet::from(std::net::IpAddr::V4(route::SERVICE_IPV4)));
    RouteState {
        addresses,
        peer_routes: map
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect(),
        exit_node: map.exit_node.is_some(),
        block_internet: map.exit_node_blocked,
        allow_lan_access: map.exit_node_allow_lan_access,
        mtu: map.mtu,
    }
}

fn nat_config(cfg: &EngineConfig, map: &NetMap, host: &HostNets) -> ExitNatConfig {
    let allowed_sources: Vec<IpNet> = map
        .peers
        .iter()
        .filter(|p| p.exit_client)
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect();
    let granted = Filter::new(
        map.packet_filter.as_deref(),
        &map.self_node.addresses,
        Some(host),
    )
    .explicit_grants();
    ExitNatConfig {
        table: cfg.nat_table.clone(),
        tun_ifname: cfg.tun_name.clone(),
        allowed_sources,
        own_addresses: map.self_node.addresses.clone(),
        closed: scope::closed_nets(host),
        granted,
        tun_mtu: map.mtu,
    }
}

fn route_config(cfg: &EngineConfig) -> RouteConfig {
    RouteConfig {
        table: cfg.route_table,
        fwmark: cfg.fwmark,
        rule_priority_base: cfg.rule_priority_base,
        tun_ifname: cfg.tun_name.clone(),
    }
}

/// Fail closed before there is a map: block internet traffic (our rules and the
/// `unreachable default` of table 52, the LAN kept with `allow_lan_access`) without a
/// tun. A daemon with an exit node in its settings calls this at start, before it
/// contacts the server: after a reboot on a network that blocks the server, nothing
/// leaves directly. [`Engine::start`] with a map that uses (or still blocks for) the
/// exit node converges from it without a gap; [`unblock`] removes it.
pub fn block_internet(cfg: &EngineConfig, allow_lan_access: bool) -> Result<(), EngineError> {
    RouteManager::new(route_config(cfg))?.block_without_tun(allow_lan_access)?;
    Ok(())
}

/// Remove our rules and routes ([`block_internet`]'s, or a crashed run's) while no
/// engine runs: the user stopped the node or logged out.
pub fn unblock(cfg: &EngineConfig) -> Result<(), EngineError> {
    route::cleanup_stale(&route_config(cfg))?;
    Ok(())
}

impl Engine {
    pub fn start(cfg: EngineConfig, map: &NetMap) -> Result<Engine, EngineError> {
        map.validate()?;
        let route_cfg = route_config(&cfg);
        // A previous run that used an exit node left its fail-closed rules and
        // `unreachable default` behind on purpose (crash, or a stop that kept the block).
        // If this map blocks the internet too, converge from them instead of removing
        // them first: removing would open a window in which traffic leaves directly.
        if map.exit_node.is_none() && !map.exit_node_blocked {
            route::cleanup_stale(&route_cfg)?;
        }
        ExitNat::remove_stale(&cfg.nat_table)?;

        let tun = TunDevice::create(&cfg.tun_name, map.mtu)?;
        let udp = UdpSock::bind_port(cfg.listen_port, Some(cfg.fwmark))?;
        let port = udp
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(cfg.listen_port);
        // After the tun exists, so that it is left out by name.
        let host = host_nets(&cfg.tun_name);
        let device = Device::start_standby(map, &host, Arc::new(tun), udp, cfg.standby)
            .map_err(EngineError::Threads)?;
        let mut engine = Engine {
            cfg,
            map: map.clone(),
            device,
            routes: None,
            nat: None,
            port,
            host,
        };
        let mut routes = RouteManager::new(route_cfg)?;
        if let Err(e) = routes.apply(&route_state(map)) {
            let _ = routes.cleanup();
            return Err(e.into());
        }
        engine.routes = Some(routes);
        if map.self_node.serve_exit {
            match ExitNat::install(&nat_config(&engine.cfg, map, &engine.host)) {
                Ok(nat) => engine.nat = Some(nat),
                Err(e) => {
                    engine.shutdown();
                    return Err(e.into());
                }
            }
        }
        Ok(engine)
    }

    /// Take a new network map. An invalid map is refused and the running one kept.
    pub fn apply(&mut self, map: &NetMap) -> Result<(), EngineError> {
        map.validate()?;
        // Routes before peers when an exit node goes away (so no packet is sent to a peer
        // that no longer takes it), peers before routes when one comes (so the default
        // route never points at a tunnel without its peer). Either order is leak-free:
        // the tunnel drops what it cannot route.
        if map.self_node.serve_exit {
            self.host = host_nets(&self.cfg.tun_name);
        }
        let adding_exit = map.exit_node.is_some() && self.map.exit_node.is_none();
        if adding_exit {
            self.device.apply(map, &self.host);
        }
        if let Some(routes) = self.routes.as_mut() {
            routes.apply(&route_state(map))?;
        }
        if !adding_exit {
            self.device.apply(map, &self.host);
        }
        match (map.self_node.serve_exit, self.nat.as_mut()) {
            (true, Some(nat)) => nat.update(&nat_config(&self.cfg, map, &self.host))?,
            (true, None) => {
                self.nat = Some(ExitNat::install(&nat_config(&self.cfg, map, &self.host))?)
            }
            (false, Some(_)) => {
                if let Some(nat) = self.nat.take() {
                    nat.remove()?;
                }
            }
            (false, None) => {}
        }
        self.map = map.clone();
        Ok(())
    }

    pub fn map(&self) -> &NetMap {
        &self.map
    }

    /// Look at the host's networks again (an address came or went: DHCP, a new LAN) and,
    /// when serving as exit node and they changed, close the new ones to forwarding.
    /// Call it now and then; cheap when nothing changed.
    pub fn refresh_host(&mut self) -> Result<(), EngineError> {
        if !self.map.self_node.serve_exit {
            return Ok(());
        }
        let host = host_nets(&self.cfg.tun_name);
        if host == self.host {
            return Ok(());
        }
        tracing::info!(addresses = ?host.addrs, subnets = ?host.subnets, "the host's networks changed");
        self.host = host;
        self.device.apply(&self.map, &self.host);
        if let Some(nat) = self.nat.as_mut() {
            nat.update(&nat_config(&self.cfg, &self.map, &self.host))?;
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The UDP port in use (useful with `listen_port = 0`).
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// Whether this map keeps internet traffic away from the physical network (an exit
    /// node in use, or chosen but unusable).
    pub fn blocks_direct_internet(&self) -> bool {
        self.map.exit_node.is_some() || self.map.exit_node_blocked
    }

    /// Stop for a restart: like [`Engine::shutdown`], except that while an exit node is
    /// in use (or blocked) the rules and the `unreachable default` stay, so nothing
    /// leaves directly until the next start converges from them (or `cleanup_stale`
    /// runs). The routes through the tun go with the tun.
    pub fn stop_keeping_block(&mut self) {
        if !self.blocks_direct_internet() {
            return self.shutdown();
        }
        if let Some(nat) = self.nat.take()
            && let Err(e) = nat.remove()
        {
            tracing::error!("removing exit-node NAT: {e}");
        }
        if self.routes.take().is_some() {
            tracing::info!("leaving the fail-closed rules in place until the next start");
        }
        self.device.stop_threads();
    }

    /// Remove our NAT table, rules and routes, and stop the packet path. Errors are
    /// logged: shutdown goes on with the rest.
    pub fn shutdown(&mut self) {
        if let Some(nat) = self.nat.take()
            && let Err(e) = nat.remove()
        {
            tracing::error!("removing exit-node NAT: {e}");
        }
        if let Some(routes) = self.routes.take()
            && let Err(e) = routes.cleanup()
        {
            tracing::error!("removing routes and rules: {e}");
        }
        self.device.stop_threads();
    }
}
