//! `tsunagu-server relay`: a relay on its own, on loopback.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The header block of the relay's answer to a DERP upgrade.
fn upgrade_answer(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(tsunagu_derp::client::upgrade_request("relay").as_bytes())
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&got).into_owned())
}

fn start(dir: &std::path::Path, port: u16, stun: u16) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_tsunagu-server"))
        .arg("--data-dir")
        .arg(dir)
        .args(["relay", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--stun-listen", &format!("127.0.0.1:{stun}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

fn wait_answer(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(a) = upgrade_answer(port) {
            return a;
        }
        assert!(Instant::now() < deadline, "relay not answering");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn public_key_header(answer: &str) -> String {
    answer
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("derp-public-key")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no Derp-Public-Key in {answer}"))
}

#[test]
fn a_standalone_relay_upgrades_answers_stun_and_keeps_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (port, stun) = (free_port(), free_udp_port());
    let relay = start(dir.path(), port, stun);
    let answer = wait_answer(port);
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    let key = public_key_header(&answer);
    assert_eq!(key.len(), 64, "{answer}");
    let key_file = dir.path().join("derp.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = tsunagu_derp::stun::TxId::random();
    udp.send_to(
        &tsunagu_derp::stun::binding_request(tx),
        ("127.0.0.1", stun),
    )
    .unwrap();
    let mut buf = [0u8; 256];
    let n = udp.recv(&mut buf).expect("a STUN answer");
    assert_eq!(
        tsunagu_derp::stun::parse_binding_response(&buf[..n]),
        Ok((tx, udp.local_addr().unwrap()))
    );

    // Restarted on the same data directory, it has the same key.
    drop(relay);
    let (port, stun) = (free_port(), free_udp_port());
    let _relay = start(dir.path(), port, stun);
    assert_eq!(public_key_header(&wait_answer(port)), key);
}
