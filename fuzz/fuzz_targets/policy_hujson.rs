//! Arbitrary bytes as HuJSON policy text into the policy parser and, when they
//! form a valid policy, its compilation and every query on the result (see
//! `tsunagu_policy::fuzz_parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tsunagu_policy::fuzz_parse(data);
});
