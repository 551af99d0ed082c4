//! The daemon refuses bad configuration with a clear message and a non-zero exit, before
//! touching the system (no root needed).

use std::process::Command;
use tsunagu_proto::NodePrivate;

fn run(config: &str, extra: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tsunagud"))
        .arg("--config")
        .arg(&path)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn good() -> String {
    format!(
        "name = \"n\"\nprivate_key = \"{}\"\naddresses = [\"100.64.0.1/32\"]\n\n[[peer]]\nname = \"exit\"\npublic_key = \"{}\"\nallowed_ips = [\"100.64.0.2/32\"]\noffers_exit_node = true\n",
        NodePrivate::generate().to_base64(),
        NodePrivate::generate().public()
    )
}

#[test]
fn check_accepts_a_good_file() {
    let (ok, stdout, stderr) = run(&good(), &["--check"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok (1 peers)"), "{stdout}");
}

#[test]
fn bad_files_name_the_field_and_fail() {
    let cases = [
        (
            good().replace("100.64.0.2/32", "100.64.0.2/40"),
            "peer[0].allowed_ips[0]",
        ),
        (
            good().replace("public_key = \"", "public_key = \"zz"),
            "peer[0].public_key",
        ),
        (good() + "exit_node = \"ghost\"\n", "unknown field"),
        (
            good().replace("name = \"n\"", "name = \"n\"\nexit_node = \"ghost\""),
            "exit_node: no peer named \"ghost\"",
        ),
        ("this is not toml".to_string(), "line 1"),
        (String::new(), "missing field"),
    ];
    for (text, expect) in cases {
        let (ok, _, stderr) = run(&text, &["--check"]);
        assert!(!ok, "accepted:\n{text}");
        assert!(stderr.contains(expect), "expected {expect:?} in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        // Also without --check: refused before any system change.
        let (ok, _, stderr) = run(&text, &[]);
        assert!(!ok && stderr.contains(expect), "{stderr}");
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_tsunagud"))
        .args(["--config", "/nonexistent/tsunagud.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/tsunagud.toml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn joined_mode_refuses_bad_flags_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_tsunagud"))
        .arg("--state-dir")
        .arg(&state)
        .args(["--operator-group", "no-such-group-tsunagu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no group \"no-such-group-tsunagu\""), "{err}");
    assert!(!state.exists(), "nothing created");
    let out = Command::new(env!("CARGO_BIN_EXE_tsunagud"))
        .args([
            "--config",
            "x.toml",
            "--login-server",
            "http://198.51.100.4:8080",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a file and a server exclude each other"
    );
}

#[test]
fn operator_group_gets_the_socket_read_write() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tsunagud.sock");
    // Without a server the daemon only serves its local API (logged out): no network.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsunagud"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&sock)
        .args(["--operator-group", "root"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let meta = std::fs::metadata(&sock);
    let _ = child.kill();
    let _ = child.wait();
    let meta = meta.expect("the socket appeared");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0, "owned by the operator group");
}
