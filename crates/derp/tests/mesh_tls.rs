//! A mesh link over HTTPS (`https://` in `mesh_with`): relay A serves its mesh peers over
//! TLS with a certificate for `localhost` from a private CA that relay B trusts through
//! `SSL_CERT_FILE`; B's client reaches A's client across the TLS link. A second link to
//! the same relay under a name the certificate does not hold never comes up.
//!
//! Its own test binary: `SSL_CERT_FILE` is read once per process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tsunagu_derp::client::{ClientConn, ClientEvent, parse_upgrade_response, upgrade_request};
use tsunagu_derp::{ClientInfo, Relay, RelayOptions};
use tsunagu_proto::{NodePrivate, NodePublic};

const GUARD: Duration = Duration::from_secs(30);

async fn guard<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {GUARD:?}"))
}

/// A TLS listener for `axum::serve`: handshakes inline (enough for a test).
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, peer)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A client of a relay over plain TCP, logged in.
async fn client(addr: SocketAddr) -> (TcpStream, ClientConn, NodePublic) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request("relay").as_bytes())
        .await
        .unwrap();
    let key = NodePrivate::generate();
    let mut conn = ClientConn::new(key.clone(), ClientInfo::default());
    let mut head = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut upgraded = false;
    guard("login", async {
        while !conn.is_connected() {
            while let Some(b) = conn.poll_transmit() {
                s.write_all(&b).await.unwrap();
            }
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed");
            if upgraded {
                conn.handle_input(&buf[..n]).unwrap();
            } else {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = parse_upgrade_response(&head).unwrap() {
                    upgraded = true;
                    conn.handle_input(&head[end..]).unwrap();
                }
            }
        }
    })
    .await;
    while conn.poll_event().is_some() {}
    (s, conn, key.public())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_link_over_https_carries_packets_and_checks_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = dir.path().join("ca.pem");
    std::fs::write(&cert_pem, ca.cert.pem()).unwrap();
    // SAFETY: set before any thread of this test binary reads the environment (this is
    // the only test in the binary, and nothing ran before this line).
    unsafe { std::env::set_var("SSL_CERT_FILE", &cert_pem) };

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ca.signing_key.serialize_der().into());
    let mut server_cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ca.cert.der().clone()], key)
        .unwrap();
    server_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(server_cfg));

    let mesh_key = "a shared secret".to_string();
    // Relay A: clients over plain HTTP, mesh peers over HTTPS.
    let ra = Relay::new(
        NodePrivate::generate(),
        RelayOptions {
            mesh_key: Some(mesh_key.clone()),
            ..RelayOptions::default()
        },
    );
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let la_tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (aa, tls_port) = (
        la.local_addr().unwrap(),
        la_tls.local_addr().unwrap().port(),
    );
    let app = ra.router();
    tokio::spawn(async move { axum::serve(la, app).await });
    let app = ra.router();
    let tls = TlsListener {
        tcp: la_tls,
        acceptor,
    };
    tokio::spawn(async move { axum::serve(tls, app).await });

    // Relay B meshes with A over HTTPS, once by the certificate's name and once by an
    // address the certificate does not hold.
    let rb = Relay::new(
        NodePrivate::generate(),
        RelayOptions {
            mesh_key: Some(mesh_key),
            mesh_with: vec![
                format!("https://localhost:{tls_port}"),
                format!("https://127.0.0.1:{tls_port}"),
            ],
            ..RelayOptions::default()
        },
    );
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ab = lb.local_addr().unwrap();
    let app = rb.router();
    tokio::spawn(async move { axum::serve(lb, app).await });
    rb.start_mesh();

    let (mut s2, mut c2, k2) = client(aa).await;
    let (mut s1, mut c1, k1) = client(ab).await;
    guard("B learning A's client over the TLS link", async {
        while !rb.reachable(&k2) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    c1.send_packet(k2, b"over TLS").unwrap();
    while let Some(b) = c1.poll_transmit() {
        s1.write_all(&b).await.unwrap();
    }
    let mut buf = vec![0u8; 65536];
    let got = guard("the packet across the mesh", async {
        loop {
            while let Some(ev) = c2.poll_event() {
                if let ClientEvent::Packet { src, packet } = ev {
                    return (src, packet);
                }
            }
            let n = s2.read(&mut buf).await.unwrap();
            assert!(n > 0);
            c2.handle_input(&buf[..n]).unwrap();
        }
    })
    .await;
    assert_eq!(got, (k1, bytes::Bytes::from_static(b"over TLS")));
    // The link by address fails the certificate check and stays down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rb.metrics().mesh_links_up, 1, "only the link by name is up");
}
