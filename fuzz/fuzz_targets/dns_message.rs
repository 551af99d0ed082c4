//! Arbitrary bytes as a DNS-over-HTTPS request (POST body and GET parameter), a query
//! to the MagicDNS zone, and an upstream's answer (see `tsunagu_dns::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tsunagu_dns::fuzzing::dns_message(data);
});
