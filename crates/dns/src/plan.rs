//! Where a query the client does not answer itself goes.
//!
//! | situation | default upstream | split DNS routes |
//! |---|---|---|
//! | exit node in use, offering DoH | its `/dns-query` (or the tailnet's resolvers marked `UseWithExitNode`) | only resolvers marked `UseWithExitNode` |
//! | exit node in use, no DoH | the tailnet's resolvers, else its fallback ones, else the OS's (through the tunnel; never link-local ones) | all |
//! | exit node chosen but unusable | nothing: SERVFAIL (fails closed, like the rest of the traffic) | nothing |
//! | no exit node | the tailnet's resolvers (override local DNS), else the OS's, else the fallback ones | all |
//!
//! Tailscale's clients decide the same way (`dnsConfigForNetmap`), so a member sees the
//! same behaviour with either client. DoH resolvers on the internet (`https://`) are not
//! supported by tsunagud's forwarder and are skipped.

use crate::resolvconf::Nameserver;
use hickory_proto::rr::Name;
use std::net::{IpAddr, SocketAddr};
use tsunagu_proto::tailcfg::{CapabilityVersion, DNSConfig, Node, Resolver};

/// The capability version from which a node serves DNS over HTTPS at its PeerAPI when
/// it is an exit node (added in 25; Go clients check `>= 26`).
pub const PEERAPI_DNS_CAPVER: CapabilityVersion = CapabilityVersion(26);

/// Where to send a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Plain DNS (UDP, TCP when truncated). A link-local address carries its interface
    /// name in `zone`.
    Dns {
        addr: SocketAddr,
        zone: Option<String>,
    },
    /// DNS over HTTP (an exit node's PeerAPI, over the tunnel).
    Doh(String),
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Forward(Vec<Upstream>),
    /// An exit node is chosen but unusable: answer SERVFAIL, send nothing.
    FailClosed,
    /// Nothing to ask: SERVFAIL.
    NoUpstream,
}

/// The exit node as far as DNS cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitUse {
    None,
    /// Chosen but unusable (revoked, offline under `auto:any`, ...).
    Blocked,
    /// In use; its DoH URL if it offers one.
    InUse {
        doh: Option<String>,
    },
}

/// The routing of every name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub default: Route,
    /// Longest suffix first.
    pub routes: Vec<(Name, Route)>,
}

/// A tailnet resolver as an upstream (`None`: a kind tsunagud does not speak).
pub fn upstream(r: &Resolver) -> Option<Upstream> {
    let a = r.addr.trim();
    if a.starts_with("http://") {
        return Some(Upstream::Doh(a.to_string()));
    }
    if let Ok(ip) = a.parse::<IpAddr>() {
        return Some(Upstream::Dns {
            addr: SocketAddr::new(ip, 53),
            zone: None,
        });
    }
    a.parse::<SocketAddr>()
        .ok()
        .map(|addr| Upstream::Dns { addr, zone: None })
}

fn upstreams<'a>(rs: impl IntoIterator<Item = &'a Resolver>) -> Vec<Upstream> {
    rs.into_iter().filter_map(upstream).collect()
}

fn os_upstreams(os: &[Nameserver], link_local: bool) -> Vec<Upstream> {
    os.iter()
        .filter(|n| link_local || !n.is_link_local())
        .filter(|n| n.ip != IpAddr::V4(crate::SERVICE_IPV4) && !n.ip.is_unspecified())
        .map(|n| Upstream::Dns {
            addr: SocketAddr::new(n.ip, 53),
            zone: n.zone.clone(),
        })
        .collect()
}

fn forward(list: Vec<Upstream>) -> Route {
    if list.is_empty() {
        Route::NoUpstream
    } else {
        Route::Forward(list)
    }
}

fn name(s: &str) -> Option<Name> {
    let mut n = Name::from_ascii(s.trim()).ok()?.to_lowercase();
    n.set_fqdn(true);
    Some(n)
}

/// The plan for the tailnet's `cfg`, the exit node's state and the OS's own resolvers.
pub fn plan(cfg: &DNSConfig, exit: &ExitUse, os: &[Nameserver]) -> Plan {
    let mut routes: Vec<(Name, Route)> = Vec::new();
    let default = match exit {
        ExitUse::Blocked => {
            return Plan {
                default: Route::FailClosed,
                routes,
            };
        }
        ExitUse::InUse { doh: Some(url) } => {
            let with_exit = upstreams(cfg.resolvers.iter().filter(|r| r.use_with_exit_node));
            for (suffix, rs) in &cfg.routes {
                let keep = upstreams(rs.iter().filter(|r| r.use_with_exit_node));
                if let (Some(n), false) = (name(suffix), keep.is_empty()) {
                    routes.push((n, Route::Forward(keep)));
                }
            }
            if with_exit.is_empty() {
                Route::Forward(vec![Upstream::Doh(url.clone())])
            } else {
                Route::Forward(with_exit)
            }
        }
        ExitUse::InUse { doh: None } | ExitUse::None => {
            for (suffix, rs) in &cfg.routes {
                if let Some(n) = name(suffix) {
                    routes.push((n, forward(upstreams(rs))));
                }
            }
            let tailnet = upstreams(&cfg.resolvers);
            let fallback = upstreams(&cfg.fallback_resolvers);
            // Behind an exit node the OS's resolvers are reached through the tunnel,
            // which a link-local one cannot be: it would leave on the LAN.
            let via_tunnel = matches!(exit, ExitUse::InUse { .. });
            let own = os_upstreams(os, !via_tunnel);
            let list = if !tailnet.is_empty() {
                tailnet
            } else if via_tunnel && !fallback.is_empty() {
                fallback
            } else if !own.is_empty() {
                own
            } else {
                fallback
            };
            forward(list)
        }
    };
    routes.sort_by_key(|(n, _)| std::cmp::Reverse(n.num_labels()));
    Plan { default, routes }
}

impl Plan {
    /// The route of `qname` (a split DNS suffix it falls under, else the default).
    pub fn route(&self, qname: &Name) -> &Route {
        self.routes
            .iter()
            .find(|(suffix, _)| suffix.zone_of(qname))
            .map_or(&self.default, |(_, r)| r)
    }
}

/// The DoH URL of an exit node, if it offers DNS: capability version 26 or newer, or
/// `peerapi-dns-proxy` among its services; and a PeerAPI port for an address family it
/// has (`peerapi4`, else `peerapi6`).
pub fn exit_doh_url(peer: &Node) -> Option<String> {
    let services = &peer.hostinfo.services;
    let offers = peer.cap >= PEERAPI_DNS_CAPVER
        || services
            .iter()
            .any(|s| s.proto == "peerapi-dns-proxy" && s.port >= 1);
    if !offers {
        return None;
    }
    let port = |proto: &str| services.iter().find(|s| s.proto == proto).map(|s| s.port);
    let addr = |v4: bool| {
        peer.addresses
            .iter()
            .map(|a| a.addr())
            .find(|a| a.is_ipv4() == v4)
    };
    let url = |ip: IpAddr, port: u16| format!("http://{}/dns-query", SocketAddr::new(ip, port));
    if let (Some(p), Some(ip)) = (port("peerapi4"), addr(true))
        && p != 0
    {
        return Some(url(ip, p));
    }
    if let (Some(p), Some(ip)) = (port("peerapi6"), addr(false))
        && p != 0
    {
        return Some(url(ip, p));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagu_proto::tailcfg::Service;

    fn ns(s: &str) -> Nameserver {
        crate::resolvconf::parse(&format!("nameserver {s}\n")).nameservers[0].clone()
    }

    fn dns(ip: &str) -> Upstream {
        upstream(&Resolver::new(ip)).unwrap()
    }

    #[test]
    fn the_table() {
        let cafe = [ns("198.18.1.1"), ns("fe80::1%eth0")];
        let mut cfg = DNSConfig::default();
        let doh = "http://100.64.0.2:40123/dns-query".to_string();
        // No exit node, no tailnet resolvers: the OS's, link-local included.
        let p = plan(&cfg, &ExitUse::None, &cafe);
        let Route::Forward(up) = &p.default else {
            panic!()
        };
        assert_eq!(up.len(), 2);
        // Exit node with DoH: only the DoH.
        let p = plan(
            &cfg,
            &ExitUse::InUse {
                doh: Some(doh.clone()),
            },
            &cafe,
        );
        assert_eq!(p.default, Route::Forward(vec![Upstream::Doh(doh.clone())]));
        // Exit node without DoH: the OS's through the tunnel, never link-local.
        let p = plan(&cfg, &ExitUse::InUse { doh: None }, &cafe);
        assert_eq!(p.default, Route::Forward(vec![dns("198.18.1.1")]));
        let p = plan(&cfg, &ExitUse::InUse { doh: None }, &[ns("fe80::1%eth0")]);
        assert_eq!(p.default, Route::NoUpstream);
        // Blocked: nothing.
        assert_eq!(
            plan(&cfg, &ExitUse::Blocked, &cafe).default,
            Route::FailClosed
        );
        // The tailnet's resolvers win, split routes apply (not behind an exit's DoH
        // unless marked for it).
        cfg.resolvers = vec![Resolver::new("203.0.113.53")];
        cfg.routes.insert(
            "corp.lab.test".into(),
            vec![Resolver::new("203.0.113.54:5353")],
        );
        let p = plan(&cfg, &ExitUse::None, &cafe);
        assert_eq!(p.default, Route::Forward(vec![dns("203.0.113.53")]));
        let q = Name::from_ascii("a.corp.lab.test.").unwrap();
        assert_eq!(p.route(&q), &Route::Forward(vec![dns("203.0.113.54:5353")]));
        let p = plan(
            &cfg,
            &ExitUse::InUse {
                doh: Some(doh.clone()),
            },
            &cafe,
        );
        assert_eq!(
            p.route(&q),
            &Route::Forward(vec![Upstream::Doh(doh.clone())])
        );
        cfg.resolvers[0].use_with_exit_node = true;
        let p = plan(&cfg, &ExitUse::InUse { doh: Some(doh) }, &cafe);
        assert_eq!(p.default, Route::Forward(vec![dns("203.0.113.53")]));
    }

    #[test]
    fn exit_doh_urls() {
        let mut n = Node {
            addresses: vec![
                "100.64.0.2/32".parse().unwrap(),
                "fd7a:115c:a1e0::2/128".parse().unwrap(),
            ],
            ..Node::default()
        };
        assert_eq!(exit_doh_url(&n), None, "no capability, no service");
        n.cap = CapabilityVersion(130);
        assert_eq!(exit_doh_url(&n), None, "no PeerAPI port");
        n.hostinfo.services = vec![Service {
            proto: "peerapi6".into(),
            port: 41000,
            ..Service::default()
        }];
        assert_eq!(
            exit_doh_url(&n).as_deref(),
            Some("http://[fd7a:115c:a1e0::2]:41000/dns-query")
        );
        n.hostinfo.services.push(Service {
            proto: "peerapi4".into(),
            port: 40123,
            ..Service::default()
        });
        assert_eq!(
            exit_doh_url(&n).as_deref(),
            Some("http://100.64.0.2:40123/dns-query")
        );
        n.cap = CapabilityVersion(0);
        assert_eq!(exit_doh_url(&n), None);
        n.hostinfo.services.push(Service {
            proto: "peerapi-dns-proxy".into(),
            port: 1,
            ..Service::default()
        });
        assert!(exit_doh_url(&n).is_some(), "the service alone suffices");
    }
}
