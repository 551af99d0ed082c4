//! Handshake tests: both roles in-process, failure cases, and a
//! cross-check against snow (an independent Noise implementation), as Go's
//! `controlbase/interop_test.go` cross-checks against Noise Explorer.

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit};
use tsunagu_noise::frame::{self, INITIATION_LEN, RESPONSE_LEN};
use tsunagu_noise::handshake::{
    client_initiate_with_ephemeral, prologue, server_accept_with_ephemeral,
};
use tsunagu_noise::{Conn, HandshakeError, client_initiate, public_key, server_accept};

const SERVER: [u8; 32] = [0x11; 32];
const MACHINE: [u8; 32] = [0x22; 32];
const CAPVER: u16 = 131;

fn pair() -> (Conn, Conn) {
    let (hs, init) = client_initiate(MACHINE, public_key(SERVER), CAPVER).expect("initiate");
    let srv = server_accept(SERVER, &init).expect("accept");
    assert_eq!(srv.machine_public, public_key(MACHINE));
    assert_eq!(srv.capver, CAPVER);
    let client = hs.finish(&srv.response).expect("finish");
    (client, srv.conn)
}

#[test]
fn handshake_both_roles() {
    let (hs, init) = client_initiate(MACHINE, public_key(SERVER), CAPVER).expect("initiate");
    assert_eq!(init.len(), INITIATION_LEN);
    assert_eq!(&init[..5], &[0, 131, 0x01, 0, 96]);
    let srv = server_accept(SERVER, &init).expect("accept");
    assert_eq!(srv.response.len(), RESPONSE_LEN);
    assert_eq!(&srv.response[..3], &[0x02, 0, 48]);
    let mut client = hs.finish(&srv.response).expect("finish");
    let mut server = srv.conn;
    assert_eq!(client.handshake_hash(), server.handshake_hash());
    assert_eq!(client.peer(), public_key(SERVER));
    assert_eq!(server.peer(), public_key(MACHINE));
    assert_eq!(server.protocol_version(), CAPVER);

    let wire = client.seal(b"client>server").expect("seal");
    assert_eq!(server.open(&wire).expect("open"), b"client>server");
    let wire = server.seal(b"server>client").expect("seal");
    assert_eq!(client.open(&wire).expect("open"), b"server>client");
}

#[test]
fn handshakes_are_fresh() {
    let (a, _) = pair();
    let (b, _) = pair();
    assert_ne!(
        a.handshake_hash(),
        b.handshake_hash(),
        "ephemeral keys must be random"
    );
}

#[test]
fn wrong_server_key_fails() {
    let wrong = public_key([0x33; 32]);
    let (_, init) = client_initiate(MACHINE, wrong, CAPVER).expect("initiate");
    let err = server_accept(SERVER, &init).unwrap_err();
    assert_eq!(err, HandshakeError::Decrypt("machine key"));
    assert!(
        err.error_frame().is_none(),
        "no hint for crypto failures, as in Go"
    );
}

#[test]
fn response_from_other_server_fails() {
    // The client expects SERVER; an impostor with another key answers an
    // initiation meant for itself.
    let (hs, _) = client_initiate(MACHINE, public_key(SERVER), CAPVER).expect("initiate");
    let impostor = [0x44; 32];
    let (_, init2) = client_initiate(MACHINE, public_key(impostor), CAPVER).expect("initiate");
    let resp = server_accept(impostor, &init2).expect("accept").response;
    assert_eq!(
        hs.finish(&resp).unwrap_err(),
        HandshakeError::Decrypt("response tag")
    );
}

#[test]
fn tampering_fails() {
    let (_, init) = client_initiate(MACHINE, public_key(SERVER), CAPVER).expect("initiate");
    for i in 5..INITIATION_LEN {
        let mut bad = init;
        bad[i] ^= 1;
        assert!(
            matches!(server_accept(SERVER, &bad), Err(HandshakeError::Decrypt(_))),
            "flipped byte {i} accepted"
        );
    }
    // The version is bound through the prologue.
    let mut bad = init;
    bad[1] ^= 1;
    assert!(matches!(
        server_accept(SERVER, &bad),
        Err(HandshakeError::Decrypt(_))
    ));

    let (hs, init) = client_initiate(MACHINE, public_key(SERVER), CAPVER).expect("initiate");
    let mut resp = server_accept(SERVER, &init).expect("accept").response;
    resp[40] ^= 1;
    assert!(matches!(hs.finish(&resp), Err(HandshakeError::Decrypt(_))));
}

#[test]
fn malformed_initiations_get_go_error_frames() {
    let (_, init) = client_initiate(MACHINE, public_key(SERVER), CAPVER).expect("initiate");
    let short = server_accept(SERVER, &init[..100]).unwrap_err();
    assert_eq!(
        short.error_frame().expect("frame"),
        frame::encode_error("wrong handshake initiation size")
    );
    let mut bad = init;
    bad[2] = 4;
    let e = server_accept(SERVER, &bad).unwrap_err();
    assert_eq!(
        e.error_frame().expect("frame"),
        frame::encode_error("unexpected handshake message type")
    );
    let mut bad = init;
    bad[4] = 97;
    let e = server_accept(SERVER, &bad).unwrap_err();
    assert_eq!(
        e.error_frame().expect("frame"),
        frame::encode_error("wrong handshake initiation length")
    );
}

#[test]
fn server_error_frame_and_garbage_response() {
    let (hs, _) = client_initiate(MACHINE, public_key(SERVER), CAPVER).expect("initiate");
    let err = hs.finish(&frame::encode_error("go away")).unwrap_err();
    assert_eq!(err, HandshakeError::ServerRefused("go away".into()));
    for garbage in [
        &b""[..],
        b"\x02\x00",
        b"\x04\x00\x30",
        b"\x09\x00\x00",
        &[0x02, 0, 48, 1, 2],
    ] {
        let (hs, _) = client_initiate(MACHINE, public_key(SERVER), CAPVER).expect("initiate");
        assert!(matches!(hs.finish(garbage), Err(HandshakeError::Frame(_))));
    }
}

#[test]
fn low_order_keys_are_refused() {
    // The all-zero point has order 1: X25519 gives all zeros, which Go's
    // curve25519.X25519 refuses.
    let zero = [0u8; 32];
    assert_eq!(
        client_initiate(MACHINE, zero, CAPVER).unwrap_err(),
        HandshakeError::LowOrderKey("es")
    );
    let (_, mut init) = client_initiate(MACHINE, public_key(SERVER), CAPVER).expect("initiate");
    init[5..37].copy_from_slice(&zero);
    assert_eq!(
        server_accept(SERVER, &init).unwrap_err(),
        HandshakeError::LowOrderKey("es")
    );
}

fn snow_params() -> snow::params::NoiseParams {
    "Noise_IK_25519_ChaChaPoly_BLAKE2s".parse().expect("params")
}

/// With the same static and ephemeral keys, our initiation and response are
/// byte-identical to snow's Noise IK messages (plus our framing), and the
/// split keys and handshake hash agree.
#[test]
fn known_answer_against_snow() {
    let e_client = [0x55; 32];
    let e_server = [0x66; 32];
    let pro = prologue(CAPVER);
    assert_eq!(pro, b"Tailscale Control Protocol v131");
    let server_pub = public_key(SERVER);

    let mut snow_client = snow::Builder::new(snow_params())
        .local_private_key(&MACHINE)
        .and_then(|b| b.remote_public_key(&server_pub))
        .and_then(|b| b.prologue(&pro))
        .map(|b| b.fixed_ephemeral_key_for_testing_only(&e_client))
        .and_then(|b| b.build_initiator())
        .expect("snow initiator");
    let mut snow_server = snow::Builder::new(snow_params())
        .local_private_key(&SERVER)
        .and_then(|b| b.prologue(&pro))
        .map(|b| b.fixed_ephemeral_key_for_testing_only(&e_server))
        .and_then(|b| b.build_responder())
        .expect("snow responder");

    let mut msg1 = [0u8; 96];
    assert_eq!(snow_client.write_message(&[], &mut msg1).expect("w1"), 96);
    let (hs, init) =
        client_initiate_with_ephemeral(MACHINE, server_pub, CAPVER, e_client).expect("initiate");
    assert_eq!(&init[5..], &msg1[..], "initiation differs from snow's");

    let mut scratch = [0u8; 64];
    assert_eq!(
        snow_server.read_message(&msg1, &mut scratch).expect("r1"),
        0
    );
    let mut msg2 = [0u8; 48];
    assert_eq!(snow_server.write_message(&[], &mut msg2).expect("w2"), 48);
    let srv = server_accept_with_ephemeral(SERVER, &init, e_server).expect("accept");
    assert_eq!(
        &srv.response[3..],
        &msg2[..],
        "response differs from snow's"
    );

    snow_client.read_message(&msg2, &mut scratch).expect("r2");
    let client = hs.finish(&srv.response).expect("finish");
    assert_eq!(
        client.handshake_hash().as_slice(),
        snow_client.get_handshake_hash()
    );
    assert_eq!(
        srv.conn.handshake_hash().as_slice(),
        snow_server.get_handshake_hash()
    );

    // Split keys: a record sealed with snow's initiator->responder key under
    // our big-endian nonce opens on our server, and vice versa.
    let (k1, k2) = snow_client.dangerously_get_raw_split();
    let (mut fake_client, _) = Conn::pair_for_testing(k1, k2);
    let mut server = srv.conn;
    let mut client = client;
    for i in 0..3u8 {
        let wire = fake_client.seal(&[i; 10]).expect("seal");
        assert_eq!(server.open(&wire).expect("open"), vec![i; 10]);
        let wire = server.seal(&[i; 5]).expect("seal");
        assert_eq!(client.open(&wire).expect("open"), vec![i; 5]);
    }

    // Regression vector for the initiation with these fixed keys.
    let hex: String = init[..8].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(&hex[..10], "0083010060");
}

/// Transport nonce: 4 zero bytes then a big-endian counter
/// (`controlbase/conn.go`, `nonce.Increment`), which differs from the Noise
/// spec (and snow) from the second record on.
#[test]
fn transport_nonce_is_big_endian() {
    let k1 = [0xa1; 32];
    let (mut tx, _) = Conn::pair_for_testing(k1, [0xb2; 32]);
    let aead = ChaCha20Poly1305::new(&k1.into());
    for counter in 0u64..3 {
        let wire = tx.seal(b"hello").expect("seal");
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&counter.to_be_bytes());
        let want = aead.encrypt((&nonce).into(), &b"hello"[..]).expect("enc");
        assert_eq!(&wire[..3], &[0x04, 0, 21]);
        assert_eq!(&wire[3..], &want[..], "record {counter}");
    }
}
