//! The fuzz target's entry point on stable: fixed inputs and a bounded pseudo-random
//! sweep (real queries with bytes flipped), so CI runs the same code paths.

use tsunagu_dns::hickory_proto::rr::RecordType;
use tsunagu_dns::message::build_query;

#[test]
fn dns_message_survives_garbage_and_mutations() {
    let seeds = [
        build_query(1, "web.lab.test", RecordType::A).unwrap(),
        build_query(2, "a.tailnet.internal", RecordType::AAAA).unwrap(),
        build_query(3, "1.0.64.100.in-addr.arpa", RecordType::PTR).unwrap(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 600],
        Vec::new(),
    ];
    let mut x: u32 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for s in &seeds {
        tsunagu_dns::fuzzing::dns_message(s);
        for _ in 0..2000 {
            let mut m = s.clone();
            if m.is_empty() {
                m.push(0);
            }
            for _ in 0..(next() % 4 + 1) {
                let i = next() as usize % m.len();
                m[i] = next() as u8;
            }
            if next() % 8 == 0 {
                m.truncate(next() as usize % m.len());
            }
            tsunagu_dns::fuzzing::dns_message(&m);
        }
    }
}
