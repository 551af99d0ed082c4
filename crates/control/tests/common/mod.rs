//! An in-process server on loopback with a temporary database, and simulated nodes.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;
use tsunagu_client::{ControlClient, MapStream};
use tsunagu_control::limits::Limits;
use tsunagu_control::relay::RelaySettings;
use tsunagu_control::server::{Server, ServerConfig};
use tsunagu_control::state::State;
use tsunagu_proto::tailcfg::{
    CURRENT_CAPABILITY_VERSION, Hostinfo, MapRequest, RegisterRequest, RegisterResponse,
    RegisterResponseAuth,
};
use tsunagu_proto::{MachinePrivate, MachinePublic, NodePrivate};

pub struct TestServer {
    pub url: String,
    pub key: MachinePublic,
    pub state: Arc<State>,
    pub dir: tempfile::TempDir,
    /// Open connections per source address on the listener.
    pub connections: Arc<tsunagu_control::front::ConnCounter>,
    pub relay: Option<Arc<tsunagu_derp::Relay>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn server() -> TestServer {
    server_with(None).await
}

/// A server with the embedded relay (`relay`), or without (`None`).
pub async fn server_with(relay: Option<RelaySettings>) -> TestServer {
    server_with_regions(relay, Vec::new()).await
}

/// A server with the embedded relay (or not) announcing further `derp_regions`.
pub async fn server_with_regions(
    relay: Option<RelaySettings>,
    derp_regions: Vec<tsunagu_control::relay::RegionSpec>,
) -> TestServer {
    server_full(
        relay,
        derp_regions,
        tsunagu_control::dns::DnsSettings::default(),
        Limits::default(),
    )
    .await
}

/// A server without the relay, with `limits`.
#[allow(dead_code)]
pub async fn server_limits(limits: Limits) -> TestServer {
    server_full(
        None,
        Vec::new(),
        tsunagu_control::dns::DnsSettings::default(),
        limits,
    )
    .await
}

/// A server without relay whose tailnet has these DNS settings.
#[allow(dead_code)]
pub async fn server_with_dns(dns: tsunagu_control::dns::DnsSettings) -> TestServer {
    server_full(None, Vec::new(), dns, Limits::default()).await
}

/// A server with everything given. It serves through the public listener's shell
/// (connections per address, header timeout), as `tsunagu-server serve` does.
pub async fn server_full(
    relay: Option<RelaySettings>,
    derp_regions: Vec<tsunagu_control::relay::RegionSpec>,
    dns: tsunagu_control::dns::DnsSettings,
    limits: Limits,
) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".into(),
        server_url: String::new(),
        tls: None,
        policy_file: None,
        admin_socket: dir.path().join("admin.sock"),
        ephemeral_timeout: Duration::from_secs(300),
        relay,
        derp_regions,
        dns,
        standby_failover_after: Duration::from_secs(3),
        limits: limits.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
    let cfg = ServerConfig {
        server_url: url.clone(),
        ..cfg
    };
    let mut server = Server::start(&cfg).await.unwrap();
    let key = server.public_key();
    let state = server.app.state.clone();
    let router = server.router();
    let relay = server.relay.clone();
    let stun = server.stun.take();
    let connections = server.connections.clone();
    let counter = connections.clone();
    let task = tokio::spawn(async move {
        if let (Some(relay), Some(sock)) = (relay, stun) {
            tokio::spawn(relay.serve_stun(sock));
        }
        tsunagu_control::front::serve_listener(
            listener,
            None,
            router,
            &limits,
            counter,
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    TestServer {
        url,
        key,
        state,
        dir,
        connections,
        relay: server.relay.clone(),
        task,
    }
}

/// A user and a reusable pre-auth key for it.
pub async fn user_key(s: &TestServer, name: &str, tags: &[&str]) -> String {
    let u = match s.state.store.get_user_by_name(name).await {
        Ok(u) => u,
        Err(_) => {
            let u = s.state.store.create_user(name).await.unwrap();
            s.state.upsert_user(u.clone());
            u
        }
    };
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    let (_, key) = s
        .state
        .store
        .create_preauth_key(u.id, true, false, None, &tags)
        .await
        .unwrap();
    key
}

/// A simulated node: its keys and its control connection.
pub struct SimNode {
    pub machine: MachinePrivate,
    pub node: NodePrivate,
    pub client: ControlClient,
    pub hostname: String,
}

impl SimNode {
    pub async fn connect(s: &TestServer, hostname: &str) -> SimNode {
        let machine = MachinePrivate::generate();
        let client = ControlClient::connect(&s.url, &s.key, &machine)
            .await
            .unwrap();
        SimNode {
            machine,
            node: NodePrivate::generate(),
            client,
            hostname: hostname.into(),
        }
    }

    pub fn hostinfo(&self) -> Hostinfo {
        Hostinfo {
            hostname: self.hostname.clone(),
            os: "linux".into(),
            ..Hostinfo::default()
        }
    }

    pub fn register_request(&self, auth_key: Option<&str>) -> RegisterRequest {
        RegisterRequest {
            version: CURRENT_CAPABILITY_VERSION,
            node_key: self.node.public(),
            hostinfo: Some(self.hostinfo()),
            auth: auth_key.map(|k| RegisterResponseAuth {
                auth_key: k.into(),
                ..RegisterResponseAuth::default()
            }),
            ..RegisterRequest::default()
        }
    }

    pub async fn register(&mut self, auth_key: &str) -> RegisterResponse {
        let req = self.register_request(Some(auth_key));
        self.client.register(&req).await.unwrap()
    }

    pub fn map_request(&self, stream: bool) -> MapRequest {
        MapRequest {
            version: CURRENT_CAPABILITY_VERSION,
            compress: "zstd".into(),
            keep_alive: true,
            node_key: self.node.public(),
            stream,
            hostinfo: Some(self.hostinfo()),
            ..MapRequest::default()
        }
    }

    pub async fn stream(&mut self) -> MapStream {
        let req = self.map_request(true);
        self.client.map(&req).await.unwrap()
    }
}

// ---------------------------------------------------------------------------
// Helpers for bad_input.rs and lifecycle.rs: the admin API in-process, raw
// bytes on the client port, raw bodies over a Noise + HTTP/2 channel.

/// Calls the admin API (`tsunagu_control::admin::router`) in-process, as the
/// `tsunagu-server` subcommands do over the admin socket. Returns the status and
/// the JSON body (`Null` if the body is not JSON).
pub async fn admin(
    s: &TestServer,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt as _;
    use hyper::service::Service as _;
    let svc = hyper_util::service::TowerToHyperService::new(tsunagu_control::admin::router(
        s.state.clone(),
    ));
    let mut req = http::Request::builder().method(method).uri(path);
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            axum::body::Body::from(serde_json::to_vec(&v).unwrap())
        }
        None => axum::body::Body::empty(),
    };
    let resp = svc.call(req.body(body).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// The loopback address the test server listens on.
pub fn addr(s: &TestServer) -> std::net::SocketAddr {
    s.url.strip_prefix("http://").unwrap().parse().unwrap()
}

/// Writes `bytes` on a new TCP connection and reads until the server closes it
/// (or `timeout`). Returns what was read and whether the server closed.
pub async fn raw_tcp(s: &TestServer, bytes: &[u8], timeout: Duration) -> (Vec<u8>, bool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr(s)).await.unwrap();
    // The server may close while we still write (that is a fine answer to junk).
    let _ = tcp.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Standard padded base64 (as `X-Tailscale-Handshake` wants).
pub fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A `POST /ts2021` upgrade request carrying `handshake_b64`.
pub fn upgrade_request(handshake_b64: &str) -> String {
    format!(
        "POST /ts2021 HTTP/1.1\r\nHost: test\r\nUpgrade: tailscale-control-protocol\r\n\
         Connection: upgrade\r\nX-Tailscale-Handshake: {handshake_b64}\r\nContent-Length: 0\r\n\r\n"
    )
}

/// A Noise + HTTP/2 channel to the server on which any body can be posted (the
/// client library only sends well-formed requests).
pub struct RawChannel {
    send: hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

impl RawChannel {
    pub async fn connect(s: &TestServer, machine: &MachinePrivate) -> RawChannel {
        let (stream, _early) = tsunagu_noise::upgrade::dial_tcp(
            addr(s),
            "test",
            s.key.to_bytes(),
            machine.to_bytes(),
            CURRENT_CAPABILITY_VERSION.0 as u16,
        )
        .await
        .unwrap();
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        RawChannel { send }
    }

    /// POSTs `body` to `path`; returns the status and the whole response body.
    pub async fn post(&mut self, path: &str, body: impl Into<bytes::Bytes>) -> (u16, String) {
        use http_body_util::BodyExt as _;
        self.send.ready().await.unwrap();
        let req = http::Request::post(format!("http://test{path}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(body.into()))
            .unwrap();
        let resp = self.send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// The store's node for a simulated node (by its node key).
pub async fn node_row(s: &TestServer, n: &SimNode) -> tsunagu_store::Node {
    s.state
        .store
        .get_node_by_node_key(&n.node.public().tailscale())
        .await
        .unwrap()
}

/// Reads `stream` until a message satisfies `pred`, at most `timeout`; returns it
/// and how long it took. Panics on timeout or on the end of the stream.
pub async fn wait_for(
    stream: &mut MapStream,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&tsunagu_proto::tailcfg::MapResponse) -> bool,
) -> (tsunagu_proto::tailcfg::MapResponse, Duration) {
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match stream.next_update(left).await {
            Ok(Some(m)) if pred(&m) => return (m, start.elapsed()),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended while waiting for {what}"),
            Err(e) => panic!("waiting for {what}: {e} (after {:?})", start.elapsed()),
        }
    }
}

/// Reads `stream` until the server ends it, at most `timeout`; returns how long
/// it took. Panics if it is still open then.
pub async fn wait_end(stream: &mut MapStream, timeout: Duration) -> Duration {
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => panic!("stream still open after {timeout:?}"),
            Ok(None) | Ok(Some(Err(_))) => return start.elapsed(),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// A new, well-behaved node registers (with a new reusable key of user `fresh`)
/// and gets its first map: the server keeps serving others after whatever a test
/// threw at it. Returns the node's first map.
pub async fn assert_still_serving(s: &TestServer) -> tsunagu_proto::tailcfg::MapResponse {
    let key = user_key(s, "fresh", &[]).await;
    let host = format!("fresh-{}", rand::random::<u32>());
    let mut n = SimNode::connect(s, &host).await;
    let r = n.register(&key).await;
    assert!(r.machine_authorized && r.error.is_empty(), "{r:?}");
    let mut stream = n.stream().await;
    let first = stream
        .next_update(Duration::from_secs(10))
        .await
        .unwrap()
        .expect("a first map");
    let me = first.node.as_ref().expect("self node");
    assert_eq!(me.name, format!("{host}.tailnet.internal."));
    assert_eq!(me.key, n.node.public());
    first
}

/// Writes an HTTP/1.1 request on a new TCP connection and returns the first whole
/// response (head and `Content-Length` body) without waiting for the server to
/// close a kept-alive connection. Panics after 5 s.
pub async fn raw_http(s: &TestServer, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr(s)).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(head) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&out[..head]).to_ascii_lowercase();
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if out.len() >= head + 4 + len {
                return out;
            }
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => panic!("no whole response: {:?}", String::from_utf8_lossy(&out)),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}
