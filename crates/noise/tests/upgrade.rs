//! End to end over loopback TCP: hyper HTTP/1 server with upgrades running
//! `accept_upgrade`, our `dial` client, then HTTP/2 (hyper, prior knowledge)
//! inside the Noise channel, as the Tailscale client and server do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tsunagu_noise::{DialError, UpgradeBody, accept_upgrade, dial_tcp, public_key};

const SERVER: [u8; 32] = [0x5e; 32];
const MACHINE: [u8; 32] = [0x3a; 32];
const EARLY: &[u8] = br#"{"NodeKeyChallenge":"chalpub:00"}"#;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// HTTP/2 handler inside the Noise channel: echoes the body and reports the
/// authenticated machine key.
async fn inner(
    req: Request<Incoming>,
    machine: [u8; 32],
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await?.to_bytes();
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut()
        .insert("x-path", path.parse().expect("hv"));
    resp.headers_mut()
        .insert("x-machine", hex(&machine).parse().expect("hv"));
    Ok(resp)
}

async fn outer(req: Request<Incoming>) -> Result<Response<UpgradeBody>, Infallible> {
    if req.uri().path() != "/ts2021" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return Ok(r);
    }
    match accept_upgrade(req, SERVER, Some(EARLY.to_vec())) {
        Err(e) => Ok(e.to_response()),
        Ok((resp, pending)) => {
            tokio::spawn(async move {
                let accepted = match pending.await {
                    Ok(a) => a,
                    Err(e) => panic!("server side of upgrade failed: {e}"),
                };
                let machine = accepted.machine_public;
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(
                        TokioIo::new(accepted.stream),
                        service_fn(move |r| inner(r, machine)),
                    )
                    .await;
            });
            Ok(resp)
        }
    }
}

async fn start_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(outer))
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn h2_roundtrip(
    stream: tsunagu_noise::NoiseStream<TcpStream>,
    path: &str,
    body: Vec<u8>,
) -> (Response<()>, Bytes) {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::post(format!("http://unused{path}"))
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = sender.send_request(req).await.expect("send");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (Response::from_parts(parts, ()), bytes)
}

#[tokio::test]
async fn dial_accept_then_http2_with_early_payload() {
    let addr = start_server().await;
    let (stream, early) = tokio::time::timeout(
        Duration::from_secs(10),
        dial_tcp(addr, "127.0.0.1", public_key(SERVER), MACHINE, 131),
    )
    .await
    .expect("timeout")
    .expect("dial");
    assert_eq!(early.as_deref(), Some(EARLY));
    assert_eq!(stream.conn().peer(), public_key(SERVER));

    let (resp, body) = h2_roundtrip(stream, "/machine/map", b"{\"Stream\":true}".to_vec()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-path"], "/machine/map");
    assert_eq!(
        resp.headers()["x-machine"],
        hex(&public_key(MACHINE)).as_str()
    );
    assert_eq!(&body[..], b"{\"Stream\":true}");
}

#[tokio::test]
async fn old_client_gets_no_early_payload_and_h2_still_works() {
    // capver 40 < 49: no early payload; dial peeks the server's HTTP/2
    // SETTINGS and must give those bytes back.
    let addr = start_server().await;
    let (stream, early) = dial_tcp(addr, "localhost", public_key(SERVER), MACHINE, 40)
        .await
        .expect("dial");
    assert!(early.is_none());
    let (resp, body) = h2_roundtrip(stream, "/x", b"hi".to_vec()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&body[..], b"hi");
}

#[tokio::test]
async fn large_bodies_cross_many_records() {
    let addr = start_server().await;
    let (stream, _) = dial_tcp(addr, "h", public_key(SERVER), MACHINE, 131)
        .await
        .expect("dial");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
    let (resp, body) = h2_roundtrip(stream, "/big", big.clone()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(body[..] == big[..], "echoed body differs");
}

#[tokio::test]
async fn wrong_server_key_is_refused_with_400() {
    let addr = start_server().await;
    let err = dial_tcp(addr, "h", public_key([9; 32]), MACHINE, 131)
        .await
        .unwrap_err();
    assert!(matches!(err, DialError::UnexpectedStatus(400)), "{err:?}");
}

async fn raw_request(addr: SocketAddr, head: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("timeout")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn bad_upgrade_requests_get_clear_statuses() {
    let addr = start_server().await;
    let init = {
        use base64::Engine as _;
        let (_, init) =
            tsunagu_noise::client_initiate(MACHINE, public_key(SERVER), 131).expect("init");
        base64::engine::general_purpose::STANDARD.encode(init)
    };
    let cases = [
        (
            format!("GET /ts2021 HTTP/1.1\r\nHost: h\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {init}\r\n\r\n"),
            "405",
        ),
        (
            "POST /ts2021 HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n".to_owned(),
            "426",
        ),
        (
            format!("POST /ts2021 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {init}\r\nContent-Length: 0\r\n\r\n"),
            "426",
        ),
        (
            "POST /ts2021 HTTP/1.1\r\nHost: h\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nContent-Length: 0\r\n\r\n".to_owned(),
            "400",
        ),
        (
            "POST /ts2021 HTTP/1.1\r\nHost: h\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: !!!\r\nContent-Length: 0\r\n\r\n".to_owned(),
            "400",
        ),
        (
            format!("POST /ts2021 HTTP/1.1\r\nHost: h\r\nUpgrade: tailscale-control-protocol\r\nConnection: keep-alive\r\nX-Tailscale-Handshake: {init}\r\nContent-Length: 0\r\n\r\n"),
            "400",
        ),
    ];
    for (head, want) in cases {
        let got = raw_request(addr, &head).await;
        assert!(
            got.starts_with(&format!("HTTP/1.1 {want} ")),
            "request {head:?} got {got:?}"
        );
    }
    // And a well-formed one answers exactly what Go's client checks.
    let ok = raw_request(
        addr,
        &format!("POST /ts2021 HTTP/1.1\r\nHost: h\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {init}\r\nContent-Length: 0\r\n\r\n"),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 101 "), "{ok:?}");
    assert!(
        ok.to_ascii_lowercase()
            .contains("upgrade: tailscale-control-protocol\r\n"),
        "{ok:?}"
    );
}

/// The Noise response is the first bytes after the 101 head (not a header),
/// followed by the sealed early payload records, as Go's corked write does.
#[tokio::test]
async fn response_frame_follows_101_head() {
    use base64::Engine as _;
    let addr = start_server().await;
    let (hs, init) =
        tsunagu_noise::client_initiate(MACHINE, public_key(SERVER), 131).expect("init");
    let b64 = base64::engine::general_purpose::STANDARD.encode(init);
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /ts2021 HTTP/1.1\r\nHost: h\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {b64}\r\nContent-Length: 0\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("timeout")
            .expect("read");
        assert!(n > 0, "eof");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let early_len = 3 + 9 + EARLY.len() + 16;
            if got.len() >= i + 4 + 51 + early_len {
                break i + 4;
            }
        }
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    eprintln!("101 head: {head:?}");
    assert!(!head.contains("x-tailscale-handshake"), "{head}");
    let mut conn = hs.finish(&got[end..end + 51]).expect("finish");
    let plain = conn.open(&got[end + 51..]).expect("open");
    assert_eq!(&plain[..5], b"\xff\xff\xffTS");
    assert_eq!(&plain[5..9], &(EARLY.len() as u32).to_be_bytes());
    assert_eq!(&plain[9..9 + EARLY.len()], EARLY);
}
