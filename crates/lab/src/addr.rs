//! Address parsing and the lab's address plan.
//!
//! The lab guide (`shared/guide/lab.md`) allows only documentation and benchmarking ranges:
//! traffic to anything else is flagged on the build machines, and `192.0.2.0/24` is the
//! machines' own network. Checking every address the lab configures or connects to turns a
//! typo into an immediate [`LabError::Invalid`] instead of a policy incident.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::error::LabError;

/// An interface address with its prefix length, e.g. `198.51.100.1/24` or
/// `2001:db8:1::1/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub prefix: u8,
}

impl Cidr {
    /// Whether this is an IPv6 address.
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| LabError::invalid("address", format!("`{s}`: {why}"));
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIXLEN"))?;
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("bad prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad("prefix length too long"));
        }
        Ok(Cidr { addr, prefix })
    }
}

/// Whether `ip` is inside one of the ranges the lab guide allows (plus link-local IPv6,
/// which never leaves a link, and the unspecified addresses used for wildcard binds).
pub fn is_lab_addr(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_lab_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_lab_v4(v4),
            None => is_lab_v6(v6),
        },
    }
}

fn is_lab_v4(ip: Ipv4Addr) -> bool {
    let allowed: [(Ipv4Addr, u8); 5] = [
        (Ipv4Addr::new(100, 64, 0, 0), 10),   // tailnet
        (Ipv4Addr::new(198, 51, 100, 0), 24), // public routers, exits, control
        (Ipv4Addr::new(203, 0, 113, 0), 24),  // servers on the internet
        (Ipv4Addr::new(198, 18, 0, 0), 15),   // LANs behind NAT
        (Ipv4Addr::new(127, 0, 0, 0), 8),     // loopback
    ];
    ip.is_unspecified()
        || allowed.iter().any(|&(net, len)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        })
}

fn is_lab_v6(ip: Ipv6Addr) -> bool {
    let allowed: [(Ipv6Addr, u8); 3] = [
        (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // simulated internet
        (Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48), // tailnet
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),     // link-local
    ];
    ip.is_unspecified()
        || ip.is_loopback()
        || allowed.iter().any(|&(net, len)| {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        })
}

/// Fails unless `ip` is in the lab's address plan; `what` names the argument for the error.
pub(crate) fn ensure_lab_addr(ip: IpAddr, what: &'static str) -> Result<(), LabError> {
    if is_lab_addr(ip) {
        Ok(())
    } else {
        Err(LabError::invalid(
            what,
            format!("{ip} is outside the lab's address plan (see shared/guide/lab.md)"),
        ))
    }
}

/// Checks a route destination: `default` or a CIDR inside the plan.
pub(crate) fn ensure_lab_route(dest: &str) -> Result<(), LabError> {
    if dest == "default" {
        return Ok(());
    }
    let cidr: Cidr = if dest.contains('/') {
        dest.parse()?
    } else {
        let addr: IpAddr = dest
            .parse()
            .map_err(|_| LabError::invalid("route", format!("`{dest}` is not an address")))?;
        Cidr {
            addr,
            prefix: if addr.is_ipv4() { 32 } else { 128 },
        }
    };
    ensure_lab_addr(cidr.addr, "route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs() {
        let c: Cidr = "198.51.100.1/24".parse().expect("valid");
        assert_eq!(c.addr, IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)));
        assert_eq!(c.prefix, 24);
        assert_eq!(c.to_string(), "198.51.100.1/24");
        let c: Cidr = "2001:db8:1::1/64".parse().expect("valid");
        assert!(c.is_ipv6());
        for bad in [
            "198.51.100.1",
            "198.51.100.1/33",
            "2001:db8::1/129",
            "x/24",
            "1.2.3.4/",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn address_plan() {
        for ok in [
            "198.51.100.3",
            "203.0.113.53",
            "198.18.1.10",
            "198.19.255.1",
            "100.64.0.1",
            "127.0.0.1",
            "0.0.0.0",
            "2001:db8:2::10",
            "fd7a:115c:a1e0::1",
            "fe80::1",
            "::1",
            "::",
            "::ffff:198.51.100.2",
        ] {
            assert!(
                is_lab_addr(ok.parse().expect("ip")),
                "{ok} should be allowed"
            );
        }
        for bad in [
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "192.0.2.1",
            "8.8.8.8",
            "1.1.1.1",
            "198.20.0.1",
            "2001:4860::8888",
            "fd00::1",
            "::ffff:192.0.2.1",
        ] {
            assert!(
                !is_lab_addr(bad.parse().expect("ip")),
                "{bad} must be refused"
            );
        }
        assert!(ensure_lab_route("default").is_ok());
        assert!(ensure_lab_route("203.0.113.0/24").is_ok());
        assert!(ensure_lab_route("192.0.2.0/24").is_err());
    }
}
