//! The `tsunagu` CLI against tsunagud joined to tsunagu-server in the seed scenario (root):
//! a client joined without an exit node picks one, drops it and picks it again by IP through
//! the local API; a bad name is refused and changes nothing.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{
    CAFE_PUBLIC, EXIT_PUBLIC, Lab, Netns, SeedOptions, Signal, WEB_ADDR, http_get, whoami_server,
};

const POLICY: &str = r#"{
  "tagOwners": { "tag:exit": ["admin"] },
  "autoApprovers": { "exitNode": ["tag:exit"] },
  "acls": [ { "action": "accept", "src": ["autogroup:member"], "dst": ["*:*"] } ],
}"#;

fn sibling(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_tsunagud")).with_file_name(name);
    assert!(
        p.exists(),
        "{} missing: build the workspace (cargo test --workspace builds it)",
        p.display()
    );
    p
}

fn server_bin() -> PathBuf {
    sibling("tsunagu-server")
}

fn cli(ns: &Netns, data: &str, args: &[&str]) -> String {
    let bin = server_bin();
    let mut argv = vec![bin.to_str().unwrap(), "--data-dir", data];
    argv.extend_from_slice(args);
    let out = ns.exec(&argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tsunagu --socket SOCK args...` in `ns`, whatever its exit status.
fn tsunagu(ns: &Netns, sock: &Path, args: &[&str]) -> Output {
    let bin = sibling("tsunagu");
    let mut argv = vec![bin.to_str().unwrap(), "--socket", sock.to_str().unwrap()];
    argv.extend_from_slice(args);
    ns.exec_status(&argv)
        .unwrap_or_else(|e| panic!("tsunagu {args:?}: {e}"))
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

/// Poll the web server (bounded: 30 s) until it reports `want` as our source address.
fn web_sees(client: &Netns, want: std::net::Ipv4Addr, logs: &[&Path]) {
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

#[test]
fn cli_shows_status_and_switches_the_exit_node() {
    let mut seed = Lab::seed("cli_exit", SeedOptions::default()).unwrap();
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
    let sock = client_state.join("tsunagud.sock");
    let client_argv = [
        tsunagud,
        "--login-server",
        "http://198.51.100.4:8080",
        "--auth-key",
        &client_key,
        "--hostname",
        "laptop",
        "--state-dir",
        client_state.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
    ];
    let client_proc = seed
        .lab
        .spawn(&seed.ns(role::CLIENT), &client_argv, Some(&client_log))
        .unwrap();
    let client = seed.ns(role::CLIENT);
    let logs = [client_log.as_path(), exit_log.as_path()];
    let status = || {
        let out = tsunagu(&client, &sock, &["status"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let exit_line = |s: &str| {
        s.lines()
            .find(|l| l.split_whitespace().nth(1) == Some("dev-m1sk9-s1"))
            .map(String::from)
    };
    // Wait for the daemon's API and its first map (the command fails until the socket is up).
    let mut st = String::new();
    wait(
        "the exit node in tsunagu status",
        Duration::from_secs(30),
        || {
            let out = tsunagu(&client, &sock, &["status"]);
            st = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success() && exit_line(&st).is_some()
        },
    );
    web_sees(&client, CAFE_PUBLIC, &logs);

    // The socket is owner-only.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    eprintln!("tsunagu status:\n{st}");
    let line = exit_line(&st).unwrap();
    let exit_ip = line.split_whitespace().next().unwrap().to_string();
    assert!(exit_ip.starts_with("100."), "{line}");
    assert!(line.contains("tagged-devices"), "{line}");
    assert!(line.contains("linux"), "{line}");
    assert!(line.contains("offers exit node"), "{line}");
    let me = st.lines().next().unwrap();
    assert!(me.contains("laptop"), "{st}");

    // tsunagu ip -4 prints our tailnet IPv4, which heads the status.
    let out = tsunagu(&client, &sock, &["ip", "-4"]);
    assert!(out.status.success(), "{out:?}");
    let ip4 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(ip4.starts_with("100."), "{ip4}");
    assert!(me.starts_with(&ip4), "{me}");

    // Select by name.
    let out = tsunagu(&client, &sock, &["set", "--exit-node=dev-m1sk9-s1"]);
    assert!(out.status.success(), "{out:?}");
    web_sees(&client, EXIT_PUBLIC, &logs);
    let st = status();
    eprintln!("tsunagu status:\n{st}");
    let line = exit_line(&st).unwrap();
    assert!(line.contains("; exit node"), "{line}");
    assert!(!line.contains("offers exit node"), "{line}");
    assert!(line.contains("active"), "{line}");
    let saved = std::fs::read_to_string(client_state.join("prefs.json")).unwrap();
    assert!(saved.contains("dev-m1sk9-s1"), "{saved}");

    // A bad name fails clearly and changes nothing.
    let out = tsunagu(&client, &sock, &["set", "--exit-node=ghost"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ghost"), "{err}");
    web_sees(&client, EXIT_PUBLIC, &logs);
    assert!(exit_line(&status()).unwrap().contains("; exit node"));

    // Clear: back to the cafe's address.
    let out = tsunagu(&client, &sock, &["set", "--exit-node="]);
    assert!(out.status.success(), "{out:?}");
    web_sees(&client, CAFE_PUBLIC, &logs);
    assert!(exit_line(&status()).unwrap().contains("offers exit node"));

    // Select by tailnet IP.
    let out = tsunagu(&client, &sock, &["set", &format!("--exit-node={exit_ip}")]);
    assert!(out.status.success(), "{out:?}");
    web_sees(&client, EXIT_PUBLIC, &logs);

    // The choice survives a restart of the daemon (same state directory).
    seed.lab.kill(client_proc, Signal::SIGTERM).unwrap();
    let restarted_log = seed.lab.log_path("client-restarted.log");
    seed.lab
        .spawn(&seed.ns(role::CLIENT), &client_argv, Some(&restarted_log))
        .unwrap();
    let logs = [restarted_log.as_path(), exit_log.as_path()];
    wait(
        "tsunagud back after a restart",
        Duration::from_secs(30),
        || {
            let out = tsunagu(&client, &sock, &["status"]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("; exit node")
        },
    );
    web_sees(&client, EXIT_PUBLIC, &logs);
    let out = tsunagu(&client, &sock, &["set", "--exit-node="]);
    assert!(out.status.success(), "{out:?}");
    web_sees(&client, CAFE_PUBLIC, &logs);

    // JSON for scripts.
    let out = tsunagu(&client, &sock, &["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["self"]["name"], "laptop");
    assert!(v["exit_node"].is_null(), "{v}");

    // A daemon that is not there is named.
    let missing = client_state.join("nope.sock");
    let out = tsunagu(&client, &missing, &["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach tsunagud at"), "{err}");
}
