//! The seed scenario of `shared/guide/lab.md`, the topology most tests grow from.
//!
//! ```text
//!  [client] eth0 198.18.1.10 ─ p-client ┐
//!  [printer] eth0 198.18.1.20 ─ p-printer┤ bridge "lan" 198.18.1.1  (cafe ns: NAT router)
//!                                         └ wan 198.51.100.3 ─ p-cafe ┐
//!  [exit]    eth0 198.51.100.2, 2001:db8:1::2 ─────────────── p-exit ─┤ bridge "br0" (inet ns)
//!  [exit2]   eth0 198.51.100.6, 2001:db8:1::6 ─────────────── p-exit2 ┤ 198.51.100.1
//!  [control] eth0 198.51.100.4 ─────────────────────────── p-control ─┘ 2001:db8:1::1
//!                                                   inet "web" 203.0.113.1, 2001:db8:2::1
//!                                                                 │
//!  [web] eth0 203.0.113.10 + 203.0.113.53 (resolver), 2001:db8:2::10
//! ```
//!
//! Interface names are fixed: `eth0` in every leaf namespace, `wan` and the bridge `lan` in
//! the cafe, `br0` and `p-<role>` ports in inet, `web` for inet's side of the web link, and
//! `p-client`/`p-printer` ports on the cafe's LAN bridge.
//!
//! The `inet` namespace routes between the bridge and the web link and has no default
//! route: nothing in the lab can reach the host or its uplink (the host side of the lab is
//! never linked). The cafe LAN has no IPv6 route out (its hosts only have link-local
//! addresses, like many real hotspots), so IPv6 that leaks past a tunnel fails visibly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::cmd;
use crate::error::LabError;
use crate::lab::Lab;
use crate::netns::Netns;

/// The web server (whoami, iperf3) "on the internet".
pub const WEB_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The web server's IPv6 address.
pub const WEB6_ADDR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
/// The lab resolver address (a second address of the web namespace); every namespace's
/// `resolv.conf` names it.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// The internet's gateway address on the public bridge.
pub const INET_GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The internet's IPv6 gateway on the public bridge.
pub const INET_GW6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// The internet's address on the web link (web's default gateway).
pub const WEB_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The internet's IPv6 address on the web link.
pub const WEB_GW6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// The cafe router's public (WAN) address: what the web sees without an exit node.
pub const CAFE_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// The cafe router's LAN address (the client's gateway).
pub const CAFE_LAN_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The exit node's public address.
pub const EXIT_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The exit node's public IPv6 address.
pub const EXIT6_PUBLIC: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The second exit node's public address.
pub const EXIT2_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 6);
/// The second exit node's public IPv6 address.
pub const EXIT2_6_PUBLIC: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 6);
/// The control server's (and relay's, and STUN's) public address.
pub const CONTROL_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 4);
/// The client's address on the cafe LAN.
pub const CLIENT_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
/// The printer's address on the cafe LAN.
pub const PRINTER_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
/// The cafe LAN.
pub const CAFE_LAN_NET: &str = "198.18.1.0/24";
/// The home router's public address (only with [`SeedOptions::home_nat`]).
pub const HOME_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
/// The home router's LAN address.
pub const HOME_LAN_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// The second client's address on the home LAN.
pub const CLIENT2_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 10);
/// The home LAN.
pub const HOME_LAN_NET: &str = "198.18.2.0/24";
/// A relay of another region (a standalone `tsunagu-server relay`), for
/// [`Seed::add_public_host`].
pub const RELAY2_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// Role names of the seed's namespaces, for use with [`Seed::ns`].
pub mod role {
    /// The internet: public bridge and router.
    pub const INET: &str = "inet";
    /// Web server, iperf3 server and lab resolver.
    pub const WEB: &str = "web";
    /// The cafe's NAT router.
    pub const CAFE: &str = "cafe";
    /// The laptop in the cafe.
    pub const CLIENT: &str = "client";
    /// A host on the cafe LAN (only with [`super::SeedOptions::lan_host`]).
    pub const PRINTER: &str = "printer";
    /// The exit node.
    pub const EXIT: &str = "exit";
    /// The second exit node (only with [`super::SeedOptions::second_exit`]).
    pub const EXIT2: &str = "exit2";
    /// A home router with its own NAT (only with [`super::SeedOptions::home_nat`]).
    pub const HOME: &str = "home";
    /// A second client, behind the home NAT.
    pub const CLIENT2: &str = "client2";
    /// Control server, relay, STUN.
    pub const CONTROL: &str = "control";
}

/// The interface name used inside every leaf namespace.
pub const LEAF_IFACE: &str = "eth0";
/// The public bridge inside `inet`.
pub const INET_BRIDGE: &str = "br0";
/// The cafe's WAN interface.
pub const CAFE_WAN: &str = "wan";
/// The cafe's LAN bridge.
pub const CAFE_LAN_BRIDGE: &str = "lan";
/// The client's port on the cafe LAN bridge (in the cafe namespace).
pub const CAFE_CLIENT_PORT: &str = "p-client";
/// The nftables table the cafe's NAT lives in.
pub const CAFE_NFT_TABLE: &str = "cafe_nat";

/// Variants of the seed scenario.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeedOptions {
    /// Add a "printer" on the cafe LAN (198.18.1.20), to test LAN access.
    pub lan_host: bool,
    /// Add "exit2" (198.51.100.6), to test failover.
    pub second_exit: bool,
    /// The cafe drops UDP from its LAN to the outside (TCP still passes): relay only.
    pub cafe_blocks_udp: bool,
    /// The cafe's NAT picks a fresh random port per destination (`masquerade random`):
    /// hole punching fails. With `home_nat`, the home NAT does the same.
    pub symmetric_nat: bool,
    /// Add a home router (198.51.100.5) with its own NAT and "client2" (198.18.2.10)
    /// behind it: two clients each behind their own NAT.
    pub home_nat: bool,
}

/// The seed scenario, built by [`Lab::seed`]. Dropping it tears everything down.
#[derive(Debug)]
pub struct Seed {
    /// The lab owning the namespaces; spawn processes through it.
    pub lab: Lab,
    /// The options it was built with.
    pub opts: SeedOptions,
}

impl Seed {
    /// The namespace for `role` (see [`role`]).
    ///
    /// # Panics
    /// If the role does not exist in this variant (e.g. "printer" without `lan_host`).
    pub fn ns(&self, role: &str) -> Netns {
        self.lab.ns(role)
    }

    /// Where to capture the cafe LAN: the client's port `p-client` on the cafe's LAN
    /// bridge, in the cafe namespace.
    ///
    /// That port sees every frame the client sends or receives, including LAN traffic that
    /// the bridge switches without routing (which a capture on the bridge device itself
    /// would miss), and it is outside the client, like a real on-path observer.
    pub fn cafe_lan_iface(&self) -> (Netns, &'static str) {
        (self.ns(role::CAFE), CAFE_CLIENT_PORT)
    }

    /// Adds a host on the public bridge: the namespace `role` with `eth0` at `addr`/24
    /// and the internet's gateway as default route (a relay of another region, say).
    /// `addr` must be a free address of 198.51.100.0/24.
    pub fn add_public_host(&mut self, role: &str, addr: Ipv4Addr) -> Result<Netns, LabError> {
        let taken = [
            INET_GW,
            CAFE_PUBLIC,
            EXIT_PUBLIC,
            EXIT2_PUBLIC,
            CONTROL_PUBLIC,
            HOME_PUBLIC,
        ];
        let [a, b, c, d] = addr.octets();
        if [a, b, c] != [198, 51, 100] || d == 0 || d == 255 || taken.contains(&addr) {
            return Err(LabError::invalid(
                "address",
                format!("{addr} is not a free address of the public 198.51.100.0/24"),
            ));
        }
        let inet = self.ns(role::INET);
        let ns = self.lab.add_ns(role)?;
        attach_public(
            &mut self.lab,
            &inet,
            &ns,
            role,
            LEAF_IFACE,
            &[&format!("{addr}/24")],
        )?;
        Ok(ns)
    }

    /// The address the web server should see for traffic from `role` without any tunnel.
    pub fn public_addr(&self, role: &str) -> Option<IpAddr> {
        let v4 = match role {
            role::CLIENT | role::PRINTER | role::CAFE => CAFE_PUBLIC,
            role::EXIT => EXIT_PUBLIC,
            role::EXIT2 => EXIT2_PUBLIC,
            role::CONTROL => CONTROL_PUBLIC,
            _ => return None,
        };
        Some(IpAddr::V4(v4))
    }
}

/// The cafe's nftables ruleset.
fn cafe_ruleset(opts: SeedOptions) -> String {
    nat_ruleset(
        CAFE_NFT_TABLE,
        CAFE_LAN_NET,
        opts.symmetric_nat,
        opts.cafe_blocks_udp,
    )
}

/// A NAT router's ruleset: masquerade the LAN out of the WAN (random ports per
/// destination when `symmetric`), optionally dropping UDP from the LAN. Unsolicited
/// packets to the router itself are dropped, as home routers do: besides being
/// realistic, this keeps them from leaving a conntrack entry that would make the NAT
/// pick another port for the LAN host's own packets to the same peer (hole punching
/// would then fail by accident, not by NAT type).
fn nat_ruleset(table: &str, lan_net: &str, symmetric: bool, blocks_udp: bool) -> String {
    let masquerade = if symmetric {
        "masquerade random"
    } else {
        "masquerade"
    };
    let udp_rule = if blocks_udp {
        format!(
            "    iifname \"{CAFE_LAN_BRIDGE}\" oifname \"{CAFE_WAN}\" meta l4proto udp counter drop\n"
        )
    } else {
        String::new()
    };
    format!(
        "table ip {table} {{\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   oifname \"{CAFE_WAN}\" ip saddr {lan_net} {masquerade}\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         {udp_rule}\
         \x20 }}\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"{CAFE_WAN}\" ct state new counter drop\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Joins a leaf namespace to inet's public bridge: `p-<role>` on the bridge, `iface` in the
/// leaf with `addrs`, and default routes via the internet's gateways.
fn attach_public(
    lab: &mut Lab,
    inet: &Netns,
    leaf: &Netns,
    role: &str,
    iface: &str,
    addrs: &[&str],
) -> Result<(), LabError> {
    let port = format!("p-{role}");
    lab.link((inet, &port, &[]), (leaf, iface, addrs))?;
    inet.enslave(&port, INET_BRIDGE)?;
    leaf.set_default_route(IpAddr::V4(INET_GW))?;
    if addrs.iter().any(|a| a.contains(':')) {
        leaf.set_default_route(IpAddr::V6(INET_GW6))?;
    }
    Ok(())
}

/// Joins a leaf namespace to the cafe LAN.
fn attach_cafe_lan(
    lab: &mut Lab,
    cafe: &Netns,
    leaf: &Netns,
    role: &str,
    addr: &str,
) -> Result<(), LabError> {
    attach_lan(lab, cafe, leaf, role, addr, CAFE_LAN_GW)
}

/// Joins a leaf namespace to a router's LAN bridge, with `gw` as its default route.
fn attach_lan(
    lab: &mut Lab,
    router: &Netns,
    leaf: &Netns,
    role: &str,
    addr: &str,
    gw: Ipv4Addr,
) -> Result<(), LabError> {
    let port = format!("p-{role}");
    lab.link((router, &port, &[]), (leaf, LEAF_IFACE, &[addr]))?;
    router.enslave(&port, CAFE_LAN_BRIDGE)?;
    leaf.set_default_route(IpAddr::V4(gw))
}

/// Builds the seed scenario. On error the partially built lab is dropped, which removes
/// whatever was created.
pub(crate) fn build(test_name: &str, opts: SeedOptions) -> Result<Seed, LabError> {
    cmd::require_tool("nft", "nftables")?;
    let mut lab = Lab::new(test_name)?;

    // The internet: a bridge for the public /24 and a routed link to the web server.
    let inet = lab.add_ns(role::INET)?;
    inet.add_bridge(INET_BRIDGE)?;
    inet.add_addr(INET_BRIDGE, &format!("{INET_GW}/24"))?;
    inet.add_addr(INET_BRIDGE, &format!("{INET_GW6}/64"))?;
    inet.sysctl("net.ipv4.ip_forward", "1")?;
    inet.sysctl("net.ipv6.conf.all.forwarding", "1")?;

    let web = lab.add_ns(role::WEB)?;
    lab.link(
        (
            &inet,
            "web",
            &[&format!("{WEB_GW}/24"), &format!("{WEB_GW6}/64")],
        ),
        (
            &web,
            LEAF_IFACE,
            &[
                &format!("{WEB_ADDR}/24"),
                &format!("{RESOLVER}/24"),
                &format!("{WEB6_ADDR}/64"),
            ],
        ),
    )?;
    web.set_default_route(IpAddr::V4(WEB_GW))?;
    web.set_default_route(IpAddr::V6(WEB_GW6))?;

    // Public hosts on the bridge.
    let cafe = lab.add_ns(role::CAFE)?;
    attach_public(
        &mut lab,
        &inet,
        &cafe,
        role::CAFE,
        CAFE_WAN,
        &[&format!("{CAFE_PUBLIC}/24")],
    )?;
    let exit = lab.add_ns(role::EXIT)?;
    attach_public(
        &mut lab,
        &inet,
        &exit,
        role::EXIT,
        LEAF_IFACE,
        &[&format!("{EXIT_PUBLIC}/24"), &format!("{EXIT6_PUBLIC}/64")],
    )?;
    if opts.second_exit {
        let exit2 = lab.add_ns(role::EXIT2)?;
        attach_public(
            &mut lab,
            &inet,
            &exit2,
            role::EXIT2,
            LEAF_IFACE,
            &[
                &format!("{EXIT2_PUBLIC}/24"),
                &format!("{EXIT2_6_PUBLIC}/64"),
            ],
        )?;
    }
    let control = lab.add_ns(role::CONTROL)?;
    attach_public(
        &mut lab,
        &inet,
        &control,
        role::CONTROL,
        LEAF_IFACE,
        &[&format!("{CONTROL_PUBLIC}/24")],
    )?;

    // The cafe: a LAN bridge, IPv4 forwarding and NAT; no IPv6 forwarding.
    cafe.add_bridge(CAFE_LAN_BRIDGE)?;
    cafe.add_addr(CAFE_LAN_BRIDGE, &format!("{CAFE_LAN_GW}/24"))?;
    cafe.sysctl("net.ipv4.ip_forward", "1")?;
    cafe.sysctl("net.ipv6.conf.all.forwarding", "0")?;
    cafe.nft(&cafe_ruleset(opts))?;

    let client = lab.add_ns(role::CLIENT)?;
    attach_cafe_lan(
        &mut lab,
        &cafe,
        &client,
        role::CLIENT,
        &format!("{CLIENT_LAN}/24"),
    )?;
    if opts.lan_host {
        let printer = lab.add_ns(role::PRINTER)?;
        attach_cafe_lan(
            &mut lab,
            &cafe,
            &printer,
            role::PRINTER,
            &format!("{PRINTER_LAN}/24"),
        )?;
    }

    if opts.home_nat {
        // A second NAT'd LAN, like the cafe's (same interface names, its own namespace).
        let home = lab.add_ns(role::HOME)?;
        attach_public(
            &mut lab,
            &inet,
            &home,
            role::HOME,
            CAFE_WAN,
            &[&format!("{HOME_PUBLIC}/24")],
        )?;
        home.add_bridge(CAFE_LAN_BRIDGE)?;
        home.add_addr(CAFE_LAN_BRIDGE, &format!("{HOME_LAN_GW}/24"))?;
        home.sysctl("net.ipv4.ip_forward", "1")?;
        home.sysctl("net.ipv6.conf.all.forwarding", "0")?;
        home.nft(&nat_ruleset(
            "home_nat",
            HOME_LAN_NET,
            opts.symmetric_nat,
            false,
        ))?;
        let client2 = lab.add_ns(role::CLIENT2)?;
        attach_lan(
            &mut lab,
            &home,
            &client2,
            role::CLIENT2,
            &format!("{CLIENT2_LAN}/24"),
            HOME_LAN_GW,
        )?;
    }

    tracing::debug!(prefix = lab.prefix(), ?opts, "seed scenario built");
    Ok(Seed { lab, opts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_variants() {
        let plain = cafe_ruleset(SeedOptions::default());
        assert!(plain.contains("ip saddr 198.18.1.0/24 masquerade\n"));
        assert!(!plain.contains("udp"));
        assert!(plain.contains("iifname \"wan\" ct state new counter drop"));
        let strict = cafe_ruleset(SeedOptions {
            cafe_blocks_udp: true,
            symmetric_nat: true,
            ..SeedOptions::default()
        });
        assert!(strict.contains("masquerade random"));
        assert!(strict.contains("meta l4proto udp counter drop"));
    }

    #[test]
    fn constants_match_the_plan() {
        assert_eq!(WEB6_ADDR.to_string(), "2001:db8:2::10");
        assert_eq!(INET_GW6.to_string(), "2001:db8:1::1");
        assert_eq!(EXIT2_6_PUBLIC.to_string(), "2001:db8:1::6");
        for ip in [
            WEB_ADDR,
            RESOLVER,
            CAFE_PUBLIC,
            EXIT_PUBLIC,
            CLIENT_LAN,
            PRINTER_LAN,
            HOME_PUBLIC,
            CLIENT2_LAN,
        ] {
            assert!(crate::is_lab_addr(IpAddr::V4(ip)));
        }
    }
}
