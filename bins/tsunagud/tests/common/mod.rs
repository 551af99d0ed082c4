//! Shared set-up of the lab tests where tsunagud joins tsunagu-server: the seed scenario
//! with the server on 198.51.100.4, a policy that tags and auto-approves exit nodes, and
//! the exit node `dev-m1sk9-s1` joined, online and approved.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{Lab, Netns, Seed, SeedOptions, WEB_ADDR, http_get};

pub const POLICY: &str = r#"{
  "tagOwners": { "tag:exit": ["admin"] },
  "autoApprovers": { "exitNode": ["tag:exit"] },
  "acls": [ { "action": "accept", "src": ["autogroup:member"], "dst": ["*:*"] } ],
}"#;

pub fn sibling(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_tsunagud")).with_file_name(name);
    assert!(
        p.exists(),
        "{} missing: build every binary first (scripts/test runs `cargo build --workspace --bins`)",
        p.display()
    );
    p
}

pub fn server_bin() -> PathBuf {
    sibling("tsunagu-server")
}

pub fn cli(ns: &Netns, data: &str, args: &[&str]) -> String {
    let bin = server_bin();
    let mut argv = vec![bin.to_str().unwrap(), "--data-dir", data];
    argv.extend_from_slice(args);
    let out = ns.exec(&argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tsunagu --socket SOCK args...` in `ns`, whatever its exit status.
pub fn tsunagu(ns: &Netns, sock: &Path, args: &[&str]) -> Output {
    let bin = sibling("tsunagu");
    let mut argv = vec![bin.to_str().unwrap(), "--socket", sock.to_str().unwrap()];
    argv.extend_from_slice(args);
    ns.exec_status(&argv)
        .unwrap_or_else(|e| panic!("tsunagu {args:?}: {e}"))
}

pub fn wait(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < within,
            "{what} did not happen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Poll the web server (bounded: 30 s) until it reports `want` as our source address.
pub fn web_sees(client: &Netns, want: std::net::Ipv4Addr, logs: &[&Path]) {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(body) = http_get(client, (WEB_ADDR, 80).into(), Duration::from_secs(1)) {
            last = body.trim().to_string();
            if last == want.to_string() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs: Vec<String> = logs
        .iter()
        .map(|l| {
            format!(
                "{}:\n{}",
                l.display(),
                std::fs::read_to_string(l).unwrap_or_default()
            )
        })
        .collect();
    panic!(
        "the web server saw {last:?}, not {want}\n{}",
        logs.join("\n")
    );
}

/// The seed lab with the server running and the exit node joined and approved.
pub struct Joined {
    pub seed: Seed,
    /// The server's data directory.
    pub data: String,
    pub exit_log: PathBuf,
    /// A pre-auth key of user `admin` for a member node.
    pub client_key: String,
}

pub const TSUNAGUD: &str = env!("CARGO_BIN_EXE_tsunagud");

pub fn setup(test: &str) -> Joined {
    let mut seed = Lab::seed(test, SeedOptions::default()).unwrap();
    let control = seed.ns(role::CONTROL);
    let data = seed.lab.log_path("server-data");
    let data_s = data.to_str().unwrap().to_string();
    let bin = server_bin();
    let log = seed.lab.log_path("server.log");
    seed.lab
        .spawn(
            &control,
            &[
                bin.to_str().unwrap(),
                "--data-dir",
                &data_s,
                "serve",
                "--listen",
                "198.51.100.4:8080",
                "--server-url",
                "http://198.51.100.4:8080",
            ],
            Some(&log),
        )
        .unwrap();
    wait("server start", Duration::from_secs(20), || {
        data.join("admin.sock").exists()
    });
    cli(&control, &data_s, &["users", "create", "admin"]);
    let policy = seed.lab.log_path("policy.hujson");
    std::fs::write(&policy, POLICY).unwrap();
    cli(
        &control,
        &data_s,
        &["policy", "set", policy.to_str().unwrap()],
    );
    let exit_key = cli(
        &control,
        &data_s,
        &[
            "preauthkeys",
            "create",
            "--user",
            "admin",
            "--tags",
            "tag:exit",
        ],
    );
    let exit_key = exit_key.lines().last().unwrap().to_string();
    let client_key = cli(
        &control,
        &data_s,
        &["preauthkeys", "create", "--user", "admin"],
    );
    let client_key = client_key.lines().last().unwrap().to_string();

    let tsunagud = TSUNAGUD;
    let exit_state = seed.lab.log_path("exit-state");
    let exit_log = seed.lab.log_path("exit.log");
    seed.lab
        .spawn(
            &seed.ns(role::EXIT),
            &[
                tsunagud,
                "--login-server",
                "http://198.51.100.4:8080",
                "--auth-key",
                &exit_key,
                "--hostname",
                "dev-m1sk9-s1",
                "--advertise-exit-node",
                "--state-dir",
                exit_state.to_str().unwrap(),
                "--socket",
                exit_state.join("tsunagud.sock").to_str().unwrap(),
            ],
            Some(&exit_log),
        )
        .unwrap();
    let nodes = || -> serde_json::Value {
        serde_json::from_str(&cli(&control, &data_s, &["--json", "nodes", "list"]))
            .unwrap_or_default()
    };
    wait(
        "the exit node online and approved",
        Duration::from_secs(30),
        || {
            nodes().as_array().is_some_and(|a| {
                a.iter().any(|n| {
                    n["name"] == "dev-m1sk9-s1"
                        && n["online"] == true
                        && n["exit_node"] == "approved"
                        && n["user"] == "tagged-devices"
                })
            })
        },
    );

    Joined {
        seed,
        data: data_s,
        exit_log,
        client_key,
    }
}
