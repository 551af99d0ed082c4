//! Runs the fuzz targets' entry points on stable, as plain tests: over seeds that reach
//! every frame type and the login, the committed corpus in `fuzz/corpus/<target>/` (if
//! present), and fixed-seed random mutations of both.

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use tsunagu_derp::frame::{ClientMessage, ServerMessage};
use tsunagu_derp::{ClientInfo, fuzzing, info, stun};
use tsunagu_proto::{NodePrivate, NodePublic};

fn corpus(target: &str, mut seeds: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(data) = std::fs::read(e.path()) {
                seeds.push(data);
            }
        }
    }
    seeds
}

fn derp_seeds() -> Vec<Vec<u8>> {
    // A valid login for the fuzz entry point's server key ([5; 32]).
    let server = NodePrivate::from_bytes([5; 32]).public();
    let client = NodePrivate::from_bytes([6; 32]);
    let sealed = info::seal_json(&client, &server, &ClientInfo::default());
    let mut login = BytesMut::new();
    ClientMessage::ClientInfo {
        key: client.public(),
        sealed: Bytes::from(sealed),
    }
    .encode(&mut login);
    let mut steady = login.clone();
    for m in [
        ClientMessage::SendPacket {
            dst: NodePublic([1; 32]),
            packet: Bytes::from_static(b"wg"),
        },
        ClientMessage::NotePreferred(true),
        ClientMessage::Ping([1; 8]),
        ClientMessage::KeepAlive,
        ClientMessage::WatchConns,
    ] {
        m.encode(&mut steady);
    }
    let mut from_server = BytesMut::new();
    for m in [
        ServerMessage::ServerKey(server),
        ServerMessage::RecvPacket {
            src: NodePublic([2; 32]),
            packet: Bytes::from_static(b"x"),
        },
        ServerMessage::Health("h".into()),
        ServerMessage::Restarting {
            reconnect_in_ms: 1,
            try_for_ms: 2,
        },
    ] {
        m.encode(&mut from_server);
    }
    vec![
        Vec::new(),
        login.to_vec(),
        steady.to_vec(),
        from_server.to_vec(),
        vec![0x04, 0xff, 0xff, 0xff, 0xff],
    ]
}

fn stun_seeds() -> Vec<Vec<u8>> {
    let tx = stun::TxId([9; 12]);
    vec![
        stun::binding_request(tx),
        stun::binding_response(tx, ([198, 51, 100, 3], 41641).into()),
        stun::binding_response(tx, "[2001:db8::1]:3478".parse().unwrap()),
        vec![0; 20],
    ]
}

fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..rng.random_range(1..6) {
        match rng.random_range(0..4) {
            0 if !data.is_empty() => {
                let i = rng.random_range(0..data.len());
                data[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !data.is_empty() => {
                let i = rng.random_range(0..data.len());
                data.truncate(i);
            }
            2 => {
                let i = rng.random_range(0..=data.len());
                data.insert(i, rng.random());
            }
            _ => {
                let n = rng.random_range(0..32);
                data.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    data
}

fn smoke(target: &str, seeds: Vec<Vec<u8>>, f: fn(&[u8])) {
    let inputs = corpus(target, seeds);
    let mut rng = StdRng::seed_from_u64(0xde4f);
    for input in &inputs {
        f(input);
    }
    for _ in 0..3000 {
        let base = &inputs[rng.random_range(0..inputs.len())];
        f(&mutate(&mut rng, base));
    }
}

#[test]
fn derp_frames_smoke() {
    smoke("derp_frames", derp_seeds(), fuzzing::derp_frames);
}

#[test]
fn stun_packet_smoke() {
    smoke("stun_packet", stun_seeds(), fuzzing::stun_packet);
}

#[test]
#[ignore = "writes fuzz/corpus seeds"]
fn write_seed_corpus() {
    for (target, seeds) in [("derp_frames", derp_seeds()), ("stun_packet", stun_seeds())] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
        }
    }
}
