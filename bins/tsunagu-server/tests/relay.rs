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
    start_with(dir, port, stun, &[])
}

fn start_with(dir: &std::path::Path, port: u16, stun: u16, extra: &[&str]) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_tsunagu-server"))
        .arg("--data-dir")
        .arg(dir)
        .args(["relay", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--stun-listen", &format!("127.0.0.1:{stun}")])
        .args(extra)
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

/// A blocking DERP client for these tests.
struct Client {
    tcp: TcpStream,
    conn: tsunagu_derp::ClientConn,
}

impl Client {
    fn connect(port: u16) -> Client {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        tcp.write_all(tsunagu_derp::client::upgrade_request("relay").as_bytes())
            .unwrap();
        let mut conn = tsunagu_derp::ClientConn::new(
            tsunagu_proto::NodePrivate::generate(),
            tsunagu_derp::ClientInfo::default(),
        );
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut upgraded = false;
        while !conn.is_connected() {
            assert!(Instant::now() < deadline, "no DERP login");
            while let Some(b) = conn.poll_transmit() {
                tcp.write_all(&b).unwrap();
            }
            let n = match tcp.read(&mut buf) {
                Ok(0) => panic!("relay closed"),
                Ok(n) => n,
                Err(_) => continue,
            };
            if upgraded {
                conn.handle_input(&buf[..n]).unwrap();
            } else {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = tsunagu_derp::client::parse_upgrade_response(&head).unwrap() {
                    upgraded = true;
                    conn.handle_input(&head[end..]).unwrap();
                }
            }
        }
        Client { tcp, conn }
    }

    fn key(&self) -> tsunagu_proto::NodePublic {
        self.conn.public_key()
    }

    fn send(&mut self, dst: tsunagu_proto::NodePublic, data: &[u8]) {
        self.conn.send_packet(dst, data).unwrap();
        while let Some(b) = self.conn.poll_transmit() {
            self.tcp.write_all(&b).unwrap();
        }
    }

    /// Packets received within about `wait`.
    fn packets(&mut self, wait: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(n) = self.tcp.read(&mut buf) {
                assert!(n > 0, "relay closed");
                self.conn.handle_input(&buf[..n]).unwrap();
            }
            while let Some(ev) = self.conn.poll_event() {
                if let tsunagu_derp::ClientEvent::Packet { packet, .. } = ev {
                    out.push(packet.to_vec());
                }
            }
            while let Some(b) = self.conn.poll_transmit() {
                self.tcp.write_all(&b).unwrap();
            }
        }
        out
    }
}

/// `from` sends to `to` every 200 ms until `to` receives (at most `tries` times).
fn reaches(from: &mut Client, to: &mut Client, tries: usize) -> bool {
    let dst = to.key();
    for i in 0..tries {
        from.send(dst, format!("hello {i}").as_bytes());
        if !to.packets(Duration::from_millis(200)).is_empty() {
            return true;
        }
    }
    false
}

#[test]
fn two_meshed_relays_carry_a_region_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mesh_key = dir.path().join("mesh.key");
    std::fs::write(&mesh_key, "0123456789abcdef0123456789abcdef\n").unwrap();
    let mk = mesh_key.to_str().unwrap().to_string();
    let (pa, pb) = (free_port(), free_port());
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let peer = |p: u16| format!("http://127.0.0.1:{p}");
    let (to_b, to_a) = (peer(pb), peer(pa));
    let flags_a = ["--mesh-key-file", &mk, "--mesh-with", &to_b];
    let flags_b = ["--mesh-key-file", &mk, "--mesh-with", &to_a];
    let _a = start_with(&da, pa, free_udp_port(), &flags_a);
    let b = start_with(&db, pb, free_udp_port(), &flags_b);
    wait_answer(pa);
    wait_answer(pb);
    let mut c1 = Client::connect(pa);
    let mut c2 = Client::connect(pb);
    assert!(
        reaches(&mut c1, &mut c2, 100),
        "relay A never forwarded to B's client"
    );
    assert!(
        reaches(&mut c2, &mut c1, 100),
        "relay B never forwarded to A's client"
    );

    // B restarts on the same port; A's link comes back by itself.
    drop(b);
    let stun = free_udp_port();
    let _b = start_with(&db, pb, stun, &flags_b);
    wait_answer(pb);
    let mut c2 = Client::connect(pb);
    assert!(
        reaches(&mut c1, &mut c2, 150),
        "after B restarted, A never reached its client again"
    );
}
