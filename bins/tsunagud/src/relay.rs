//! The node's connection to its home relay (DERP): a thin tokio shell around
//! `tsunagu_derp::ClientConn`.
//!
//! The engine hands datagrams for relay paths to [`RelayLink`] (a bounded queue: a full
//! queue drops, like a full socket buffer); this task sends them as DERP `SendPacket`
//! frames and gives every received packet to the device as if it had come from the UDP
//! socket. It reconnects with backoff; the TCP socket carries the engine's bypass mark,
//! so the relay is reached over the physical network whatever the default route is.

use anyhow::Context as _;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tsunagu_derp::{ClientConn, ClientEvent, ClientInfo};
use tsunagu_engine::device::RelayTx;
use tsunagu_engine::engine::Engine;
use tsunagu_proto::tailcfg::DERPMap;
use tsunagu_proto::{NodePrivate, NodePublic};

/// Datagrams waiting for the relay connection, at most.
const QUEUE: usize = 1024;

/// Where the relay of a region is, as the DERP map says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    pub region: u16,
    pub code: String,
    /// `host:port` to connect to.
    pub addr: String,
    /// The Host header.
    pub host: String,
}

impl RelayTarget {
    /// The home region: the lowest-numbered region with a node that relays (the server
    /// announces its own). Plain HTTP when the login server is plain HTTP.
    pub fn home(map: &DERPMap, login_server: &str) -> Option<RelayTarget> {
        let https = login_server.starts_with("https://");
        map.regions.values().find_map(|r| {
            let n = r.nodes.iter().find(|n| !n.stun_only)?;
            let region = u16::try_from(r.region_id).ok().filter(|r| *r > 0)?;
            let port = match n.derp_port {
                0 if https => 443,
                0 => 80,
                p => u16::try_from(p).ok()?,
            };
            let ip = [&n.ipv4, &n.ipv6]
                .into_iter()
                .find(|a| !a.is_empty() && a.as_str() != "none")
                .cloned();
            let host = n.host_name.clone();
            let connect_host = ip.unwrap_or_else(|| host.clone());
            let addr = if connect_host.contains(':') {
                format!("[{connect_host}]:{port}")
            } else {
                format!("{connect_host}:{port}")
            };
            Some(RelayTarget {
                region,
                code: r.region_code.clone(),
                addr,
                host: format!("{host}:{port}"),
            })
        })
    }
}

/// The engine's side of the relay: a bounded queue to the connection task.
pub struct RelayLink {
    region: u16,
    tx: mpsc::Sender<(NodePublic, Bytes)>,
    pub connected: AtomicBool,
}

impl RelayTx for RelayLink {
    fn send(&self, region: u16, dst: &NodePublic, datagram: &[u8]) -> bool {
        // Only the home region's connection exists.
        region == self.region
            && self
                .tx
                .try_send((*dst, Bytes::copy_from_slice(datagram)))
                .is_ok()
    }
}

/// A running relay connection (ended when dropped).
pub struct Relay {
    pub target: RelayTarget,
    pub link: Arc<RelayLink>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Start the connection to `target` for the node `key`; packets received go to the
    /// engine in `engine` (whichever is running).
    pub fn start(
        target: RelayTarget,
        key: NodePrivate,
        fwmark: u32,
        engine: Arc<Mutex<Option<Engine>>>,
    ) -> Relay {
        let (tx, rx) = mpsc::channel(QUEUE);
        let link = Arc::new(RelayLink {
            region: target.region,
            tx,
            connected: AtomicBool::new(false),
        });
        let task = tokio::spawn(run(target.clone(), key, fwmark, engine, rx, link.clone()));
        Relay { target, link, task }
    }
}

async fn run(
    target: RelayTarget,
    key: NodePrivate,
    fwmark: u32,
    engine: Arc<Mutex<Option<Engine>>>,
    mut rx: mpsc::Receiver<(NodePublic, Bytes)>,
    link: Arc<RelayLink>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let r = session(&target, &key, fwmark, &engine, &mut rx, &link).await;
        link.connected.store(false, Ordering::Relaxed);
        match r {
            Ok(()) => tracing::info!(region = target.region, "relay connection closed"),
            Err(e) => tracing::warn!(
                region = target.region,
                "relay: {e:#}; retrying in {backoff:?}"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
        // What queued while we were away is stale: WireGuard retries by itself.
        while rx.try_recv().is_ok() {}
    }
}

async fn session(
    target: &RelayTarget,
    key: &NodePrivate,
    fwmark: u32,
    engine: &Mutex<Option<Engine>>,
    rx: &mut mpsc::Receiver<(NodePublic, Bytes)>,
    link: &RelayLink,
) -> anyhow::Result<()> {
    let addr = tokio::net::lookup_host(&target.addr)
        .await
        .with_context(|| format!("resolving {}", target.addr))?
        .next()
        .with_context(|| format!("no address for {}", target.addr))?;
    let mut tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tsunagu_client::tcp_connect(addr, Some(fwmark)),
    )
    .await
    .with_context(|| format!("connecting to {addr}: timed out"))??;
    tcp.write_all(tsunagu_derp::client::upgrade_request(&target.host).as_bytes())
        .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let start = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .context("waiting for the upgrade: timed out")??;
        if n == 0 {
            anyhow::bail!("the relay closed the connection during the upgrade");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) =
            tsunagu_derp::client::parse_upgrade_response(&head).map_err(anyhow::Error::msg)?
        {
            break end;
        }
    };
    let mut conn = ClientConn::new(key.clone(), ClientInfo::default());
    conn.handle_input(&head[start..])?;
    // Pings keep NAT state and idle proxies alive; the first one after 30 s, never
    // before the login (a frame before ClientInfo closes the connection).
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(30),
        Duration::from_secs(30),
    );
    loop {
        while let Some(out) = conn.poll_transmit() {
            tcp.write_all(&out).await?;
        }
        while let Some(ev) = conn.poll_event() {
            match ev {
                ClientEvent::Connected { .. } => {
                    link.connected.store(true, Ordering::Relaxed);
                    tracing::info!(region = target.region, relay = %target.addr, "relay connected");
                }
                ClientEvent::Packet { src, packet } => {
                    if let Ok(g) = engine.lock()
                        && let Some(e) = g.as_ref()
                    {
                        e.device().receive_relayed(&src, target.region, &packet);
                    }
                }
                ClientEvent::Health(h) => {
                    tracing::warn!(region = target.region, "relay health: {h}")
                }
                ClientEvent::Restarting { .. } => anyhow::bail!("the relay is restarting"),
                _ => {}
            }
        }
        tokio::select! {
            n = tcp.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                conn.handle_input(&buf[..n])?;
            }
            Some((dst, d)) = rx.recv() => {
                if conn.is_connected()
                    && let Err(e) = conn.send_packet(dst, &d)
                {
                    tracing::debug!("relay send: {e}");
                }
            }
            _ = keepalive.tick() => {
                if conn.is_connected() {
                    conn.ping(*b"tsunagu!");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagu_proto::tailcfg::{DERPNode, DERPRegion};

    #[test]
    fn home_region_from_the_map() {
        let map = DERPMap::from_regions([DERPRegion {
            region_id: 900,
            region_code: "tsunagu".into(),
            nodes: vec![DERPNode {
                region_id: 900,
                host_name: "198.51.100.4".into(),
                ipv4: "198.51.100.4".into(),
                ipv6: "none".into(),
                derp_port: 8080,
                ..DERPNode::default()
            }],
            ..DERPRegion::default()
        }]);
        let t = RelayTarget::home(&map, "http://198.51.100.4:8080").unwrap();
        assert_eq!(t.region, 900);
        assert_eq!(t.code, "tsunagu");
        assert_eq!(t.addr, "198.51.100.4:8080");
        assert!(RelayTarget::home(&DERPMap::default(), "http://x").is_none());
    }
}
