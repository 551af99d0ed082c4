//! The host's own networks, as its interfaces show them: what an exit node keeps closed
//! to the traffic it forwards ([`crate::scope`]).

use crate::scope::HostNets;
use ipnet::IpNet;
use std::net::IpAddr;

/// The addresses and subnets of every interface but `tun` (ours: its addresses are the
/// tailnet's). Unreadable interfaces yield nothing rather than an error: the closed
/// space still holds every non-internet range.
pub fn host_nets(tun: &str) -> HostNets {
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "listing the host's addresses");
            return HostNets::default();
        }
    };
    let mut nets = Vec::new();
    for ifa in addrs {
        if ifa.interface_name == tun {
            continue;
        }
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        let net = if let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            let len = u32::from(m.ip()).leading_ones() as u8;
            IpNet::new(IpAddr::V4(a.ip()), len).ok()
        } else if let (Some(a), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            let len = u128::from(m.ip()).leading_ones() as u8;
            IpNet::new(IpAddr::V6(a.ip()), len).ok()
        } else {
            None
        };
        nets.extend(net);
    }
    HostNets::from_interface_addrs(nets)
}
