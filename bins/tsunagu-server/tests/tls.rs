//! HTTPS when given a certificate and key.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serves_https_with_the_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = dir.path().join("cert.pem");
    let key_pem = dir.path().join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_tsunagu-server"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--stun-listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert_pem)
        .arg("--tls-key")
        .arg(&key_pem)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ended by PID when the test ends, also when it fails.
    let _guard = KillOnDrop(child);
    let url = format!("https://localhost:{port}/key?v=130");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "2", "--cacert"])
            .arg(&cert_pem)
            .args(["--resolve", &resolve, &url])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no HTTPS answer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["publicKey"].as_str().unwrap().starts_with("mkey:"),
        "{body}"
    );
    // Plain HTTP on the same port is not served.
    let plain = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{port}/key"),
        ])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("mkey:"));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
