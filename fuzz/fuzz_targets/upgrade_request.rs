//! Arbitrary header bytes into the ts2021 upgrade request validation (see
//! `tsunagu_noise::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tsunagu_noise::fuzzing::upgrade_request(data);
});
