//! What the network lets this node do: STUN through the WireGuard socket (the public
//! address and port peers will see, reported to the server as an endpoint) and the
//! latency to each relay region, for `tsunagu netcheck`.
//!
//! Requests go out through the engine's own UDP socket (so the answer names the NAT
//! mapping of the socket WireGuard uses); answers come back through the device's STUN
//! sink into [`Stun::on_datagram`], which matches them to the requests by transaction ID.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tsunagu_derp::stun::{self, TxId};
use tsunagu_proto::tailcfg::DERPMap;

/// One answered Binding Request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunResult {
    pub server: SocketAddr,
    pub mapped: SocketAddr,
    pub rtt: Duration,
}

/// Outstanding requests and the latest answer.
#[derive(Default)]
pub struct Stun {
    pending: Mutex<HashMap<TxId, (SocketAddr, Instant)>>,
    latest: Mutex<Option<StunResult>>,
    /// Woken on every answer.
    pub answered: tokio::sync::Notify,
}

impl Stun {
    /// A Binding Request for `server`, remembered for matching its answer.
    pub fn request(&self, server: SocketAddr) -> Vec<u8> {
        let tx = TxId::random();
        let mut p = self.pending.lock();
        // Forget requests nobody answered for long.
        p.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(30));
        p.insert(tx, (server, Instant::now()));
        stun::binding_request(tx)
    }

    /// A STUN datagram from the socket: an answer to one of our requests, or ignored.
    pub fn on_datagram(&self, datagram: &[u8], from: SocketAddr) {
        let Ok((tx, mapped)) = stun::parse_binding_response(datagram) else {
            return;
        };
        let (server, at) = {
            let mut p = self.pending.lock();
            match p.get(&tx) {
                // Only the server we asked may answer.
                Some((server, _)) if *server == from => match p.remove(&tx) {
                    Some(v) => v,
                    None => return,
                },
                _ => return,
            }
        };
        *self.latest.lock() = Some(StunResult {
            server,
            mapped,
            rtt: at.elapsed(),
        });
        self.answered.notify_waiters();
    }

    pub fn latest(&self) -> Option<StunResult> {
        *self.latest.lock()
    }

    /// The device sink that feeds [`Stun::on_datagram`].
    pub fn sink(self: &Arc<Self>) -> tsunagu_engine::device::StunSink {
        let me = self.clone();
        Arc::new(move |d: &[u8], from: SocketAddr| me.on_datagram(d, from))
    }
}

/// The STUN servers of a DERP map, by region code.
pub fn stun_servers(map: &DERPMap) -> Vec<(String, SocketAddr)> {
    let mut out = Vec::new();
    for r in map.regions.values() {
        for n in &r.nodes {
            let port = match n.stun_port {
                -1 => continue,
                0 => 3478,
                p => match u16::try_from(p) {
                    Ok(p) => p,
                    Err(_) => continue,
                },
            };
            if let Ok(ip) = n.ipv4.parse::<std::net::Ipv4Addr>() {
                out.push((r.region_code.clone(), SocketAddr::from((ip, port))));
            }
        }
    }
    out
}

/// `tsunagu netcheck`'s report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// A STUN answer came back over UDP.
    pub udp: bool,
    /// The public address and port of the WireGuard socket, as STUN saw it.
    pub ipv4: Option<String>,
    /// Whether the NAT maps the socket to different ports per destination (symmetric,
    /// hard to traverse); `None` when fewer than two STUN servers answered.
    pub mapping_varies_by_dest_ip: Option<bool>,
    /// The home relay region (its code).
    pub preferred_derp: Option<String>,
    /// Round-trip time to each relay region: STUN over UDP when it answers, else the
    /// relay's HTTP latency check over TCP.
    pub derp_latency_ms: BTreeMap<String, f64>,
}

/// Measure: STUN to every server of the map (twice each), then HTTP latency to regions
/// that STUN did not answer for.
pub async fn run(
    stun: &Stun,
    device_send: impl Fn(SocketAddr, &[u8]) -> std::io::Result<()>,
    map: &DERPMap,
    home: Option<&str>,
    fwmark: u32,
) -> Report {
    let servers = stun_servers(map);
    let mut mapped: BTreeMap<SocketAddr, SocketAddr> = BTreeMap::new();
    let mut report = Report {
        preferred_derp: home.map(String::from),
        ..Report::default()
    };
    for (code, server) in &servers {
        for _ in 0..2 {
            let before = stun.latest();
            let req = stun.request(*server);
            if device_send(*server, &req).is_err() {
                continue;
            }
            let answered = tokio::time::timeout(Duration::from_millis(1500), async {
                loop {
                    let n = stun.answered.notified();
                    if let Some(r) = stun.latest()
                        && Some(r) != before
                        && r.server == *server
                    {
                        return r;
                    }
                    n.await;
                }
            })
            .await;
            if let Ok(r) = answered {
                report.udp = true;
                mapped.insert(*server, r.mapped);
                let ms = r.rtt.as_secs_f64() * 1e3;
                let e = report.derp_latency_ms.entry(code.clone()).or_insert(ms);
                *e = e.min(ms);
                break;
            }
        }
    }
    report.ipv4 = mapped.values().next().map(ToString::to_string);
    if mapped.len() >= 2 {
        let first = mapped.values().next().copied();
        report.mapping_varies_by_dest_ip = Some(mapped.values().any(|m| Some(*m) != first));
    }
    // Regions STUN did not answer for: time the relay's HTTP latency check instead.
    for r in map.regions.values() {
        if report.derp_latency_ms.contains_key(&r.region_code) {
            continue;
        }
        let Some(n) = r.nodes.first() else { continue };
        let port = if n.derp_port > 0 { n.derp_port } else { 80 };
        let Ok(addr) = format!("{}:{port}", n.ipv4).parse::<SocketAddr>() else {
            continue;
        };
        let start = Instant::now();
        let ok = tokio::time::timeout(Duration::from_secs(3), async {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut tcp = tsunagu_client::tcp_connect(addr, Some(fwmark)).await.ok()?;
            let req = format!(
                "GET /derp/latency-check HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                n.host_name
            );
            tcp.write_all(req.as_bytes()).await.ok()?;
            let mut b = [0u8; 64];
            let k = tcp.read(&mut b).await.ok()?;
            b[..k].starts_with(b"HTTP/1.1 200").then_some(())
        })
        .await;
        if matches!(ok, Ok(Some(()))) {
            report
                .derp_latency_ms
                .insert(r.region_code.clone(), start.elapsed().as_secs_f64() * 1e3);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_match_requests_by_transaction_and_server() {
        let s = Stun::default();
        let server: SocketAddr = "198.51.100.4:3478".parse().unwrap();
        let req = s.request(server);
        let tx = stun::parse_binding_request(&req).unwrap();
        let mapped: SocketAddr = "198.51.100.3:41641".parse().unwrap();
        // From another address: ignored.
        s.on_datagram(
            &stun::binding_response(tx, mapped),
            "198.51.100.9:3478".parse().unwrap(),
        );
        assert!(s.latest().is_none());
        // An answer to nothing we asked: ignored.
        s.on_datagram(&stun::binding_response(TxId::random(), mapped), server);
        assert!(s.latest().is_none());
        s.on_datagram(&stun::binding_response(tx, mapped), server);
        assert_eq!(s.latest().map(|r| r.mapped), Some(mapped));
        // Garbage does nothing.
        s.on_datagram(b"\x00\x01garbage", server);
        assert_eq!(s.latest().map(|r| r.mapped), Some(mapped));
    }

    #[test]
    fn stun_servers_come_from_the_derp_map() {
        use tsunagu_proto::tailcfg::{DERPNode, DERPRegion};
        let node = |stun_port| DERPNode {
            ipv4: "198.51.100.4".into(),
            stun_port,
            ..DERPNode::default()
        };
        let map = DERPMap::from_regions([DERPRegion {
            region_id: 900,
            region_code: "tsunagu".into(),
            nodes: vec![node(0), node(-1), node(3479)],
            ..DERPRegion::default()
        }]);
        let got: Vec<String> = stun_servers(&map)
            .iter()
            .map(|(_, a)| a.to_string())
            .collect();
        assert_eq!(got, ["198.51.100.4:3478", "198.51.100.4:3479"]);
    }
}
