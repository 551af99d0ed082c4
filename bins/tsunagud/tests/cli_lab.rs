//! The `tsunagu` CLI against tsunagud joined to tsunagu-server in the seed scenario (root):
//! a client joined without an exit node picks one, drops it and picks it again by IP through
//! the local API; a bad name is refused and changes nothing.

mod common;

use common::{Joined, TSUNAGUD, setup, tsunagu, wait, web_sees};
use std::time::Duration;
use tsunagu_lab::seed::role;
use tsunagu_lab::{CAFE_PUBLIC, EXIT_PUBLIC, Signal, WEB_ADDR, whoami_server};

#[test]
fn cli_shows_status_and_switches_the_exit_node() {
    let Joined {
        mut seed,
        exit_log,
        client_key,
        ..
    } = setup("cli_exit");
    let tsunagud = TSUNAGUD;
    let _web = whoami_server(&seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    let client_state = seed.lab.log_path("client-state");
    let client_log = seed.lab.log_path("client.log");
    let sock = client_state.join("tsunagud.sock");
    let client_argv = [
        tsunagud,
        "--login-server",
        "http://198.51.100.4:8080",
        "--insecure-http",
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
