//! Arbitrary bytes as a STUN datagram into the parsers and the STUN server core (see
//! `tsunagu_derp::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tsunagu_derp::fuzzing::stun_packet(data);
});
