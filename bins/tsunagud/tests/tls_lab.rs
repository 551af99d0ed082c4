//! tsunagud and a server on HTTPS (root, seed lab): the production set-up, where the
//! server has a certificate (here from a lab CA that tsunagud trusts through
//! `SSL_CERT_FILE`, as a community with its own CA would) and announces its relay over
//! TLS only, as official clients require.

mod common;

use common::{POLICY, Transport, peer_line, setup_over, status_text, tsunagu, wait, web_sees};
use std::time::Duration;
use tsunagu_lab::seed::role;
use tsunagu_lab::{EXIT_PUBLIC, SeedOptions, WEB_ADDR, whoami_server};

/// Both nodes join over HTTPS; with the cafe dropping UDP the laptop's only path to the
/// exit node is the relay, over TLS, and it carries the laptop's internet traffic. A
/// node that does not trust the certificate is refused with a clear error and nothing
/// changes.
#[test]
fn tsunagud_joins_over_https_and_relays_over_tls() {
    let mut j = setup_over(
        "tls_join",
        POLICY,
        SeedOptions {
            cafe_blocks_udp: true,
            home_nat: true,
            ..SeedOptions::default()
        },
        &[],
        Transport::Https,
    );
    let _web = whoami_server(&j.seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    let c = j.join_laptop(&[]);
    let ns = j.seed.ns(role::CLIENT);
    wait("the exit node in the map", Duration::from_secs(30), || {
        peer_line(&status_text(&ns, &c.sock), "dev-m1sk9-s1").is_some()
    });
    let out = tsunagu(&ns, &c.sock, &["ping", "-c", "2", "dev-m1sk9-s1"]);
    let pong = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{pong}\n{}",
        std::fs::read_to_string(&c.log).unwrap_or_default()
    );
    assert!(pong.contains("via relay \"tsunagu\""), "{pong}");
    let out = tsunagu(&ns, &c.sock, &["set", "--exit-node=dev-m1sk9-s1"]);
    assert!(out.status.success(), "{out:?}");
    web_sees(&ns, EXIT_PUBLIC, &[c.log.clone(), j.exit_log.clone()]);
    let line = peer_line(&status_text(&ns, &c.sock), "dev-m1sk9-s1").unwrap();
    assert!(line.contains("relay \"tsunagu\""), "{line}");
    // The relay connection is TLS on port 443: the daemon's status says where it is.
    let v: serde_json::Value =
        serde_json::from_slice(&tsunagu(&ns, &c.sock, &["status", "--json"]).stdout).unwrap();
    let relays = v["relays"].as_array().cloned().unwrap_or_default();
    assert!(
        relays.iter().any(|r| r["home"] == true
            && r["connected"] == true
            && r["addr"].as_str().is_some_and(|a| a.ends_with(":443"))),
        "{v:#}"
    );

    // Without the lab CA: the certificate is refused, clearly, and `up` changes nothing.
    j.env.clear();
    let other = j.start_node(role::CLIENT2, "untrusting", &[]);
    let ns2 = j.seed.ns(role::CLIENT2);
    let key = j.new_key();
    let url = j.url.clone();
    let out = tsunagu(
        &ns2,
        &other.sock,
        &[
            "up",
            "--login-server",
            &url,
            "--auth-key",
            &key,
            "--hostname",
            "untrusting",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("TLS") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    let st = status_text(&ns2, &other.sock);
    assert!(st.contains("Logged out"), "{st}");
}
