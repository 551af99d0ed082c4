//! Network-namespace topologies for tsunagu's integration tests, benchmarks and demo.
//!
//! Every test that crosses a network builds its own island of Linux network namespaces
//! (see `shared/guide/lab.md`): a [`Lab`] creates namespaces with per-test names, links
//! them with veth pairs and bridges, runs processes inside them, and removes everything
//! when dropped, also when the test panics. Leftovers of a crashed run are removed by the
//! next run of the same test.
//!
//! The common topology, [`Lab::seed`], is the guide's seed scenario: a client behind a cafe
//! NAT, exit nodes and a control server on a public bridge, and a web server "on the
//! internet" (see [`seed`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use tsunagu_lab::{Lab, SeedOptions, http_get, whoami_server, seed::{role, WEB_ADDR}};
//!
//! # fn main() -> Result<(), tsunagu_lab::LabError> {
//! let seed = Lab::seed("doc_example", SeedOptions::default())?;
//! let _web = whoami_server(&seed.ns(role::WEB), (WEB_ADDR, 80).into())?;
//! let seen = http_get(&seed.ns(role::CLIENT), (WEB_ADDR, 80).into(), Duration::from_secs(5))?;
//! assert_eq!(seen.trim(), "198.51.100.3"); // the cafe's NAT
//! # Ok(())
//! # }
//! ```
//!
//! Requirements: root, `iproute2`, `nftables` (seed), `tcpdump` (captures), `iputils-ping`
//! ([`ping`]), `iperf3` (benchmarks).

mod addr;
pub mod capture;
mod cmd;
mod error;
mod lab;
mod netns;
pub mod seed;
mod services;
pub mod tailnet;
pub mod tailscaled;
pub mod tls;

pub use addr::{Cidr, is_lab_addr};
pub use capture::{Capture, capture, capture_filtered, read_pcap, tunnel_leaks};
pub use cmd::{DEFAULT_EXEC_TIMEOUT, which};
pub use error::LabError;
pub use lab::{Lab, NAME_PREFIX, ProcId, require};
pub use netns::Netns;
pub use nix::sys::signal::Signal;
pub use seed::{
    CAFE_PUBLIC, CLIENT_LAN, CLIENT2_LAN, CONTROL_PUBLIC, EXIT_PUBLIC, EXIT2_PUBLIC, HOME_PUBLIC,
    PRINTER_LAN, RELAY2_PUBLIC, RESOLVER, Seed, SeedOptions, WEB_ADDR, WEB6_ADDR,
};
pub use services::{
    IO_TIMEOUT, MAX_UDP_COUNT, ServiceHandle, dns_query, dns_server, http_get, ping,
    tcp_connect_ok, tcp_echo, tcp_listener, tcp_read, try_ping, try_tcp_connect, udp_send,
    udp_sink, whoami_server,
};
pub use tailscaled::{OfficialBins, Tailscaled, TailscaledOpts};
pub use tls::{LabTls, lab_tls};

/// Polls `f` every 200 ms until it holds; [`LabError::NotWithin`] naming `what` when it
/// still does not after `within`.
pub fn wait_until(
    what: &str,
    within: std::time::Duration,
    mut f: impl FnMut() -> bool,
) -> Result<(), LabError> {
    let start = std::time::Instant::now();
    while !f() {
        if start.elapsed() > within {
            return Err(LabError::NotWithin {
                what: what.to_string(),
                within,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}

/// A log line or file without its ANSI colour sequences (`ESC [ ... m`): what the
/// daemons' tracing output looks like once a test reads it.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strip_ansi_removes_colours_only() {
        assert_eq!(
            super::strip_ansi("\u{1b}[3mnode\u{1b}[0m\u{1b}[2m=\u{1b}[0m1"),
            "node=1"
        );
        assert_eq!(super::strip_ansi("plain [text]"), "plain [text]");
    }
}
