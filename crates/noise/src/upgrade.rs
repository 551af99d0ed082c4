//! The ts2021 HTTP upgrade that carries the Noise handshake, both sides.
//!
//! Checked against tailscale `control/controlhttp/client.go`
//! (`tryURLUpgrade`), `controlhttp/controlhttpserver/controlhttpserver.go`
//! (`acceptHTTP`) and `controlhttpcommon`:
//!
//! - the client sends `POST /ts2021` with `Upgrade: tailscale-control-protocol`,
//!   `Connection: upgrade` and `X-Tailscale-Handshake: base64(initiation)`
//!   (standard alphabet, padded): the initiation rides in the request;
//! - the server answers `101 Switching Protocols` with
//!   `Upgrade: tailscale-control-protocol` and `Connection: upgrade`; the Go
//!   client compares the `Upgrade` value exactly;
//! - the 51-byte Noise response is **not** a header: it is the first bytes on
//!   the upgraded connection after the 101 headers; Go writes it "corked",
//!   together with the optional early payload records, in one write;
//! - the early payload (`"\xff\xff\xffTS"`, u32 BE length, JSON
//!   `tailcfg.EarlyNoise`) goes *inside* the Noise channel, before HTTP/2;
//!   servers send it only to clients of capability version 49 or later
//!   (headscale's `earlyNoise`; older clients would parse it as HTTP/2).
//!
//! Deviation from Go, on purpose: we run the (pure) handshake computation
//! *before* answering, so a malformed or unauthentic initiation gets a 4xx
//! instead of a 101 followed by a closed connection. A Go client fails either
//! way; ours says why.

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::header::{CONNECTION, HeaderMap, HeaderValue, UPGRADE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::ConnError;
use crate::frame::{HEADER_LEN, MSG_TYPE_ERROR, RESPONSE_LEN};
use crate::handshake::{self, HandshakeError, ServerHandshake};
use crate::stream::{NoiseStream, encode_early_payload};

/// Path of the upgrade endpoint (Go: `serverUpgradePath`).
pub const UPGRADE_PATH: &str = "/ts2021";
/// Value of the `Upgrade` header both ways.
pub const UPGRADE_PROTOCOL: &str = "tailscale-control-protocol";
/// Request header carrying the base64 initiation.
pub const HANDSHAKE_HEADER: &str = "X-Tailscale-Handshake";
/// First capability version that understands the early payload.
pub const EARLY_NOISE_MIN_CAPVER: u16 = 49;
/// Largest HTTP response head the client reads before giving up.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The body type of every response produced here (empty for the 101).
pub type UpgradeBody = Full<Bytes>;

/// Why an upgrade was refused or failed; [`UpgradeError::status`] gives the
/// HTTP answer for the ones detected before the 101.
#[derive(Debug, Error)]
pub enum UpgradeError {
    /// Not a POST (Go clients always POST; the WebSocket variant, a GET, is
    /// not supported).
    #[error("method {0} not allowed for the control upgrade")]
    MethodNotAllowed(Method),
    /// Not HTTP/1.1: HTTP/2 and HTTP/1.0 cannot switch protocols here.
    #[error("make request over HTTP/1.1 (got {0:?})")]
    WrongHttpVersion(Version),
    /// No `Upgrade` header.
    #[error("missing next protocol")]
    MissingUpgrade,
    /// An `Upgrade` other than `tailscale-control-protocol` (including
    /// `websocket`, which we do not implement).
    #[error("unknown next protocol {0:?}")]
    UnsupportedUpgrade(String),
    /// `Connection` lacks the `upgrade` token.
    #[error("Connection header lacks the upgrade token")]
    MissingConnectionUpgrade,
    /// No `X-Tailscale-Handshake` header.
    #[error("missing Tailscale handshake header")]
    MissingHandshake,
    /// `X-Tailscale-Handshake` is not standard, padded base64.
    #[error("invalid tailscale handshake header")]
    InvalidHandshakeEncoding,
    /// The initiation is malformed or does not authenticate.
    #[error("noise handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The server (hyper) offers no upgrade for this request.
    #[error("connection cannot be upgraded")]
    NotUpgradable,
    /// The upgrade did not complete after the 101 (connection lost).
    #[error("upgrade failed: {0}")]
    Upgrade(#[source] hyper::Error),
    /// Writing the handshake response failed.
    #[error("writing handshake response: {0}")]
    Io(#[from] io::Error),
    /// Sealing the early payload failed.
    #[error("sealing early payload: {0}")]
    Seal(#[from] ConnError),
}

impl UpgradeError {
    /// The HTTP status to answer with (for errors raised before the 101;
    /// later ones have no HTTP answer and map to 500 only for logging).
    pub fn status(&self) -> StatusCode {
        match self {
            UpgradeError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeError::MissingUpgrade | UpgradeError::UnsupportedUpgrade(_) => {
                StatusCode::UPGRADE_REQUIRED
            }
            UpgradeError::WrongHttpVersion(_)
            | UpgradeError::MissingConnectionUpgrade
            | UpgradeError::MissingHandshake
            | UpgradeError::InvalidHandshakeEncoding
            | UpgradeError::Handshake(_)
            | UpgradeError::NotUpgradable => StatusCode::BAD_REQUEST,
            UpgradeError::Upgrade(_) | UpgradeError::Io(_) | UpgradeError::Seal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A plain-text error response. The text never echoes request bytes
    /// (only our fixed messages), like Go's `http.Error` calls.
    pub fn to_response(&self) -> Response<UpgradeBody> {
        let text = match self {
            UpgradeError::MethodNotAllowed(_) => "use POST for the control upgrade\n",
            UpgradeError::WrongHttpVersion(_) => "make request over HTTP/1.1\n",
            UpgradeError::MissingUpgrade => "missing next protocol\n",
            UpgradeError::UnsupportedUpgrade(_) => "unknown next protocol\n",
            UpgradeError::MissingConnectionUpgrade => "missing Connection: upgrade\n",
            UpgradeError::MissingHandshake => "missing Tailscale handshake header\n",
            UpgradeError::InvalidHandshakeEncoding => "invalid tailscale handshake header\n",
            UpgradeError::Handshake(_) => "noise handshake failed\n",
            UpgradeError::NotUpgradable => "connection cannot be upgraded\n",
            UpgradeError::Upgrade(_) | UpgradeError::Io(_) | UpgradeError::Seal(_) => {
                "internal error\n"
            }
        };
        let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            UpgradeError::MethodNotAllowed(_) => {
                h.insert(http::header::ALLOW, HeaderValue::from_static("POST"));
            }
            UpgradeError::MissingUpgrade | UpgradeError::UnsupportedUpgrade(_) => {
                h.insert(UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
                h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            }
            _ => {}
        }
        resp
    }
}

/// Does a comma-separated header list contain `token` (case-insensitive)?
fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Checks an upgrade request's method, version and headers (the path is the
/// router's business) and returns the decoded initiation frame, not yet
/// verified cryptographically. Pure, so it can be fuzzed.
pub fn validate_upgrade_request(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<Vec<u8>, UpgradeError> {
    if method != Method::POST {
        return Err(UpgradeError::MethodNotAllowed(method.clone()));
    }
    if version != Version::HTTP_11 {
        return Err(UpgradeError::WrongHttpVersion(version));
    }
    let upgrade = headers
        .get(UPGRADE)
        .ok_or(UpgradeError::MissingUpgrade)?
        .to_str()
        .map_err(|_| UpgradeError::UnsupportedUpgrade("<non-ascii>".into()))?
        .trim();
    if upgrade.is_empty() {
        return Err(UpgradeError::MissingUpgrade);
    }
    // Go lower-cases the value before comparing.
    if !upgrade.eq_ignore_ascii_case(UPGRADE_PROTOCOL) {
        let shown: String = upgrade.chars().take(64).collect();
        return Err(UpgradeError::UnsupportedUpgrade(shown));
    }
    if !has_token(headers, CONNECTION, "upgrade") {
        return Err(UpgradeError::MissingConnectionUpgrade);
    }
    let b64 = headers
        .get(HANDSHAKE_HEADER)
        .ok_or(UpgradeError::MissingHandshake)?
        .as_bytes();
    if b64.is_empty() {
        return Err(UpgradeError::MissingHandshake);
    }
    // A valid initiation is 101 bytes = 136 base64 chars; refuse big junk
    // before decoding it.
    if b64.len() > 256 {
        return Err(UpgradeError::Handshake(HandshakeError::Frame(
            crate::frame::FrameError::TrailingBytes(b64.len() / 4 * 3),
        )));
    }
    let init = B64
        .decode(b64)
        .map_err(|_| UpgradeError::InvalidHandshakeEncoding)?;
    crate::frame::parse_initiation(&init).map_err(HandshakeError::from)?;
    Ok(init)
}

/// A client that passed the upgrade and the handshake.
#[derive(Debug)]
pub struct Accepted<T> {
    /// The encrypted stream; HTTP/2 (prior knowledge) runs over it next.
    pub stream: NoiseStream<T>,
    /// The client's machine public key.
    pub machine_public: [u8; 32],
    /// The client's capability version.
    pub capver: u16,
    /// Whether the early payload was sent (only to capver >= 49).
    pub early_sent: bool,
}

/// An upgrade answered (or about to be answered) with 101: awaiting it
/// waits for hyper to hand over the connection, then writes the Noise
/// response and early payload and yields the [`Accepted`] stream.
///
/// The client's key and version are known already, so a caller may drop this
/// and answer an error instead of the 101 (e.g. for a refused capver).
pub struct PendingUpgrade {
    on_upgrade: OnUpgrade,
    hs: ServerHandshake,
    early: Option<Vec<u8>>,
}

impl std::fmt::Debug for PendingUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingUpgrade")
            .field("capver", &self.hs.capver)
            .finish_non_exhaustive()
    }
}

impl PendingUpgrade {
    /// The client's authenticated machine public key.
    pub fn machine_public(&self) -> [u8; 32] {
        self.hs.machine_public
    }

    /// The client's capability version.
    pub fn capver(&self) -> u16 {
        self.hs.capver
    }

    /// Waits for the upgraded connection and finishes the server side.
    pub async fn complete(self) -> Result<Accepted<TokioIo<Upgraded>>, UpgradeError> {
        let upgraded = self.on_upgrade.await.map_err(UpgradeError::Upgrade)?;
        finish_server(TokioIo::new(upgraded), self.hs, self.early.as_deref()).await
    }
}

impl IntoFuture for PendingUpgrade {
    type Output = Result<Accepted<TokioIo<Upgraded>>, UpgradeError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.complete())
    }
}

/// Sends the handshake response and the sealed early payload in one write
/// (Go's corked conn), and wraps `io` in a [`NoiseStream`].
///
/// Exposed for servers that upgrade without hyper (raw TCP tests, custom
/// front ends).
pub async fn finish_server<T: AsyncRead + AsyncWrite + Unpin>(
    mut io: T,
    hs: ServerHandshake,
    early_json: Option<&[u8]>,
) -> Result<Accepted<T>, UpgradeError> {
    let ServerHandshake {
        mut conn,
        response,
        machine_public,
        capver,
    } = hs;
    let mut out = response.to_vec();
    let early_sent = match early_json {
        Some(json) if capver >= EARLY_NOISE_MIN_CAPVER => {
            conn.seal_into(&encode_early_payload(json), &mut out)?;
            true
        }
        _ => false,
    };
    io.write_all(&out).await?;
    io.flush().await?;
    Ok(Accepted {
        stream: NoiseStream::new(io, conn),
        machine_public,
        capver,
        early_sent,
    })
}

/// Server side of the upgrade, to call from a hyper or axum handler for
/// `POST /ts2021`.
///
/// Validates the request, runs the handshake, and returns the 101 response
/// to send plus a [`PendingUpgrade`] to await (typically in a spawned task)
/// once the response is on its way. `early_json` is the `tailcfg.EarlyNoise`
/// JSON to send first inside the channel (only to clients of capability
/// version >= 49). On error, answer with [`UpgradeError::to_response`].
pub fn accept_upgrade<B>(
    mut req: Request<B>,
    server_private: [u8; 32],
    early_json: Option<Vec<u8>>,
) -> Result<(Response<UpgradeBody>, PendingUpgrade), UpgradeError> {
    let init = validate_upgrade_request(req.method(), req.version(), req.headers())?;
    let hs = handshake::server_accept(server_private, &init)?;
    let on_upgrade = req
        .extensions_mut()
        .remove::<OnUpgrade>()
        .ok_or(UpgradeError::NotUpgradable)?;
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    Ok((
        resp,
        PendingUpgrade {
            on_upgrade,
            hs,
            early: early_json,
        },
    ))
}

/// Why a client upgrade failed.
#[derive(Debug, Error)]
pub enum DialError {
    /// Connecting or reading/writing failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The host is not a valid `Host` header value.
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    /// The server's HTTP response is malformed or too large.
    #[error("bad HTTP response: {0}")]
    BadResponse(&'static str),
    /// The server did not switch protocols.
    #[error("unexpected HTTP response status {0}")]
    UnexpectedStatus(u16),
    /// The server switched to another protocol.
    #[error("server switched to unexpected protocol {0:?}")]
    WrongProtocol(String),
    /// The Noise handshake failed (or the server sent an error frame).
    #[error("noise handshake: {0}")]
    Handshake(#[from] HandshakeError),
}

/// Reads until `buf` holds at least `n` bytes (reading in small pieces so
/// that at most 4 KiB past `n` is ever buffered).
async fn fill_to<T: AsyncRead + Unpin>(io: &mut T, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    let mut tmp = [0u8; 4096];
    while buf.len() < n {
        let got = io.read(&mut tmp).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..got]);
    }
    Ok(())
}

/// Client side of the upgrade over an established connection (TCP, or TLS
/// for the port-443 fallback): sends `POST /ts2021` with the initiation,
/// checks the 101, and completes the handshake. Does not read the early
/// payload: see [`NoiseStream::read_early_payload`] or [`dial`].
///
/// No timeout is applied: wrap the call in `tokio::time::timeout`.
pub async fn upgrade_client<T: AsyncRead + AsyncWrite + Unpin>(
    mut io: T,
    host: &str,
    server_public: [u8; 32],
    machine_private: [u8; 32],
    capver: u16,
) -> Result<NoiseStream<T>, DialError> {
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(DialError::InvalidHost(host.escape_debug().to_string()));
    }
    let (hs, init) = handshake::client_initiate(machine_private, server_public, capver)?;
    let request = format!(
        "POST {UPGRADE_PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tsunagu/{}\r\n\
         Upgrade: {UPGRADE_PROTOCOL}\r\nConnection: upgrade\r\n\
         {HANDSHAKE_HEADER}: {}\r\nContent-Length: 0\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        B64.encode(init),
    );
    io.write_all(request.as_bytes()).await?;
    io.flush().await?;

    // Read the response head.
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let code = resp.code.unwrap_or(0);
                if code != 101 {
                    return Err(DialError::UnexpectedStatus(code));
                }
                let upgrade = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("upgrade"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
                    .unwrap_or_default();
                if !upgrade.trim().eq_ignore_ascii_case(UPGRADE_PROTOCOL) {
                    return Err(DialError::WrongProtocol(upgrade.chars().take(64).collect()));
                }
                break len;
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return Err(DialError::BadResponse("unparsable response head")),
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(DialError::BadResponse("response head too large"));
        }
        let want = buf.len() + 1;
        fill_to(&mut io, &mut buf, want).await?;
    };
    let mut raw = buf.split_off(head_len);

    // The Noise response (or an error frame) follows the head.
    fill_to(&mut io, &mut raw, HEADER_LEN).await?;
    let need = if raw[0] == MSG_TYPE_ERROR {
        HEADER_LEN + usize::from(u16::from_be_bytes([raw[1], raw[2]]))
    } else {
        RESPONSE_LEN
    };
    fill_to(&mut io, &mut raw, need).await?;
    let conn = hs.finish(&raw[..need])?;
    Ok(NoiseStream::with_buffered(io, conn, &raw[need..]))
}

/// [`upgrade_client`], then reads the optional early payload (JSON bytes of
/// `tailcfg.EarlyNoise`). Unlike Go, which peeks lazily on the first read,
/// this waits for the server's first 9 plaintext bytes; every server sends
/// those unprompted (early payload or its HTTP/2 SETTINGS).
pub async fn dial<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
    host: &str,
    server_public: [u8; 32],
    machine_private: [u8; 32],
    capver: u16,
) -> Result<(NoiseStream<T>, Option<Vec<u8>>), DialError> {
    let mut stream = upgrade_client(io, host, server_public, machine_private, capver).await?;
    let early = stream.read_early_payload().await?;
    Ok((stream, early))
}

/// [`dial`] over a new TCP connection to `addr` (plain HTTP, Go's port-80
/// fast path), with `TCP_NODELAY` set as Go's dialer does.
pub async fn dial_tcp(
    addr: SocketAddr,
    host: &str,
    server_public: [u8; 32],
    machine_private: [u8; 32],
    capver: u16,
) -> Result<(NoiseStream<TcpStream>, Option<Vec<u8>>), DialError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    dial(tcp, host, server_public, machine_private, capver).await
}
