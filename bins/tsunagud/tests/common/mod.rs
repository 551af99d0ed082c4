//! Shared set-up of the lab tests where tsunagud joins tsunagu-server: the seed scenario
//! with the server on 198.51.100.4, a policy that tags and auto-approves exit nodes, and
//! the exit node `dev-m1sk9-s1` joined, online and approved.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{Lab, Netns, ProcId, Seed, SeedOptions, WEB_ADDR, http_get};

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
pub fn web_sees<P: AsRef<Path>>(client: &Netns, want: std::net::Ipv4Addr, logs: &[P]) {
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
                l.as_ref().display(),
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
    /// The exit node's tsunagud, and how to start it again (same state directory).
    pub exit: ProcId,
    pub exit_argv: Vec<String>,
    /// A pre-auth key of user `admin` for a member node.
    pub client_key: String,
    pub server: ProcId,
    pub server_argv: Vec<String>,
    pub server_log: PathBuf,
    /// The server's URL, and the environment tsunagud runs with (`NAME=value`: the lab
    /// CA for a server on HTTPS).
    pub url: String,
    pub env: Vec<String>,
}

/// How the lab's server is reached: plain HTTP on 198.51.100.4:8080 (the default), or
/// HTTPS on 198.51.100.4:443 with a certificate from a lab CA that tsunagud trusts
/// through `SSL_CERT_FILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    #[default]
    Http,
    Https,
}

/// A tsunagud started in the client namespace.
pub struct Client {
    pub proc: ProcId,
    pub sock: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl Joined {
    /// Start tsunagud in the client (cafe) namespace with its state under `name`, and
    /// wait for its local API.
    /// The member laptop of the seed: tsunagud in the cafe, joining the server as
    /// `laptop` with the member key of the setup, plus `extra` flags.
    pub fn join_laptop(&mut self, extra: &[&str]) -> Client {
        let key = self.client_key.clone();
        self.join(
            tsunagu_lab::seed::role::CLIENT,
            "client",
            "laptop",
            &key,
            extra,
        )
    }

    /// tsunagud in the namespace of `role` (state under `name`), joining the server as
    /// `hostname` with `key`, plus `extra` flags.
    pub fn join(
        &mut self,
        role: &str,
        name: &str,
        hostname: &str,
        key: &str,
        extra: &[&str],
    ) -> Client {
        let url = self.url.clone();
        let mut argv = vec![
            "--login-server",
            &url,
            "--auth-key",
            key,
            "--hostname",
            hostname,
        ];
        if url.starts_with("http://") {
            argv.push("--insecure-http"); // the lab's server off loopback
        }
        argv.extend_from_slice(extra);
        self.start_node(role, name, &argv)
    }

    pub fn start_client(&mut self, name: &str, extra: &[&str]) -> Client {
        self.start_node(tsunagu_lab::seed::role::CLIENT, name, extra)
    }

    /// Start tsunagud in the namespace of `role`, state under `name`.
    pub fn start_node(&mut self, role: &str, name: &str, extra: &[&str]) -> Client {
        let state = self.seed.lab.log_path(&format!("{name}-state"));
        let log = self.seed.lab.log_path(&format!("{name}.log"));
        let sock = state.join("tsunagud.sock");
        let mut argv = tsunagud_argv(&self.env);
        argv.extend([
            "--state-dir",
            state.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ]);
        argv.extend_from_slice(extra);
        // A killed run leaves its socket behind: gone first, so that the wait below
        // sees this run's.
        let _ = std::fs::remove_file(&sock);
        let proc = self
            .seed
            .lab
            .spawn(&self.seed.ns(role), &argv, Some(&log))
            .unwrap();
        wait("tsunagud's local API", Duration::from_secs(20), || {
            sock.exists()
        });
        Client {
            proc,
            sock,
            state,
            log,
        }
    }

    /// The admin adds a standby host to `dev-m1sk9-s1`, and tsunagud starts on `exit2`
    /// (the seed's second exit host) with that standby key.
    #[allow(dead_code)]
    pub fn start_standby_host(&mut self) -> Client {
        let out = self.admin(&["nodes", "standby", "add", "dev-m1sk9-s1"]);
        let key = out.lines().last().unwrap_or_default().to_string();
        assert!(key.starts_with("tskey-standby-"), "{out}");
        let url = self.url.clone();
        let mut args = vec![
            "--login-server",
            &url,
            "--standby-key",
            &key,
            "--hostname",
            "exit2",
        ];
        if url.starts_with("http://") {
            args.push("--insecure-http"); // the lab's server off loopback
        }
        self.start_node(role::EXIT2, "exit2", &args)
    }

    /// Start the exit node's tsunagud again (after it was stopped or killed), same state.
    pub fn restart_exit(&mut self) {
        let argv: Vec<&str> = self.exit_argv.iter().map(String::as_str).collect();
        let ns = self.seed.ns(role::EXIT);
        self.exit = self
            .seed
            .lab
            .spawn(&ns, &argv, Some(&self.exit_log))
            .unwrap();
    }

    /// `tsunagu-server --data-dir DATA args...` in the control namespace (stdout).
    pub fn admin(&self, args: &[&str]) -> String {
        cli(
            &self.seed.ns(tsunagu_lab::seed::role::CONTROL),
            &self.data,
            args,
        )
    }

    /// A fresh single-use pre-auth key of user `admin`.
    pub fn new_key(&self) -> String {
        preauth_key(&self.seed.ns(role::CONTROL), &self.data, &[])
    }

    /// A pre-auth key for another exit node (tagged, so the policy approves it).
    pub fn new_exit_key(&self) -> String {
        preauth_key(&self.seed.ns(role::CONTROL), &self.data, EXIT_TAG)
    }

    /// The server's `nodes list --json`.
    pub fn nodes(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin(&["--json", "nodes", "list"])).unwrap_or_default()
    }

    /// Start the server again (after it was stopped), same data directory.
    pub fn restart_server(&mut self) {
        let argv: Vec<&str> = self.server_argv.iter().map(String::as_str).collect();
        let ns = self.seed.ns(tsunagu_lab::seed::role::CONTROL);
        self.server = self
            .seed
            .lab
            .spawn(&ns, &argv, Some(&self.server_log))
            .unwrap();
    }
}

/// `tsunagu status` text (whatever the exit code).
pub fn status_text(ns: &Netns, sock: &Path) -> String {
    let out = tsunagu(ns, sock, &["status"]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The line of `tsunagu status` for peer `name`.
pub fn peer_line(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .map(String::from)
}

/// Drop all forwarded UDP in a NAT router (the cafe or home; its NAT keeps working for
/// TCP): its LAN reaches the tailnet only through a relay.
pub fn block_udp(router: &Netns) {
    for cmd in [
        "nft add table inet tsunagu_test_block",
        "nft add chain inet tsunagu_test_block blockudp { type filter hook forward priority -10 ; }",
        "nft add rule inet tsunagu_test_block blockudp meta l4proto udp drop",
    ] {
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        router.exec(&argv).unwrap();
    }
}

pub fn unblock_udp(router: &Netns) {
    router
        .exec(&["nft", "delete", "table", "inet", "tsunagu_test_block"])
        .unwrap();
}

pub const TSUNAGUD: &str = env!("CARGO_BIN_EXE_tsunagud");
/// The server's URL in the seed lab (plain HTTP off loopback: tsunagud and `tsunagu up`
/// need `--insecure-http` for it).
pub const SERVER_URL: &str = "http://198.51.100.4:8080";

/// The tag that the setup's policy auto-approves as exit node.
const EXIT_TAG: &[&str] = &["--tags", "tag:exit"];

/// A new pre-auth key of user `admin` (with `extra` flags), from the server's CLI.
fn preauth_key(control: &Netns, data: &str, extra: &[&str]) -> String {
    let mut args = vec!["preauthkeys", "create", "--user", "admin"];
    args.extend_from_slice(extra);
    cli(control, data, &args)
        .lines()
        .last()
        .unwrap()
        .to_string()
}

/// `env NAME=value... tsunagud` (just `tsunagud` without an environment).
fn tsunagud_argv(env: &[String]) -> Vec<&str> {
    let mut argv: Vec<&str> = Vec::new();
    if !env.is_empty() {
        argv.push("env");
        argv.extend(env.iter().map(String::as_str));
    }
    argv.push(TSUNAGUD);
    argv
}

pub fn setup(test: &str) -> Joined {
    setup_with_policy(test, POLICY)
}

pub fn setup_with_policy(test: &str, policy_text: &str) -> Joined {
    setup_full(test, policy_text, SeedOptions::default())
}

pub fn setup_full(test: &str, policy_text: &str, opts: SeedOptions) -> Joined {
    setup_with_server_args(test, policy_text, opts, &[])
}

/// [`setup_full`] with `extra` arguments for `tsunagu-server serve`.
pub fn setup_with_server_args(
    test: &str,
    policy_text: &str,
    opts: SeedOptions,
    extra: &[&str],
) -> Joined {
    setup_over(test, policy_text, opts, extra, Transport::Http)
}

/// [`setup_with_server_args`] with the server reached over `transport`.
pub fn setup_over(
    test: &str,
    policy_text: &str,
    opts: SeedOptions,
    extra: &[&str],
    transport: Transport,
) -> Joined {
    let mut seed = Lab::seed(test, opts).unwrap();
    let control = seed.ns(role::CONTROL);
    let data = seed.lab.log_path("server-data");
    let data_s = data.to_str().unwrap().to_string();
    let bin = server_bin();
    let log = seed.lab.log_path("server.log");
    let (url, mut args, env) = match transport {
        // Plain HTTP: the relay is announced over plain HTTP too (Go clients would
        // need TLS).
        Transport::Http => (
            SERVER_URL.to_string(),
            vec![
                "--listen".to_string(),
                "198.51.100.4:8080".into(),
                "--derp-announce-http".into(),
            ],
            Vec::new(),
        ),
        Transport::Https => {
            let tls = tsunagu_lab::lab_tls(
                &seed.lab.log_path("tls"),
                tsunagu_lab::CONTROL_PUBLIC.into(),
            )
            .unwrap();
            let (ca, cert, key) = (tls.ca, tls.cert, tls.key);
            (
                "https://198.51.100.4".to_string(),
                vec![
                    "--listen".to_string(),
                    "198.51.100.4:443".into(),
                    "--tls-cert".into(),
                    cert.to_str().unwrap().into(),
                    "--tls-key".into(),
                    key.to_str().unwrap().into(),
                ],
                vec![format!("SSL_CERT_FILE={}", ca.display())],
            )
        }
    };
    args.extend(extra.iter().map(|s| s.to_string()));
    let server_argv: Vec<String> = [
        bin.to_str().unwrap(),
        "--data-dir",
        &data_s,
        "serve",
        "--server-url",
        &url,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(args)
    .collect();
    let argv: Vec<&str> = server_argv.iter().map(String::as_str).collect();
    let server = seed.lab.spawn(&control, &argv, Some(&log)).unwrap();
    wait("server start", Duration::from_secs(20), || {
        data.join("admin.sock").exists()
    });
    cli(&control, &data_s, &["users", "create", "admin"]);
    let policy = seed.lab.log_path("policy.hujson");
    std::fs::write(&policy, policy_text).unwrap();
    cli(
        &control,
        &data_s,
        &["policy", "set", policy.to_str().unwrap()],
    );
    let exit_key = preauth_key(&control, &data_s, EXIT_TAG);
    let client_key = preauth_key(&control, &data_s, &[]);

    let exit_state = seed.lab.log_path("exit-state");
    let exit_log = seed.lab.log_path("exit.log");
    // A short drain when the exit node withdraws its offer (30 s by default).
    let exit_env: Vec<String> = std::iter::once("TSUNAGU_EXIT_DRAIN=4".to_string())
        .chain(env.iter().cloned())
        .collect();
    let exit_sock = exit_state.join("tsunagud.sock");
    let mut exit_argv: Vec<String> = tsunagud_argv(&exit_env)
        .into_iter()
        .chain([
            "--login-server",
            &url,
            "--auth-key",
            &exit_key,
            "--hostname",
            "dev-m1sk9-s1",
            "--advertise-exit-node",
            "--state-dir",
            exit_state.to_str().unwrap(),
            "--socket",
            exit_sock.to_str().unwrap(),
        ])
        .map(String::from)
        .collect();
    if url.starts_with("http://") {
        exit_argv.push("--insecure-http".into()); // the lab's server off loopback
    }
    let argv: Vec<&str> = exit_argv.iter().map(String::as_str).collect();
    let exit = seed
        .lab
        .spawn(&seed.ns(role::EXIT), &argv, Some(&exit_log))
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
        exit,
        exit_argv,
        client_key,
        server,
        server_argv,
        server_log: log,
        url,
        env,
    }
}

// ---------------------------------------------------------------------------
// The official client (tailscaled + tailscale) beside tsunagud.

/// The official daemon in `role`'s namespace, trusting the lab CA of `j`.
pub fn official(j: &mut Joined, role: &str, name: &str, args: &[&str]) -> tsunagu_lab::Tailscaled {
    let ns = j.seed.ns(role);
    let opts = tsunagu_lab::TailscaledOpts {
        env: j.env.clone(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..tsunagu_lab::TailscaledOpts::default()
    };
    tsunagu_lab::Tailscaled::start(&mut j.seed.lab, &ns, name, opts).unwrap()
}

/// `tailscale up --login-server=URL --auth-key=KEY --hostname=NAME extra...`, Running.
pub fn official_up(
    ts: &tsunagu_lab::Tailscaled,
    url: &str,
    key: &str,
    hostname: &str,
    extra: &[&str],
) {
    let login = format!("--login-server={url}");
    let auth = format!("--auth-key={key}");
    let host = format!("--hostname={hostname}");
    let mut args = vec!["up", &login, &auth, &host, "--timeout=60s"];
    args.extend_from_slice(extra);
    if let Err(e) = ts.cli(&args) {
        panic!("tailscale up: {e}\n{}", ts.log_tail(80));
    }
    ts.wait_running(Duration::from_secs(30)).unwrap();
}

/// Enables forwarding in an official exit node's namespace, as Tailscale's docs tell an
/// admin to do before `--advertise-exit-node` (tsunagud does this itself).
pub fn enable_forwarding(ns: &Netns) {
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
}

/// An official exit node in `role`'s namespace, joined as `hostname` with a member key
/// (not tagged: the admin approves it by hand) and approved with
/// `tsunagu-server nodes approve-exit`.
pub fn official_exit(j: &mut Joined, role: &str, hostname: &str) -> tsunagu_lab::Tailscaled {
    enable_forwarding(&j.seed.ns(role));
    let ts = official(j, role, hostname, &[]);
    let key = j.new_key();
    let url = j.url.clone();
    official_up(&ts, &url, &key, hostname, &["--advertise-exit-node"]);
    wait(
        "the offer pending at the server",
        Duration::from_secs(20),
        || {
            j.nodes().as_array().is_some_and(|a| {
                a.iter()
                    .any(|n| n["name"] == hostname && n["exit_node"] == "awaiting approval")
            })
        },
    );
    let out = j.admin(&["nodes", "approve-exit", hostname]);
    assert!(out.contains("approved"), "{out}");
    ts
}
