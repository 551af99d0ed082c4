//! Record layer: seal/open with arbitrary chunking (fixed-seed property
//! test), limits, and garbage.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tsunagu_noise::frame::{MAX_FRAME_SIZE, MAX_PLAINTEXT_SIZE};
use tsunagu_noise::{Conn, ConnError, FrameError};

fn pair() -> (Conn, Conn) {
    Conn::pair_for_testing([3; 32], [4; 32])
}

#[test]
fn random_chunking_roundtrip() {
    let mut rng = StdRng::seed_from_u64(0x7453_2021);
    for case in 0..200 {
        let (mut a, mut b) = pair();
        // A few messages of random sizes, some over one record, some empty.
        let mut sent = Vec::new();
        let mut wire = Vec::new();
        for _ in 0..rng.random_range(1..6) {
            let len = match rng.random_range(0..4) {
                0 => 0,
                1 => rng.random_range(1..64),
                2 => rng.random_range(MAX_PLAINTEXT_SIZE - 2..MAX_PLAINTEXT_SIZE + 3),
                _ => rng.random_range(1..20_000),
            };
            let mut msg = vec![0u8; len];
            rng.fill_bytes(&mut msg);
            a.seal_into(&msg, &mut wire).expect("seal");
            sent.extend_from_slice(&msg);
        }
        // Feed in random pieces, 0..9000 bytes each.
        let mut got = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let n = rng.random_range(0..9000).min(rest.len());
            let (piece, tail) = rest.split_at(n);
            got.extend(b.open(piece).expect("open"));
            assert!(
                b.buffered_len() < MAX_FRAME_SIZE,
                "case {case}: buffered a whole frame"
            );
            rest = tail;
        }
        assert_eq!(got, sent, "case {case}");
        assert_eq!(b.buffered_len(), 0);
        assert_eq!(a.tx_count(), b.rx_count());
    }
}

#[test]
fn one_byte_at_a_time() {
    let (mut a, mut b) = pair();
    let msg: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let wire = a.seal(&msg).expect("seal");
    let mut got = Vec::new();
    for byte in &wire {
        got.extend(b.open(std::slice::from_ref(byte)).expect("open"));
    }
    assert_eq!(got, msg);
}

#[test]
fn records_are_split_at_4096_bytes() {
    let (mut a, _) = pair();
    let wire = a
        .seal(&vec![0u8; 2 * MAX_PLAINTEXT_SIZE + 1])
        .expect("seal");
    assert_eq!(wire.len(), 2 * MAX_FRAME_SIZE + 3 + 1 + 16);
    assert_eq!(&wire[..3], &[0x04, 0x0f, 0xfd]);
    assert_eq!(
        &wire[MAX_FRAME_SIZE..MAX_FRAME_SIZE + 3],
        &[0x04, 0x0f, 0xfd]
    );
    assert_eq!(
        &wire[2 * MAX_FRAME_SIZE..2 * MAX_FRAME_SIZE + 3],
        &[0x04, 0, 17]
    );
    assert!(
        a.seal(&[]).expect("seal").is_empty(),
        "empty write sends nothing, as in Go"
    );
    assert_eq!(a.tx_count(), 3);
}

#[test]
fn zero_length_record_is_accepted() {
    // Go's reader skips zero-length records; our writer never sends one, so
    // build it with the AEAD directly: key [3; 32] is a's transmit key.
    use chacha20poly1305::ChaCha20Poly1305;
    use chacha20poly1305::aead::{Aead, KeyInit};
    let aead = ChaCha20Poly1305::new(&[3u8; 32].into());
    let tag = aead.encrypt((&[0u8; 12]).into(), &b""[..]).expect("enc");
    let mut wire = vec![0x04, 0, 16];
    wire.extend_from_slice(&tag);
    let (mut a, mut b) = pair();
    assert!(b.open(&wire).expect("open").is_empty());
    assert_eq!(b.rx_count(), 1);
    // The next record (nonce 1) from the real sender: a used nonce 0 for
    // nothing yet, so advance it past the hand-made record first.
    let _ = a.seal(b"x").expect("seal");
    let r = a.seal(b"after").expect("seal");
    assert_eq!(b.open(&r).expect("open"), b"after");
}

#[test]
fn oversized_frame_rejected_from_header() {
    let (_, mut b) = pair();
    let err = b.open(&[0x04, 0x10, 0x00]).unwrap_err();
    assert_eq!(
        err,
        ConnError::Frame(FrameError::Oversized {
            size: 4099,
            max: 4096
        })
    );
    assert_eq!(b.open(b"").unwrap_err(), ConnError::Failed, "stays failed");
}

#[test]
fn wrong_types_rejected() {
    for ty in [0u8, 1, 2, 3, 5, 0xff] {
        let (_, mut b) = pair();
        let err = b.open(&[ty, 0, 20]).unwrap_err();
        assert!(
            matches!(
                err,
                ConnError::Frame(FrameError::UnexpectedType { .. } | FrameError::UnknownType(_))
            ),
            "type {ty}: {err:?}"
        );
    }
}

#[test]
fn truncated_and_short_records() {
    let (mut a, mut b) = pair();
    let wire = a.seal(b"hello").expect("seal");
    // Truncated: kept as partial, no output, no error.
    assert!(b.open(&wire[..wire.len() - 1]).expect("partial").is_empty());
    assert_eq!(b.buffered_len(), wire.len() - 1);
    // A record too short to hold a tag.
    let (_, mut c) = pair();
    assert_eq!(c.open(&[0x04, 0, 15]).map(|_| ()), Ok(()));
    assert_eq!(c.open(&[0u8; 15]).unwrap_err(), ConnError::Decrypt);
    let (_, mut d) = pair();
    assert_eq!(d.open(&[0x04, 0, 0]).unwrap_err(), ConnError::Decrypt);
}

#[test]
fn garbage_and_tampering_fail_and_poison() {
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..100 {
        let (mut a, mut b) = pair();
        let mut wire = a.seal(b"some secret bytes").expect("seal");
        let i = rng.random_range(3..wire.len());
        wire[i] ^= 1 << rng.random_range(0..8);
        assert_eq!(b.open(&wire).unwrap_err(), ConnError::Decrypt);
        let good = a.seal(b"next").expect("seal");
        assert_eq!(b.open(&good).unwrap_err(), ConnError::Failed);
    }
}

#[test]
fn replay_and_reorder_fail() {
    let (mut a, mut b) = pair();
    let r0 = a.seal(b"zero").expect("seal");
    let r1 = a.seal(b"one").expect("seal");
    assert_eq!(b.open(&r0).expect("open"), b"zero");
    assert_eq!(b.open(&r0).unwrap_err(), ConnError::Decrypt, "replay");
    let (mut a, mut b) = pair();
    let _r0 = a.seal(b"zero").expect("seal");
    let r1b = a.seal(b"one").expect("seal");
    assert_eq!(b.open(&r1b).unwrap_err(), ConnError::Decrypt, "reorder");
    let _ = r1;
}

#[test]
fn open_in_place_matches_open() {
    let (mut a, mut b) = pair();
    let mut wire = a.seal(b"in place").expect("seal");
    let (used, range) = b.open_in_place(&mut wire).expect("ok").expect("whole");
    assert_eq!(used, wire.len());
    assert_eq!(&wire[range], b"in place");
    let (_, mut c) = pair();
    let mut partial = [0x04u8, 0];
    assert_eq!(c.open_in_place(&mut partial), Ok(None));
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..2000 {
        let len = rng.random_range(0..6000);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        if rng.random_bool(0.5) && !data.is_empty() {
            data[0] = 0x04; // get past the type check more often
        }
        let (_, mut b) = pair();
        let _ = b.open(&data);
        let _ = tsunagu_noise::parse_frame(&data);
        tsunagu_noise::fuzzing::noise_frames(&data);
    }
}
