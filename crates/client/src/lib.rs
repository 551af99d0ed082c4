//! The client side of Tailscale's control protocol, as tsunagud (and the control-scale
//! benchmark's simulated nodes) speak it:
//!
//! 1. `GET /key?v=<capver>` over HTTP or HTTPS ([`transport`]): the server's Noise
//!    public key;
//! 2. `POST /ts2021` upgrade and Noise IK handshake ([`tsunagu_noise`]), then HTTP/2
//!    with prior knowledge inside the Noise channel;
//! 3. `POST /machine/register`, `POST /machine/map` (streamed: 4-byte little-endian
//!    length + zstd JSON per message).

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::time::Duration;
use tsunagu_proto::MachinePrivate;
use tsunagu_proto::MachinePublic;
use tsunagu_proto::tailcfg::{
    CURRENT_CAPABILITY_VERSION, MapRequest, MapResponse, OverTLSPublicKeyResponse, RegisterRequest,
    RegisterResponse,
};

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("bad server URL {0:?}: {1}")]
    Url(String, String),
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching the server key: {0}")]
    Key(String),
    #[error("noise dial: {0}")]
    Dial(#[from] tsunagu_noise::upgrade::DialError),
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("invalid JSON from the server: {0}")]
    Json(#[from] serde_json::Error),
    #[error("map stream: {0}")]
    Stream(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(
        "refusing plain HTTP to {0}: the server's key would come unauthenticated over the \
         network; use https://, or allow it with --insecure-http (lab and trusted networks)"
    )]
    InsecureHttp(String),
    #[error("TLS with {host}: {source}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
}

pub mod netmap;
pub mod transport;

/// A server URL (`http://` or `https://`) → (`host[:port]` for the Host header, socket
/// address).
pub async fn resolve(server_url: &str) -> Result<(String, SocketAddr), ClientError> {
    let ep = transport::resolve_url(server_url).await?;
    Ok((ep.host, ep.addr))
}

/// A TCP connection to `addr`, its socket marked with `fwmark` (`SO_MARK`) when given:
/// tsunagud marks its control connections like its tunnel packets, so they take the
/// physical network even while an exit node (or its fail-closed block) holds the
/// default route.
pub async fn tcp_connect(
    addr: SocketAddr,
    fwmark: Option<u32>,
) -> Result<tokio::net::TcpStream, ClientError> {
    let io = |source| ClientError::Connect {
        addr: addr.to_string(),
        source,
    };
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(io)?;
    if let Some(mark) = fwmark {
        socket2::SockRef::from(&sock).set_mark(mark).map_err(io)?;
    }
    let tcp = sock.connect(addr).await.map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    Ok(tcp)
}

/// `GET /key?v=…`: the server's Noise public key.
pub async fn fetch_server_key(server_url: &str) -> Result<MachinePublic, ClientError> {
    fetch_server_key_marked(server_url, None).await
}

/// [`fetch_server_key`] over a socket marked with `fwmark`.
pub async fn fetch_server_key_marked(
    server_url: &str,
    fwmark: Option<u32>,
) -> Result<MachinePublic, ClientError> {
    let ep = transport::resolve_url(server_url).await?;
    let host = ep.host.clone();
    let io = transport::connect(&ep, fwmark).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(format!("/key?v={}", CURRENT_CAPABILITY_VERSION.0))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .map_err(|e| ClientError::Key(e.to_string()))?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(ClientError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into(),
        });
    }
    let k: OverTLSPublicKeyResponse = serde_json::from_slice(&body)?;
    Ok(k.public_key)
}

/// An HTTP/2-over-Noise connection to the control server.
pub struct ControlClient {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    host: String,
}

impl ControlClient {
    /// Dial the server and run HTTP/2 over the Noise channel.
    pub async fn connect(
        server_url: &str,
        server_key: &MachinePublic,
        machine: &MachinePrivate,
    ) -> Result<Self, ClientError> {
        Self::connect_marked(server_url, server_key, machine, None).await
    }

    /// [`ControlClient::connect`] over a socket marked with `fwmark`.
    pub async fn connect_marked(
        server_url: &str,
        server_key: &MachinePublic,
        machine: &MachinePrivate,
        fwmark: Option<u32>,
    ) -> Result<Self, ClientError> {
        let ep = transport::resolve_url(server_url).await?;
        let host = ep.host.clone();
        let io = transport::connect(&ep, fwmark).await?;
        let (stream, _early) = tsunagu_noise::upgrade::dial(
            io,
            &host,
            server_key.to_bytes(),
            machine.to_bytes(),
            u16::try_from(CURRENT_CAPABILITY_VERSION.0).unwrap_or(u16::MAX),
        )
        .await?;
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(stream))
                .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("control connection ended: {e}");
            }
        });
        Ok(ControlClient { send, host })
    }

    async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        self.send.ready().await?;
        let req = http::Request::post(format!("http://{}{path}", self.host))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Stream(e.to_string()))?;
        let resp = self.send.send_request(req).await?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(resp)
    }

    pub async fn register(
        &mut self,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse, ClientError> {
        let resp = self
            .post("/machine/register", serde_json::to_vec(req)?)
            .await?;
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice(&body)?)
    }

    /// POST `body` as JSON to `path` over the Noise channel (tsunagu's own endpoints, such
    /// as the standby key handover); the answer's body.
    pub async fn post_json<T: serde::Serialize>(
        &mut self,
        path: &str,
        body: &T,
    ) -> Result<Bytes, ClientError> {
        let resp = self.post(path, serde_json::to_vec(body)?).await?;
        Ok(resp.into_body().collect().await?.to_bytes())
    }

    /// Start a map request; with `req.stream` the returned [`MapStream`] yields every
    /// message until the server closes it.
    pub async fn map(&mut self, req: &MapRequest) -> Result<MapStream, ClientError> {
        let resp = self.post("/machine/map", serde_json::to_vec(req)?).await?;
        Ok(MapStream {
            body: resp.into_body(),
            buf: Vec::new(),
            compressed: req.compress == "zstd",
            zstd: None,
        })
    }
}

/// The messages of a map response.
pub struct MapStream {
    body: Incoming,
    buf: Vec<u8>,
    compressed: bool,
    /// One decompression context for the whole stream (creating one per message costs
    /// more than decompressing a small message).
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

/// The largest message on the stream, compressed and decompressed alike: a full map of
/// thousands of peers is a few MiB; a bigger one is refused, not allocated (a "zstd
/// bomb" of a few KiB could otherwise ask for gigabytes).
const MAX_MESSAGE: usize = 64 << 20;

/// Decompresses one message (one zstd frame, as servers write them; anything else, e.g.
/// a frame without its size, takes the streaming path), never to more than `limit`
/// bytes.
fn decompress(
    ctx: &mut Option<zstd::bulk::Decompressor<'static>>,
    body: &[u8],
    limit: usize,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let size = zstd::zstd_safe::get_frame_content_size(body)
        .ok()
        .flatten()
        .and_then(|s| usize::try_from(s).ok());
    if let Some(size) = size.filter(|&s| s <= limit) {
        let d = match ctx {
            Some(d) => d,
            None => ctx.insert(zstd::bulk::Decompressor::new()?),
        };
        // The capacity bounds the output: a frame that lies about its size fails here.
        if let Ok(out) = d.decompress(body, size) {
            return Ok(out);
        }
    }
    // One byte more than allowed tells "at the limit" from "over it".
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(body)?
        .take(limit as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message decompresses to more than {limit} bytes"),
        ));
    }
    Ok(out)
}

impl MapStream {
    /// The next message, `None` when the server ended the stream.
    pub async fn next(&mut self) -> Option<Result<MapResponse, ClientError>> {
        Some(match self.next_json().await? {
            Ok(json) => serde_json::from_slice(&json).map_err(ClientError::from),
            Err(e) => Err(e),
        })
    }

    /// The next message as JSON, undecoded (for callers that read only part of it).
    pub async fn next_json(&mut self) -> Option<Result<Vec<u8>, ClientError>> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Some(Err(ClientError::Stream(format!(
                        "message of {len} bytes is too large"
                    ))));
                }
                if self.buf.len() >= 4 + len {
                    let body: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
                    let json = if self.compressed {
                        match decompress(&mut self.zstd, &body, MAX_MESSAGE) {
                            Ok(j) => j,
                            Err(e) => return Some(Err(ClientError::Stream(format!("zstd: {e}")))),
                        }
                    } else {
                        body
                    };
                    return Some(Ok(json));
                }
            }
            match self.body.frame().await {
                None => return None,
                Some(Err(e)) => return Some(Err(e.into())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next message that is not a keep-alive, waiting at most `timeout`.
    pub async fn next_update(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<MapResponse>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Err(_) => return Err(ClientError::Timeout(timeout)),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(m))) if m.keep_alive => continue,
                Ok(Some(Ok(m))) => return Ok(Some(m)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decompression_is_bounded() {
        let json = br#"{"KeepAlive":true}"#.repeat(1000);
        let frame = zstd::bulk::compress(&json, 3).unwrap();
        let mut ctx = None;
        assert_eq!(decompress(&mut ctx, &frame, json.len()).unwrap(), json);
        // Over the limit: refused on the sized path and on the streaming one.
        assert!(decompress(&mut ctx, &frame, json.len() - 1).is_err());
        let mut no_size = Vec::new();
        {
            let mut enc = zstd::stream::write::Encoder::new(&mut no_size, 3).unwrap();
            enc.include_contentsize(false).unwrap();
            std::io::Write::write_all(&mut enc, &json).unwrap();
            enc.finish().unwrap();
        }
        assert!(
            zstd::zstd_safe::get_frame_content_size(&no_size)
                .ok()
                .flatten()
                .is_none()
        );
        assert_eq!(decompress(&mut ctx, &no_size, json.len()).unwrap(), json);
        let err = decompress(&mut ctx, &no_size, json.len() - 1).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        // A bomb: 128 MiB of zeros in a few KiB stops at the limit without allocating
        // it.
        let zeros = vec![0u8; 128 << 20];
        let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
        drop(zeros);
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        assert!(decompress(&mut ctx, &bomb, 1 << 20).is_err());
    }
}
