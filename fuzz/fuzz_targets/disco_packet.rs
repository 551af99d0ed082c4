//! Arbitrary bytes as a disco datagram (header, box) and as a disco plaintext (see
//! `tsunagu_disco::fuzz_one`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tsunagu_disco::fuzz_one(data);
});
