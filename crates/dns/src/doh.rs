//! The exit node's DNS-over-HTTPS endpoint, as Tailscale clients use it: plain HTTP
//! over the tunnel to `http://<exit IP>:<peerapi port>/dns-query`, RFC 8484 messages.
//!
//! * `POST` with `Content-Type: application/dns-message` and the query as the body;
//! * `GET` with `?dns=<base64url query>` (Go's exit nodes take it too).
//!
//! [`parse_request`] turns the parts of an HTTP request into a checked [`Query`] or the
//! status to refuse it with: 404 elsewhere than `/dns-query`, 405 other methods, 415 a
//! POST of another type, 413 oversized, 400 a missing or undecodable parameter or a body
//! that is not a DNS query. Answers go back as `application/dns-message`.

use crate::message::{MAX_QUERY, MessageError, Query, parse_query};
use base64::Engine as _;

/// The endpoint's path.
pub const PATH: &str = "/dns-query";
/// The media type of DoH bodies, both ways.
pub const CONTENT_TYPE: &str = "application/dns-message";
/// Largest request body read (the HTTP server stops reading beyond it).
pub const MAX_BODY: usize = MAX_QUERY;
/// Longest `?dns=` value: the base64url of [`MAX_QUERY`] bytes.
pub const MAX_PARAM: usize = MAX_QUERY.div_ceil(3) * 4;

/// The parts of an HTTP request the endpoint looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The raw query string (after `?`), if any.
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

/// Why a request is refused, with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DohError {
    #[error("no such path (DNS queries go to {PATH})")]
    NotFound,
    #[error("method not allowed (GET or POST)")]
    Method,
    #[error("content type must be {CONTENT_TYPE}")]
    ContentType,
    #[error("missing 'dns' parameter")]
    MissingParam,
    #[error("'dns' is not base64url")]
    BadBase64,
    #[error("query too large")]
    TooLarge,
    #[error("not a DNS query: {0}")]
    NotAQuery(MessageError),
}

impl DohError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            DohError::NotFound => 404,
            DohError::Method => 405,
            DohError::ContentType => 415,
            DohError::TooLarge | DohError::NotAQuery(MessageError::TooLarge(_)) => 413,
            DohError::MissingParam | DohError::BadBase64 | DohError::NotAQuery(_) => 400,
        }
    }
}

/// The `dns` parameter of a query string (`a=b&dns=...`).
fn dns_param(query: &str) -> Option<&str> {
    query.split('&').find_map(|kv| kv.strip_prefix("dns="))
}

/// Check a request and extract its query.
pub fn parse_request(r: &Request<'_>) -> Result<Query, DohError> {
    if r.path != PATH {
        return Err(DohError::NotFound);
    }
    let bytes = match r.method {
        "GET" => {
            let p = r.query.and_then(dns_param).ok_or(DohError::MissingParam)?;
            if p.len() > MAX_PARAM {
                return Err(DohError::TooLarge);
            }
            // Unpadded per RFC 8484; padded values are accepted too.
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .map_err(|_| DohError::BadBase64)?
        }
        "POST" => {
            let ct = r.content_type.unwrap_or_default();
            let media = ct.split(';').next().unwrap_or_default().trim();
            if !media.eq_ignore_ascii_case(CONTENT_TYPE) {
                return Err(DohError::ContentType);
            }
            if r.body.len() > MAX_BODY {
                return Err(DohError::TooLarge);
            }
            r.body.to_vec()
        }
        _ => return Err(DohError::Method),
    };
    parse_query(&bytes).map_err(DohError::NotAQuery)
}

/// The GET URL for `query` at `base` (`http://100.64.0.2:40123/dns-query`).
pub fn get_url(base: &str, query: &[u8]) -> String {
    format!(
        "{base}?dns={}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(query)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::build_query;
    use hickory_proto::rr::RecordType;

    fn post<'a>(ct: Option<&'a str>, body: &'a [u8]) -> Request<'a> {
        Request {
            method: "POST",
            path: PATH,
            query: None,
            content_type: ct,
            body,
        }
    }

    #[test]
    fn post_and_get_carry_the_same_query() {
        let q = build_query(5, "web.lab.test", RecordType::A).unwrap();
        let a = parse_request(&post(Some(CONTENT_TYPE), &q)).unwrap();
        assert_eq!(a.bytes, q);
        let url = get_url("http://100.64.0.2:1/dns-query", &q);
        let qs = url.split_once('?').unwrap().1;
        let b = parse_request(&Request {
            method: "GET",
            path: PATH,
            query: Some(qs),
            content_type: None,
            body: b"",
        })
        .unwrap();
        assert_eq!(b.bytes, q);
        // Parameters: others ignored, padding tolerated.
        let padded = format!("x=1&{qs}==");
        assert!(
            parse_request(&Request {
                method: "GET",
                path: PATH,
                query: Some(&padded),
                content_type: None,
                body: b""
            })
            .is_ok()
        );
    }

    #[test]
    fn refusals_have_their_status() {
        let q = build_query(5, "web.lab.test", RecordType::A).unwrap();
        let status = |r: Request<'_>| parse_request(&r).unwrap_err().status();
        assert_eq!(status(post(Some("text/plain"), &q)), 415);
        assert_eq!(status(post(None, &q)), 415);
        assert_eq!(status(post(Some(CONTENT_TYPE), b"hello, world")), 400);
        assert_eq!(status(post(Some(CONTENT_TYPE), b"")), 400);
        assert_eq!(
            status(post(Some(CONTENT_TYPE), &vec![0u8; MAX_BODY + 1])),
            413
        );
        assert_eq!(
            status(Request {
                path: "/v0/env",
                ..post(Some(CONTENT_TYPE), &q)
            }),
            404
        );
        assert_eq!(
            status(Request {
                method: "PUT",
                ..post(Some(CONTENT_TYPE), &q)
            }),
            405
        );
        let get = |qs: &'static str| Request {
            method: "GET",
            path: PATH,
            query: Some(qs),
            content_type: None,
            body: b"",
        };
        assert_eq!(status(get("q=web.lab.test")), 400);
        assert_eq!(status(get("dns=!!!")), 400);
        let huge: &'static str = Box::leak("A".repeat(MAX_PARAM + 4).into_boxed_str());
        let big = format!("dns={huge}");
        let big: &'static str = Box::leak(big.into_boxed_str());
        assert_eq!(status(get(big)), 413);
    }
}
