//! Arbitrary bytes into the frame parsers, the server handshake, and
//! `Conn::open` of an established pair (see `tsunagu_noise::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tsunagu_noise::fuzzing::noise_frames(data);
});
