//! tsunagud joined to tsunagu-server in the seed scenario (root): an exit node tagged
//! `tag:exit`, joined with a pre-auth key and auto-approved by the policy, and a client
//! behind the cafe NAT that selects it by name.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{EXIT_PUBLIC, Lab, Netns, SeedOptions, WEB_ADDR, http_get, whoami_server};

const POLICY: &str = r#"{
  "tagOwners": { "tag:exit": ["admin"] },
  "autoApprovers": { "exitNode": ["tag:exit"] },
  "acls": [ { "action": "accept", "src": ["autogroup:member"], "dst": ["*:*"] } ],
}"#;

fn server_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_tsunagud")).with_file_name("tsunagu-server");
    assert!(
        p.exists(),
        "{} missing: build the workspace (cargo test --workspace builds it)",
        p.display()
    );
    p
}

fn cli(ns: &Netns, data: &str, args: &[&str]) -> String {
    let bin = server_bin();
    let mut argv = vec![bin.to_str().unwrap(), "--data-dir", data];
    argv.extend_from_slice(args);
    let out = ns.exec(&argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < within,
            "{what} did not happen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn exit_node_joins_is_auto_approved_and_carries_the_client() {
    let mut seed = Lab::seed("joined_exit", SeedOptions::default()).unwrap();
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

    let tsunagud = env!("CARGO_BIN_EXE_tsunagud");
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

    let _web = whoami_server(&seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    let client_state = seed.lab.log_path("client-state");
    let client_log = seed.lab.log_path("client.log");
    seed.lab
        .spawn(
            &seed.ns(role::CLIENT),
            &[
                tsunagud,
                "--login-server",
                "http://198.51.100.4:8080",
                "--auth-key",
                &client_key,
                "--hostname",
                "laptop",
                "--exit-node",
                "dev-m1sk9-s1",
                "--state-dir",
                client_state.to_str().unwrap(),
                "--socket",
                client_state.join("tsunagud.sock").to_str().unwrap(),
            ],
            Some(&client_log),
        )
        .unwrap();
    let client = seed.ns(role::CLIENT);
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(body) = http_get(&client, (WEB_ADDR, 80).into(), Duration::from_secs(1)) {
            last = body.trim().to_string();
            if last == EXIT_PUBLIC.to_string() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        last,
        EXIT_PUBLIC.to_string(),
        "the web server must see the exit node\nclient log:\n{}\nexit log:\n{}",
        std::fs::read_to_string(&client_log).unwrap_or_default(),
        std::fs::read_to_string(&exit_log).unwrap_or_default()
    );
    eprintln!(
        "client online through the exit node {:?} after its start",
        start.elapsed()
    );
    // Identity persisted with owner-only permissions.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(client_state.join("machine.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
