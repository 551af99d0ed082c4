//! The admin CLI against a running server (loopback, temporary data directory).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tsunagu-server");

struct Running {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Our own child, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--listen", &listen, "--stun-listen", "127.0.0.1:0"])
        .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let r = Running { child, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !r.dir.path().join("admin.sock").exists() {
        assert!(
            Instant::now() < deadline,
            "server did not start: {}",
            log(&r)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    r
}

fn log(r: &Running) -> String {
    std::fs::read_to_string(r.dir.path().join("server.log")).unwrap_or_default()
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = cli(dir, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = cli(dir, args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn users_keys_nodes_and_policy_through_the_cli() {
    let r = start();
    let d = r.dir.path();
    ok(d, &["users", "create", "alice"]);
    let users: serde_json::Value =
        serde_json::from_str(&ok(d, &["--json", "users", "list"])).unwrap();
    assert_eq!(users[0]["name"], "alice");
    let dup = fails(d, &["users", "create", "alice"]);
    assert!(dup.contains("alice"), "{dup}");

    let out = ok(
        d,
        &[
            "preauthkeys",
            "create",
            "--user",
            "alice",
            "--reusable",
            "--expiration",
            "1h",
        ],
    );
    let key = out.lines().last().unwrap();
    assert!(
        key.starts_with("tskey-auth-") && !key.contains(' '),
        "key alone on the last line: {out}"
    );
    let keys: serde_json::Value =
        serde_json::from_str(&ok(d, &["--json", "preauthkeys", "list"])).unwrap();
    assert_eq!(keys[0]["reusable"], true);
    assert_eq!(keys[0]["user"], "alice");
    let e = fails(d, &["preauthkeys", "create", "--user", "nobody"]);
    assert!(e.contains("nobody"), "{e}");
    let e = fails(
        d,
        &[
            "preauthkeys",
            "create",
            "--user",
            "alice",
            "--expiration",
            "3w",
        ],
    );
    assert!(e.contains("unknown unit"), "{e}");
    let e = fails(
        d,
        &[
            "preauthkeys",
            "create",
            "--user",
            "alice",
            "--tags",
            "tag:exit",
        ],
    );
    assert!(
        e.contains("tagOwners"),
        "tags need an owner in the policy: {e}"
    );

    let nodes: serde_json::Value =
        serde_json::from_str(&ok(d, &["--json", "nodes", "list"])).unwrap();
    assert_eq!(nodes, serde_json::json!([]));
    let e = fails(d, &["nodes", "approve-exit", "ghost"]);
    assert!(e.contains("no node \"ghost\""), "{e}");

    // Policy: check offline, refuse a bad one (previous keeps serving), accept a good one.
    let good = d.join("good.hujson");
    std::fs::write(
        &good,
        "{\n  // exit nodes are tagged\n  \"tagOwners\": {\"tag:exit\": [\"alice\"]},\n  \"autoApprovers\": {\"exitNode\": [\"tag:exit\"]},\n  \"acls\": [{\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"*:*\"]}],\n}\n",
    )
    .unwrap();
    let bad = d.join("bad.hujson");
    std::fs::write(&bad, "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"group:nope\"], \"dst\": [\"*:*\"]}\n  ]\n}\n").unwrap();
    assert!(ok(d, &["policy", "check", good.to_str().unwrap()]).contains("ok"));
    let e = fails(d, &["policy", "check", bad.to_str().unwrap()]);
    assert!(
        e.contains("bad.hujson: policy error at line 3, column 34"),
        "line and column: {e}"
    );
    ok(d, &["policy", "set", good.to_str().unwrap()]);
    let e = fails(d, &["policy", "set", bad.to_str().unwrap()]);
    assert!(
        e.contains("previous one keeps serving") && e.contains("group:nope"),
        "{e}"
    );
    assert!(
        ok(d, &["policy", "get"]).contains("tag:exit"),
        "the good policy is still in force"
    );
    // With tagOwners in place, a tagged key can be made.
    let out = ok(
        d,
        &[
            "preauthkeys",
            "create",
            "--user",
            "alice",
            "--tags",
            "tag:exit",
        ],
    );
    assert!(out.lines().last().unwrap().starts_with("tskey-auth-"));
    drop(r);
}

#[test]
fn admin_commands_without_a_server_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let e = fails(dir.path(), &["users", "list"]);
    assert!(e.contains("cannot reach the server's admin socket"), "{e}");
}

#[test]
fn bad_config_files_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "listn = \"127.0.0.1:1\"\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            dir.path().to_str().unwrap(),
            "serve",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `listn`"));
}

#[test]
fn bad_derp_regions_on_the_command_line_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    // Refused before it listens; a server that starts anyway is killed (by its PID)
    // after 10 s and the test fails.
    let serve = |extra: &[&str]| {
        let mut child = Command::new(BIN)
            .arg("--data-dir")
            .arg(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--no-relay"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve {extra:?} started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success());
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        err
    };
    let e = serve(&[
        "--derp-region",
        "id=901,code=b,host=198.51.100.7,derp_port=0",
    ]);
    assert!(e.contains("derp_port 0 is not a port (1-65535)"), "{e}");
    assert!(e.contains("--derp-region"), "{e}");
    let e = serve(&[
        "--derp-region",
        "id=901,code=b,host=198.51.100.7",
        "--derp-region",
        "id=901,code=c,host=198.51.100.8",
    ]);
    assert!(e.contains("region id 901 is given twice"), "{e}");
    let e = serve(&["--derp-region", "id=901,code=b,host=198.51.100.7,http"]);
    assert!(e.contains("--derp-announce-http"), "{e}");
}
