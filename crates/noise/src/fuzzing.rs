//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the
//! `fuzz_smoke` test, so that stable-toolchain CI runs the same code paths
//! over a corpus. Each must never panic, whatever the input.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};

use crate::conn::Conn;
use crate::frame;
use crate::handshake;

/// Arbitrary bytes into every parser and into `Conn::open` of an
/// established pair, with the first byte choosing how the input is chunked.
pub fn noise_frames(data: &[u8]) {
    let _ = frame::parse_frame(data);
    let _ = frame::parse_initiation(data);
    let _ = frame::parse_response(data);
    let _ = handshake::server_accept([7; 32], data);

    let (mut a, mut b) = Conn::pair_for_testing([1; 32], [2; 32]);
    // Raw garbage, chunked.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for chunk in data.chunks(step) {
        if b.open(chunk).is_err() {
            break;
        }
    }
    // Valid records with a byte flipped or cut short must fail cleanly, and
    // untouched ones must round-trip.
    let Ok(sealed) = a.seal(data) else { return };
    let (_, mut c) = Conn::pair_for_testing([1; 32], [2; 32]);
    let mut buf = sealed.clone();
    let mut ok = c.open_in_place(&mut buf).is_ok();
    if !sealed.is_empty() {
        let (_, mut d) = Conn::pair_for_testing([1; 32], [2; 32]);
        let mut bad = sealed.clone();
        let i = usize::from(data.get(1).copied().unwrap_or(0)) % bad.len();
        bad[i] ^= 0x40;
        let _ = d.open(&bad);
        let (_, mut e) = Conn::pair_for_testing([1; 32], [2; 32]);
        let cut = &sealed[..sealed.len() - 1];
        let got = e.open(cut);
        ok &= got.is_ok();
    }
    let (_, mut f) = Conn::pair_for_testing([1; 32], [2; 32]);
    let got = f.open(&sealed);
    assert!(ok, "valid records must parse");
    assert_eq!(got.as_deref().ok(), Some(data), "round trip must be exact");
}

/// Arbitrary bytes as an HTTP request head (`name: value` lines; the first
/// byte picks method and version) into the upgrade request validation.
pub fn upgrade_request(data: &[u8]) {
    let (sel, rest) = data.split_first().map_or((0, data), |(s, r)| (*s, r));
    let method = match sel & 3 {
        0 => Method::POST,
        1 => Method::GET,
        2 => Method::CONNECT,
        _ => Method::PUT,
    };
    let version = if sel & 4 == 0 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut headers = HeaderMap::new();
    for line in rest.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    if let Err(e) = crate::upgrade::validate_upgrade_request(&method, version, &headers) {
        let _ = e.to_response();
    }
}
