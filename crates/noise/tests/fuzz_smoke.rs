//! Runs the fuzz targets' entry points on stable, as plain tests: over
//! deterministic seeds, the committed corpus in `fuzz/corpus/<target>/`
//! (if present), and fixed-seed random mutations of both.
//!
//! `cargo test -p tsunagu-noise --test fuzz_smoke -- --ignored
//! write_seed_corpus` (re)writes the seeds into `fuzz/corpus/`.

use std::path::PathBuf;

use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tsunagu_noise::handshake::{client_initiate_with_ephemeral, server_accept_with_ephemeral};
use tsunagu_noise::{Conn, frame, fuzzing, public_key};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

fn noise_seeds() -> Vec<Vec<u8>> {
    let (hs, init) =
        client_initiate_with_ephemeral([2; 32], public_key([7; 32]), 131, [3; 32]).expect("init");
    let resp = server_accept_with_ephemeral([7; 32], &init, [4; 32]).expect("accept");
    drop(hs);
    // The fuzz entry point opens with the pair keyed ([1; 32], [2; 32]), so
    // records sealed here are valid input for it.
    let (mut a, _) = Conn::pair_for_testing([1; 32], [2; 32]);
    let mut records = a.seal(b"hello").expect("seal");
    records.extend(a.seal(&[0x42; 5000]).expect("seal"));
    vec![
        Vec::new(),
        init.to_vec(),
        resp.response.to_vec(),
        frame::encode_error("wrong handshake initiation size"),
        records,
        vec![0x04, 0x0f, 0xfd],
        vec![0x04, 0x10, 0x00],
    ]
}

fn upgrade_seeds() -> Vec<Vec<u8>> {
    let (_, init) =
        client_initiate_with_ephemeral([2; 32], public_key([7; 32]), 131, [3; 32]).expect("init");
    let b64 = base64::engine::general_purpose::STANDARD.encode(init);
    let good = format!(
        "\0upgrade: tailscale-control-protocol\nconnection: upgrade\nx-tailscale-handshake: {b64}\n"
    );
    vec![
        good.clone().into_bytes(),
        good.replace("\0", "\x01").into_bytes(),
        good.replace("tailscale-control-protocol", "websocket")
            .into_bytes(),
        good.replace(&b64[..8], "!!!!!!!!").into_bytes(),
        b"\0upgrade: tailscale-control-protocol\nconnection: keep-alive, Upgrade\n".to_vec(),
    ]
}

fn corpus(target: &str, seeds: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut all = seeds;
    if let Ok(dir) = std::fs::read_dir(corpus_dir(target)) {
        for entry in dir.flatten() {
            if let Ok(data) = std::fs::read(entry.path()) {
                all.push(data);
            }
        }
    }
    all
}

fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..rng.random_range(1..8) {
        match rng.random_range(0..5) {
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
            3 if !data.is_empty() => {
                let i = rng.random_range(0..data.len());
                data[i] = [0, 0xff, 0x04, b'\n', b':'][rng.random_range(0..5)];
            }
            _ => {
                let n = rng.random_range(0..64);
                data.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    data
}

fn smoke(target: &str, seeds: Vec<Vec<u8>>, f: fn(&[u8])) {
    let inputs = corpus(target, seeds);
    let mut rng = StdRng::seed_from_u64(0xf022);
    for input in &inputs {
        f(input);
    }
    for _ in 0..3000 {
        let base = &inputs[rng.random_range(0..inputs.len())];
        f(&mutate(&mut rng, base));
    }
}

#[test]
fn noise_frames_smoke() {
    smoke("noise_frames", noise_seeds(), fuzzing::noise_frames);
}

#[test]
fn upgrade_request_smoke() {
    smoke("upgrade_request", upgrade_seeds(), fuzzing::upgrade_request);
}

#[test]
fn upgrade_seed_is_accepted() {
    // The first seed must get past validation, or the fuzzer never reaches
    // the decoding paths.
    let seed = &upgrade_seeds()[0];
    let mut headers = http::HeaderMap::new();
    for line in seed[1..].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let s = std::str::from_utf8(line).expect("utf8");
        let (k, v) = s.split_once(':').expect("colon");
        headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.trim().parse().expect("value"),
        );
    }
    tsunagu_noise::validate_upgrade_request(&http::Method::POST, http::Version::HTTP_11, &headers)
        .expect("valid seed");
}

#[test]
#[ignore = "writes fuzz/corpus seeds"]
fn write_seed_corpus() {
    for (target, seeds) in [
        ("noise_frames", noise_seeds()),
        ("upgrade_request", upgrade_seeds()),
    ] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).expect("write");
        }
    }
}
