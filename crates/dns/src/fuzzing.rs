//! Entry points shared by the cargo-fuzz target (`fuzz/fuzz_targets/dns_message.rs`)
//! and the `fuzz_smoke` test: arbitrary bytes as a DoH request (both methods), as a
//! query to the MagicDNS zone and the upstream plan, and as an upstream's answer.
//! None of it may panic; whatever is accepted must be answerable.

use crate::doh::{self, Request};
use crate::magic::Zone;
use crate::message;
use base64::Engine as _;

/// Run every DNS entry point on `data`.
pub fn dns_message(data: &[u8]) {
    let post = Request {
        method: "POST",
        path: doh::PATH,
        query: None,
        content_type: Some(doh::CONTENT_TYPE),
        body: data,
    };
    let from_post = doh::parse_request(&post);
    let qs = format!(
        "dns={}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    );
    let get = Request {
        method: "GET",
        path: doh::PATH,
        query: Some(&qs),
        content_type: None,
        body: b"",
    };
    let from_get = doh::parse_request(&get);
    assert_eq!(
        from_post.is_ok(),
        from_get.is_ok() || data.len() > doh::MAX_BODY
    );
    // The raw bytes as a query string too.
    let raw = String::from_utf8_lossy(data);
    let _ = doh::parse_request(&Request {
        query: Some(&raw),
        ..get
    });
    let zone = Zone::new(
        Some("tailnet.internal"),
        [(
            "a.tailnet.internal.",
            vec!["100.64.0.1".parse().expect("literal")],
        )],
        &[],
    );
    if let Ok(q) = from_post {
        // Every accepted query gets a well-formed answer of each kind.
        for a in [
            message::servfail(&q),
            message::refused(&q),
            message::nxdomain(&q),
            message::address_answer(&q, &["100.64.0.1".parse().expect("literal")]),
        ] {
            assert!(message::check_answer(&q, &a).is_ok() || a.len() == 12);
        }
        let _ = zone.answer(&q);
        // The same bytes as an upstream's answer to this query.
        let _ = message::check_answer(&q, data);
        let _ = message::is_truncated(data);
    }
    let _ = message::answer_addrs(data);
    let _ = crate::resolvconf::parse(&raw);
}
