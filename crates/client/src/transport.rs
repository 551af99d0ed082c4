//! How tsunagud reaches the control server and relays: TCP (its socket marked so that
//! it takes the physical network), with TLS for `https://` servers and relays announced
//! over TLS.
//!
//! Certificates are checked against the system's roots (`/etc/ssl/certs` on Debian), or
//! the bundle named by `SSL_CERT_FILE` / the directory `SSL_CERT_DIR`, as Go clients
//! and OpenSSL read them: a private CA (the lab's, a community's own) is trusted that
//! way.

use crate::ClientError;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// A server to connect to, from its URL or a relay's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// TLS on top of TCP.
    pub tls: bool,
    /// `host[:port]` as written: the Host header.
    pub host: String,
    /// The host name (or address) alone: what the certificate must name.
    pub server_name: String,
    pub addr: SocketAddr,
}

/// Split `host[:port]` into the name and the port (`default` when absent).
fn split_host(host: &str, default: u16) -> (String, u16) {
    if let Some(rest) = host.strip_prefix('[')
        && let Some((ip, tail)) = rest.split_once(']')
    {
        let port = tail
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default);
        return (ip.to_string(), port);
    }
    match host.rsplit_once(':') {
        Some((name, p)) if !name.contains(':') => match p.parse() {
            Ok(port) => (name.to_string(), port),
            Err(_) => (host.to_string(), default),
        },
        _ => (host.to_string(), default),
    }
}

/// How a coordination server is reached, as far as trusting it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerSecurity {
    /// `https://`: the server's key (`/key`) comes over TLS.
    Tls,
    /// `http://` to a loopback address: nobody on the network can interfere.
    Loopback,
    /// `http://` over a network, allowed by the user (`--insecure-http`): whoever sits
    /// on the path can hand out their own server key, and with it the tailnet's maps.
    Insecure,
}

/// Whether `url` may be used as coordination server: `https://` always, `http://` only
/// to a loopback host (an IP literal of 127.0.0.0/8 or `::1`, or `localhost`) unless
/// `insecure_http` allows it. Plain HTTP matters because the server's Noise key is
/// fetched over it (`GET /key`): a forged key gives a man in the middle the control
/// channel, i.e. every peer's keys and endpoints.
pub fn check_server_url(url: &str, insecure_http: bool) -> Result<ServerSecurity, ClientError> {
    let bad = |why: &str| ClientError::Url(url.into(), why.into());
    let Some(rest) = url.strip_prefix("http://") else {
        return if url.starts_with("https://") {
            Ok(ServerSecurity::Tls)
        } else {
            Err(bad("must start with http:// or https://"))
        };
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let (name, _) = split_host(host, 80);
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(ServerSecurity::Loopback)
    } else if insecure_http {
        Ok(ServerSecurity::Insecure)
    } else {
        Err(ClientError::InsecureHttp(url.into()))
    }
}

/// Parse `http://host[:port]` or `https://host[:port]` (a path is ignored) and resolve
/// the host.
pub async fn resolve_url(url: &str) -> Result<Endpoint, ClientError> {
    let bad = |why: &str| ClientError::Url(url.into(), why.into());
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad("must start with http:// or https://"));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    resolve(host, tls, if tls { 443 } else { 80 })
        .await
        .map_err(|e| match e {
            ClientError::Url(_, why) => ClientError::Url(url.into(), why),
            other => other,
        })
}

/// Resolve `host[:port]` (port `default` when absent).
pub async fn resolve(host: &str, tls: bool, default: u16) -> Result<Endpoint, ClientError> {
    let (name, port) = split_host(host, default);
    let addr = tokio::net::lookup_host((name.as_str(), port))
        .await
        .map_err(|e| ClientError::Url(host.into(), e.to_string()))?
        .next()
        .ok_or_else(|| ClientError::Url(host.into(), "no address".into()))?;
    Ok(Endpoint {
        tls,
        host: host.to_string(),
        server_name: name,
        addr,
    })
}

/// A connection to a server: plain TCP or TLS over it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Connect to `ep` over a socket marked with `fwmark`, with TLS when it asks for it.
pub async fn connect(ep: &Endpoint, fwmark: Option<u32>) -> Result<Conn, ClientError> {
    let tcp = crate::tcp_connect(ep.addr, fwmark).await?;
    if !ep.tls {
        return Ok(Conn::Plain(tcp));
    }
    let name = rustls_pki_types::ServerName::try_from(ep.server_name.clone())
        .map_err(|e| ClientError::Url(ep.host.clone(), format!("not a TLS server name: {e}")))?;
    let tls = TlsConnector::from(tls_config())
        .connect(name, tcp)
        .await
        .map_err(|source| ClientError::Tls {
            host: ep.host.clone(),
            source,
        })?;
    Ok(Conn::Tls(Box::new(tls)))
}

/// The TLS client configuration: the system's roots (or `SSL_CERT_FILE`/`SSL_CERT_DIR`),
/// loaded once.
fn tls_config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!("TLS roots: {e}");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "TLS roots loaded");
            Arc::new(
                ClientConfig::builder_with_provider(Arc::new(
                    tokio_rustls::rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
            )
        })
        .clone()
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports() {
        assert_eq!(
            split_host("198.51.100.4", 443),
            ("198.51.100.4".into(), 443)
        );
        assert_eq!(
            split_host("198.51.100.4:8080", 443),
            ("198.51.100.4".into(), 8080)
        );
        assert_eq!(
            split_host("[2001:db8::4]:8443", 443),
            ("2001:db8::4".into(), 8443)
        );
        assert_eq!(split_host("[2001:db8::4]", 80), ("2001:db8::4".into(), 80));
        assert_eq!(split_host("ctl.example", 80), ("ctl.example".into(), 80));
    }

    #[test]
    fn plain_http_only_to_loopback_or_when_allowed() {
        use ServerSecurity::*;
        for (url, insecure, want) in [
            ("https://198.51.100.4", false, Some(Tls)),
            ("https://198.51.100.4:8443/x", true, Some(Tls)),
            ("http://127.0.0.1:8080", false, Some(Loopback)),
            ("http://127.3.4.5", false, Some(Loopback)),
            ("http://[::1]:8080", false, Some(Loopback)),
            ("http://localhost:8080/", false, Some(Loopback)),
            ("http://198.51.100.4:8080", false, None),
            ("http://198.51.100.4:8080", true, Some(Insecure)),
            ("http://[2001:db8::4]:80", false, None),
            ("http://ctl.example", false, None),
            ("http://127.0.0.1.ctl.example", false, None),
            ("http://ctl.example", true, Some(Insecure)),
        ] {
            let got = check_server_url(url, insecure);
            match want {
                Some(w) => assert_eq!(got.unwrap(), w, "{url}"),
                None => assert!(
                    matches!(got, Err(ClientError::InsecureHttp(ref u)) if u == url),
                    "{url}: {got:?}"
                ),
            }
        }
        for bad in ["ftp://198.51.100.4", "198.51.100.4", "http://", "http:///x"] {
            assert!(
                matches!(check_server_url(bad, true), Err(ClientError::Url(..))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn urls() {
        let e = resolve_url("https://198.51.100.4").await.unwrap();
        assert!(e.tls);
        assert_eq!(e.addr, "198.51.100.4:443".parse().unwrap());
        assert_eq!(
            (e.host.as_str(), e.server_name.as_str()),
            ("198.51.100.4", "198.51.100.4")
        );
        let e = resolve_url("http://198.51.100.4:8080/some/path")
            .await
            .unwrap();
        assert!(!e.tls);
        assert_eq!(e.addr, "198.51.100.4:8080".parse().unwrap());
        assert_eq!(e.host, "198.51.100.4:8080");
        for bad in [
            "ftp://198.51.100.4",
            "198.51.100.4",
            "https://",
            "http:///x",
        ] {
            assert!(
                matches!(resolve_url(bad).await, Err(ClientError::Url(..))),
                "{bad}"
            );
        }
    }
}
