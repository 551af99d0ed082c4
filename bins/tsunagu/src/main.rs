//! tsunagu: the command-line client of tsunagud's local API (JSON over HTTP/1.1 on a Unix
//! socket). `status`, `set --exit-node`, `ip` and `version`, in Tailscale's style.

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_SOCKET: &str = "/run/tsunagud/tsunagud.sock";

#[derive(Debug, Parser)]
#[command(name = "tsunagu", version, about = "control a tsunagu node (tsunagud)")]
struct Cli {
    /// tsunagud's local API socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET, env = "TSUNAGU_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show this device and its peers.
    Status {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change preferences (applied at once and kept across restarts).
    Set {
        /// Exit node by tailnet IP or name; an empty value stops using one.
        #[arg(long, value_name = "IP|NAME", require_equals = true, num_args = 1)]
        exit_node: Option<String>,
        /// With an exit node, keep the local LAN reachable directly.
        #[arg(
            long,
            value_name = "BOOL",
            require_equals = true,
            num_args = 0..=1,
            default_missing_value = "true"
        )]
        exit_node_allow_lan_access: Option<bool>,
    },
    /// Print this device's tailnet addresses.
    Ip {
        /// Only the IPv4 address.
        #[arg(short = '4', conflicts_with = "v6")]
        v4: bool,
        /// Only the IPv6 address.
        #[arg(short = '6')]
        v6: bool,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Deserialize)]
struct SelfStatus {
    name: String,
    addresses: Vec<String>,
    #[serde(default)]
    user: String,
    os: String,
    running: bool,
}

#[derive(Debug, Deserialize)]
struct ExitStatus {
    chosen: String,
    name: String,
    ip: String,
    state: String,
    allow_lan_access: bool,
}

#[derive(Debug, Deserialize)]
struct PeerInfo {
    ip: String,
    name: String,
    user: String,
    os: String,
    online: Option<bool>,
    offers_exit_node: bool,
    exit_node: bool,
    endpoint: Option<String>,
    last_handshake_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Status {
    #[serde(rename = "self")]
    self_node: Option<SelfStatus>,
    exit_node: Option<ExitStatus>,
    peers: Vec<PeerInfo>,
}

/// A handshake younger than this counts as "active" (WireGuard rekeys every 2 minutes
/// while traffic flows).
const ACTIVE_SECS: u64 = 180;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tsunagu: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Version => {
            println!("{}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Cmd::Status { json } => {
            let body = request(&cli.socket, "GET", "/status", None)?;
            if json {
                let v: serde_json::Value =
                    serde_json::from_str(&body).context("tsunagud's answer")?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let st: Status = serde_json::from_str(&body).context("tsunagud's answer")?;
            print!("{}", render_status(&st));
            Ok(())
        }
        Cmd::Set {
            exit_node,
            exit_node_allow_lan_access,
        } => {
            if exit_node.is_none() && exit_node_allow_lan_access.is_none() {
                bail!("nothing to set (try --exit-node=NAME or --exit-node-allow-lan-access)");
            }
            let mut req = serde_json::Map::new();
            if let Some(x) = exit_node {
                req.insert("exit_node".into(), x.into());
            }
            if let Some(l) = exit_node_allow_lan_access {
                req.insert("exit_node_allow_lan_access".into(), l.into());
            }
            let body = serde_json::Value::Object(req).to_string();
            request(&cli.socket, "POST", "/prefs", Some(&body))?;
            Ok(())
        }
        Cmd::Ip { v4, v6 } => {
            let body = request(&cli.socket, "GET", "/status", None)?;
            let st: Status = serde_json::from_str(&body).context("tsunagud's answer")?;
            let me = st
                .self_node
                .context("tsunagud has no network map yet (not connected)")?;
            let mut any = false;
            for a in &me.addresses {
                let is_v6 = a.contains(':');
                if (v4 && is_v6) || (v6 && !is_v6) {
                    continue;
                }
                println!("{a}");
                any = true;
                if v4 || v6 {
                    break;
                }
            }
            if !any {
                bail!("no {} address", if v4 { "IPv4" } else { "IPv6" });
            }
            Ok(())
        }
    }
}

fn peer_state(p: &PeerInfo) -> String {
    let active = p.online != Some(false) && p.last_handshake_secs.is_some_and(|s| s < ACTIVE_SECS);
    let exit = if p.exit_node {
        Some("exit node")
    } else if p.offers_exit_node {
        Some("offers exit node")
    } else {
        None
    };
    if active {
        let mut parts = vec!["active".to_string()];
        parts.extend(exit.map(String::from));
        if let Some(ep) = &p.endpoint {
            parts.push(format!("direct {ep}"));
        }
        return parts.join("; ");
    }
    let first = if p.online == Some(false) {
        "offline"
    } else if exit.is_some() || p.last_handshake_secs.is_some() {
        "idle"
    } else {
        "-"
    };
    match exit {
        Some(e) => format!("{first}; {e}"),
        None => first.to_string(),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn render_status(st: &Status) -> String {
    let mut rows: Vec<[String; 5]> = Vec::new();
    if let Some(me) = &st.self_node {
        let ip = me
            .addresses
            .iter()
            .find(|a| !a.contains(':'))
            .or(me.addresses.first())
            .cloned()
            .unwrap_or_default();
        rows.push([
            or_dash(&ip).into(),
            me.name.clone(),
            or_dash(&me.user).into(),
            or_dash(&me.os).into(),
            if me.running { "-" } else { "starting" }.into(),
        ]);
    }
    for p in &st.peers {
        rows.push([
            or_dash(&p.ip).into(),
            p.name.clone(),
            or_dash(&p.user).into(),
            or_dash(&p.os).into(),
            peer_state(p),
        ]);
    }
    let mut widths = [0usize; 4];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    if st.self_node.is_none() {
        out.push_str("# tsunagud is not connected to its coordination server yet\n");
    }
    for r in &rows {
        for (w, c) in widths.iter().zip(r.iter()) {
            out.push_str(&format!("{c:<w$}  "));
        }
        out.push_str(&r[4]);
        out.push('\n');
    }
    if let Some(x) = &st.exit_node {
        let who = if x.name.is_empty() {
            x.chosen.clone()
        } else {
            format!("{} ({})", x.name, x.ip)
        };
        out.push_str(&format!(
            "# Exit node: {who}: {}{}\n",
            x.state,
            if x.allow_lan_access {
                "; LAN access allowed"
            } else {
                ""
            }
        ));
    }
    out
}

/// One HTTP/1.1 request over the Unix socket; the body on 2xx, the daemon's error otherwise.
fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach tsunagud at {} (is it running?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: tsunagud\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .with_context(|| format!("cannot reach tsunagud at {}", socket.display()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading tsunagud's answer from {}", socket.display()))?;
    let (code, body) = parse_response(&raw)?;
    if (200..300).contains(&code) {
        return Ok(body);
    }
    let msg = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| body.trim().to_string());
    bail!("{msg}")
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("tsunagud sent an incomplete answer")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("tsunagud sent a malformed answer")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((code, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok((code, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(online: Option<bool>, hs: Option<u64>, offers: bool, exit: bool) -> PeerInfo {
        PeerInfo {
            ip: "100.64.0.2".into(),
            name: "dev-m1sk9-s1".into(),
            user: "tagged-devices".into(),
            os: "linux".into(),
            online,
            offers_exit_node: offers,
            exit_node: exit,
            endpoint: Some("198.51.100.2:41641".into()),
            last_handshake_secs: hs,
        }
    }

    #[test]
    fn peer_lines_read_like_tailscale() {
        let st = Status {
            self_node: Some(SelfStatus {
                name: "laptop".into(),
                addresses: vec!["100.64.0.1".into(), "fd7a:115c:a1e0::1".into()],
                user: "admin".into(),
                os: "linux".into(),
                running: true,
            }),
            exit_node: None,
            peers: vec![peer(Some(true), Some(3), true, true)],
        };
        assert_eq!(
            render_status(&st),
            "100.64.0.1  laptop        admin           linux  -\n\
             100.64.0.2  dev-m1sk9-s1  tagged-devices  linux  active; exit node; direct 198.51.100.2:41641\n"
        );
        assert_eq!(
            peer_state(&peer(Some(true), None, true, false)),
            "idle; offers exit node"
        );
        assert_eq!(
            peer_state(&peer(Some(false), Some(3), true, false)),
            "offline; offers exit node"
        );
        assert_eq!(peer_state(&peer(Some(true), None, false, false)), "-");
        assert_eq!(peer_state(&peer(None, Some(900), false, false)), "idle");
    }

    #[test]
    fn responses_parse_plain_and_chunked() {
        let (c, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((c, b.as_str()), (200, "{}"));
        let (c, b) = parse_response(
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n2\r\n\"}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((c, b.as_str()), (400, "{\"a\"}"));
    }

    #[test]
    fn flags_parse() {
        let c = Cli::try_parse_from(["tsunagu", "set", "--exit-node="]).unwrap();
        assert!(matches!(c.cmd, Cmd::Set { exit_node: Some(ref x), .. } if x.is_empty()));
        let c = Cli::try_parse_from(["tsunagu", "set", "--exit-node-allow-lan-access"]).unwrap();
        assert!(matches!(
            c.cmd,
            Cmd::Set {
                exit_node_allow_lan_access: Some(true),
                ..
            }
        ));
        let c =
            Cli::try_parse_from(["tsunagu", "set", "--exit-node-allow-lan-access=false"]).unwrap();
        assert!(matches!(
            c.cmd,
            Cmd::Set {
                exit_node_allow_lan_access: Some(false),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["tsunagu", "set", "--bogus"]).is_err());
        assert!(Cli::try_parse_from(["tsunagu", "ip", "-4", "-6"]).is_err());
    }

    #[test]
    fn unreachable_daemon_is_named() {
        let e = request(
            Path::new("/nonexistent/tsunagud.sock"),
            "GET",
            "/status",
            None,
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot reach tsunagud at /nonexistent/tsunagud.sock"),
            "{e:#}"
        );
    }
}
