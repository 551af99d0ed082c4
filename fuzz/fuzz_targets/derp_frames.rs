//! Arbitrary bytes as a DERP stream into the relay's and the client's connection cores
//! and the frame codec (see `tsunagu_derp::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tsunagu_derp::fuzzing::derp_frames(data);
});
