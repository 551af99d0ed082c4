//! tsunagud joined to tsunagu-server in the seed scenario (root): an exit node tagged
//! `tag:exit`, joined with a pre-auth key and auto-approved by the policy, and a client
//! behind the cafe NAT that selects it by name.

mod common;

use common::{Joined, TSUNAGUD, setup};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{EXIT_PUBLIC, WEB_ADDR, http_get, whoami_server};

#[test]
fn exit_node_joins_is_auto_approved_and_carries_the_client() {
    let Joined {
        mut seed,
        exit_log,
        client_key,
        ..
    } = setup("joined_exit");
    let tsunagud = TSUNAGUD;
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
                "--insecure-http",
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
