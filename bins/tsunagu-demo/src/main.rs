//! The demo: a whole tailnet in network namespaces, on the seed scenario of the lab,
//! driven the way its admin and members would drive it.
//!
//! tsunagu-server (embedded SQLite, a fresh data directory) runs on 198.51.100.4; the
//! admin creates a user, a policy that auto-approves exit nodes tagged `tag:exit`, and
//! pre-auth keys. The exit node `dev-m1sk9-s1` (198.51.100.2) and a laptop behind a
//! cafe's NAT each run tsunagud and join with `tsunagu up`. A web server on the
//! "internet" reports the address each request comes from: the cafe's without an exit
//! node, the exit node's with one. The demo then restarts the exit node (the scheduled
//! restart that used to drop members off the internet) and shows the client failing
//! closed and coming back, and a capture of the cafe Wi-Fi holding nothing but the
//! tunnel. Everything is torn down at the end (or on Ctrl-C: the lab removes stale
//! namespaces on the next run).

use anyhow::{Context as _, bail};
use clap::Parser;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{
    CAFE_PUBLIC, CLIENT_LAN, CONTROL_PUBLIC, EXIT_PUBLIC, Lab, Netns, SeedOptions, Signal,
    WEB_ADDR, http_get, whoami_server,
};

#[derive(Parser)]
#[command(
    about = "A demo tailnet with a coordination server and an exit node, in network namespaces (root)"
)]
struct Args {
    /// Directory holding tsunagu-server, tsunagud and tsunagu.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Keep the lab up this many seconds at the end, to look around with `ip netns exec`.
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

const SERVER_URL: &str = "http://198.51.100.4:8080";
const EXIT: &str = "dev-m1sk9-s1";
const POLICY: &str = r#"{
  // Exit nodes are tagged by the admin and approved automatically.
  "tagOwners": { "tag:exit": ["admin"] },
  "autoApprovers": { "exitNode": ["tag:exit"] },
  "acls": [ { "action": "accept", "src": ["autogroup:member"], "dst": ["*:*"] } ],
}"#;

fn step(text: &str) {
    println!("\n== {text}");
}

struct Bins {
    server: String,
    daemon: String,
    cli: String,
}

/// Run a command in `ns`, echoing it and its output like a terminal session.
fn run(ns: &Netns, prompt: &str, argv: &[&str]) -> anyhow::Result<String> {
    // Paths by their file names; keys masked.
    let shown: Vec<&str> = argv
        .iter()
        .map(|a| {
            if a.starts_with('/') {
                Path::new(a)
                    .file_name()
                    .and_then(|f| f.to_str())
                    .unwrap_or(a)
            } else if a.starts_with("--auth-key=") {
                "--auth-key=tskey-auth-…"
            } else {
                a
            }
        })
        .collect();
    println!("   {prompt}$ {}", shown.join(" "));
    let out = ns.exec_status(argv)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for l in text.lines() {
        let l = if l.starts_with("tskey-auth-") {
            "tskey-auth-… (the key)"
        } else {
            l
        };
        println!("     {l}");
    }
    if !out.status.success() {
        bail!("{} failed", shown.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait(what: &str, within: Duration, f: impl FnMut() -> bool) -> anyhow::Result<()> {
    Ok(tsunagu_lab::wait_until(what, within, f)?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = |n: &str| -> anyhow::Result<String> {
        let p = args.bin_dir.join(n);
        if !p.exists() {
            bail!(
                "{} not found: build with `cargo build --release`",
                p.display()
            );
        }
        Ok(std::fs::canonicalize(&p)?.to_string_lossy().into_owned())
    };
    let b = Bins {
        server: bin("tsunagu-server")?,
        daemon: bin("tsunagud")?,
        cli: bin("tsunagu")?,
    };

    step("the lab: a laptop behind a cafe NAT, an exit node, the server, a web server");
    let mut seed =
        Lab::seed("demo", SeedOptions::default()).context("building the lab (are you root?)")?;
    for r in [
        role::CLIENT,
        role::CAFE,
        role::EXIT,
        role::CONTROL,
        role::WEB,
    ] {
        println!("   namespace {:<8} {}", r, seed.ns(r).name);
    }
    let web: SocketAddr = (WEB_ADDR, 80).into();
    let _web = whoami_server(&seed.ns(role::WEB), web)?;
    let control = seed.ns(role::CONTROL);
    let data = seed.lab.log_path("server-data");
    let data_s = data.to_string_lossy().into_owned();

    step(&format!(
        "tsunagu-server on {CONTROL_PUBLIC} (embedded SQLite in {data_s})"
    ));
    let server_log = seed.lab.log_path("server.log");
    seed.lab.spawn(
        &control,
        &[
            &b.server,
            "--data-dir",
            &data_s,
            "serve",
            "--listen",
            "198.51.100.4:8080",
            "--server-url",
            SERVER_URL,
            "--derp-announce-http",
        ],
        Some(&server_log),
    )?;
    wait("the server's admin socket", Duration::from_secs(20), || {
        data.join("admin.sock").exists()
    })?;
    let admin = |argv: &[&str]| -> anyhow::Result<String> {
        let mut full = vec![b.server.as_str(), "--data-dir", &data_s];
        full.extend_from_slice(argv);
        run(&control, "admin", &full)
    };
    admin(&["users", "create", "admin"])?;
    let policy = seed.lab.log_path("policy.hujson");
    std::fs::write(&policy, POLICY)?;
    admin(&["policy", "set", &policy.to_string_lossy()])?;
    let exit_key = admin(&[
        "preauthkeys",
        "create",
        "--user",
        "admin",
        "--tags",
        "tag:exit",
    ])?;
    let exit_key = exit_key.lines().last().unwrap_or_default().to_string();
    let client_key = admin(&["preauthkeys", "create", "--user", "admin"])?;
    let client_key = client_key.lines().last().unwrap_or_default().to_string();

    // A node: tsunagud with its state and socket in the lab directory.
    let start_daemon =
        |lab: &mut Lab, ns: &Netns, name: &str| -> anyhow::Result<(tsunagu_lab::ProcId, String)> {
            let state = lab.log_path(&format!("{name}-state"));
            let sock = state.join("tsunagud.sock");
            let id = lab.spawn(
                ns,
                &[
                    &b.daemon,
                    "--state-dir",
                    &state.to_string_lossy(),
                    "--socket",
                    &sock.to_string_lossy(),
                ],
                Some(&lab.log_path(&format!("{name}.log"))),
            )?;
            wait("tsunagud's socket", Duration::from_secs(20), || {
                sock.exists()
            })?;
            Ok((id, sock.to_string_lossy().into_owned()))
        };
    let exit_ns = seed.ns(role::EXIT);
    let client_ns = seed.ns(role::CLIENT);

    step(&format!(
        "the exit node {EXIT} ({EXIT_PUBLIC}) joins and offers itself"
    ));
    let (exit_proc, exit_sock) = start_daemon(&mut seed.lab, &exit_ns, EXIT)?;
    let tsunagu = |ns: &Netns, sock: &str, who: &str, argv: &[&str]| -> anyhow::Result<String> {
        let mut full = vec![b.cli.as_str(), "--socket", sock];
        full.extend_from_slice(argv);
        run(ns, who, &full)
    };
    tsunagu(
        &exit_ns,
        &exit_sock,
        EXIT,
        &[
            "up",
            &format!("--login-server={SERVER_URL}"),
            "--insecure-http",
            &format!("--auth-key={exit_key}"),
            &format!("--hostname={EXIT}"),
            "--advertise-tags=tag:exit",
            "--advertise-exit-node",
            "--yes",
        ],
    )?;

    step("the laptop at the cafe joins");
    let (_client_proc, client_sock) = start_daemon(&mut seed.lab, &client_ns, "laptop")?;
    tsunagu(
        &client_ns,
        &client_sock,
        "laptop",
        &[
            "up",
            &format!("--login-server={SERVER_URL}"),
            "--insecure-http",
            &format!("--auth-key={client_key}"),
            "--hostname=laptop",
        ],
    )?;
    wait(
        "the exit node in the laptop's map",
        Duration::from_secs(20),
        || {
            client_ns
                .exec_status(&[&b.cli, "--socket", &client_sock, "exit-node", "list"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(EXIT))
        },
    )?;
    admin(&["nodes", "list"])?;
    tsunagu(&client_ns, &client_sock, "laptop", &["status"])?;
    tsunagu(&client_ns, &client_sock, "laptop", &["exit-node", "list"])?;
    tsunagu(
        &client_ns,
        &client_sock,
        "laptop",
        &["ping", "-c", "2", EXIT],
    )?;

    let ask = |what: &str| -> anyhow::Result<String> {
        let seen = http_get(&client_ns, web, Duration::from_secs(5))?
            .trim()
            .to_string();
        let who = if seen == CAFE_PUBLIC.to_string() {
            "the cafe's NAT"
        } else if seen == EXIT_PUBLIC.to_string() {
            "the exit node"
        } else {
            "?"
        };
        println!("   {what}: the web server at {WEB_ADDR} sees {seen} ({who})");
        Ok(seen)
    };
    step("without an exit node");
    ask("direct")?;

    step("using the exit node");
    tsunagu(
        &client_ns,
        &client_sock,
        "laptop",
        &["set", &format!("--exit-node={EXIT}")],
    )?;
    let (cafe, port) = seed.cafe_lan_iface();
    let file = seed.lab.log_path("cafe.pcap");
    let cap = tsunagu_lab::capture(&mut seed.lab, &cafe, port, &file)?;
    wait(
        "traffic through the exit node",
        Duration::from_secs(10),
        || {
            http_get(&client_ns, web, Duration::from_secs(1))
                .is_ok_and(|b| b.trim() == EXIT_PUBLIC.to_string())
        },
    )?;
    ask("through the exit node")?;
    tsunagu(&client_ns, &client_sock, "laptop", &["status"])?;

    step("the exit node's scheduled restart");
    seed.lab.kill(exit_proc, Signal::SIGTERM)?;
    match http_get(&client_ns, web, Duration::from_secs(1)) {
        Ok(body) => println!(
            "   UNEXPECTED: the request went out, seen as {}",
            body.trim()
        ),
        Err(_) => {
            println!("   exit node down: the request fails, nothing leaves outside the tunnel")
        }
    }
    let restarted = Instant::now();
    let (_exit_proc, _) = start_daemon(&mut seed.lab, &exit_ns, EXIT)?;
    wait("traffic after the restart", Duration::from_secs(20), || {
        http_get(&client_ns, web, Duration::from_millis(500))
            .is_ok_and(|b| b.trim() == EXIT_PUBLIC.to_string())
    })?;
    println!(
        "   the exit node came back by itself (same identity, no key) and traffic flows \
         again {:.1} s after its restart",
        restarted.elapsed().as_secs_f64()
    );
    let lines = cap.finish(&mut seed.lab)?;
    let leaks = tsunagu_lab::tunnel_leaks(
        &lines,
        CLIENT_LAN,
        &format!("{EXIT_PUBLIC}.41641"),
        &[
            &format!("{CONTROL_PUBLIC}.8080"),
            &format!("{CONTROL_PUBLIC}.3478"),
        ],
    );
    println!(
        "   the cafe Wi-Fi meanwhile: {} packets, {} outside the tunnel and the connections to the server",
        lines.len(),
        leaks.len()
    );
    for l in lines.iter().filter(|l| l.contains("41641")).take(3) {
        println!("     {l}");
    }

    step("back to direct");
    tsunagu(&client_ns, &client_sock, "laptop", &["set", "--exit-node="])?;
    ask("direct again")?;

    if args.hold > 0 {
        step(&format!(
            "holding the lab for {} s (Ctrl-C ends it)",
            args.hold
        ));
        std::thread::sleep(Duration::from_secs(args.hold));
    }
    step("tearing down");
    drop(seed);
    println!("   done: no namespace, rule or table of the demo is left");
    if !leaks.is_empty() {
        bail!("leaks on the cafe LAN: {leaks:#?}");
    }
    Ok(())
}
