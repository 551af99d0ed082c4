//! tsunagu-server: the coordination server and its admin CLI.

mod admin_client;
mod cli;
mod config;

use admin_client::AdminClient;
use anyhow::Context as _;
use clap::Parser as _;
use cli::{Cli, Command, KeysCmd, NodesCmd, PolicyCmd, StandbyCmd, UsersCmd};
use config::Config;
use serde_json::{Value, json};

/// glibc's malloc for a server holding thousands of connections on a few threads: two
/// arenas instead of up to eight per core (each fragments on its own), and a fixed mmap
/// threshold, so that large short-lived buffers (full maps of big tailnets) are mapped
/// and unmapped instead of raising the threshold and fragmenting the heap.
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        tune_malloc();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("TSUNAGU_LOG")
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tsunagu-server: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tsunagu-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (listen, server_url, tls) = match &cli.command {
        Command::Serve(s) => (
            s.listen.clone(),
            s.server_url.clone(),
            s.tls_cert.clone().zip(s.tls_key.clone()),
        ),
        _ => (None, None, None),
    };
    let explicit_url = server_url.is_some();
    let mut cfg = Config::resolve(
        cli.common.config.as_deref(),
        cli.common.data_dir.clone(),
        listen,
        server_url,
    )?;
    if let Some(tls) = tls {
        cfg.tls = Some(tls);
        if !explicit_url && cfg.server_url.starts_with("http://") {
            cfg.server_url = cfg.server_url.replacen("http://", "https://", 1);
        }
    }
    if let Command::Serve(s) = &cli.command {
        if s.no_relay {
            cfg.relay = None;
        }
        cfg.derp_announce_http |= s.derp_announce_http;
        if let Some(secs) = s.standby_failover_after {
            cfg.standby_failover_after_secs = secs;
        }
        cfg.derp_regions.extend(s.derp_region.iter().cloned());
        if let Some(r) = &mut cfg.relay {
            if let Some(stun) = &s.stun_listen {
                r.stun_listen = Some(stun.clone());
            }
            if let Some(name) = &s.derp_region_name {
                r.region_name = name.clone();
            }
            r.insecure_for_tests |= s.derp_insecure_for_tests;
            r.verify_clients |= s.relay_verify_clients;
            r.announce_plain_http |= s.derp_announce_http;
            r.extra_nodes.extend(s.derp_node.iter().cloned());
            if let Some(k) = mesh_key(&s.mesh)? {
                r.mesh_key = Some(k);
                r.mesh_with = s.mesh.mesh_with.clone();
            }
        }
        cfg.check_regions()?;
        cfg.apply_dns_flags(&s.dns)?;
        cfg.dns_settings()?;
    }
    let json_out = cli.common.json;
    let admin = AdminClient::new(&cfg.admin_socket());
    match cli.command {
        Command::Serve(s) => {
            // SIGHUP re-reads the file's [dns] (with the same flags on top) and hands it
            // to the running server, which sends it to every node.
            let file = cli.common.config.clone();
            let data_dir = cli.common.data_dir.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    match reload_dns(file.as_deref(), data_dir.clone(), &s.dns).await {
                        Ok(()) => tracing::info!("DNS settings reloaded"),
                        Err(e) => tracing::error!("DNS reload refused: {e:#}"),
                    }
                }
            });
            serve(cfg).await
        }
        Command::Relay(r) => {
            let stun_listen = match (r.no_stun, r.stun_listen) {
                (true, _) => None,
                (false, Some(s)) => Some(s),
                (false, None) => Some(config::default_stun_listen(&r.listen)),
            };
            tsunagu_control::relay::serve_relay(tsunagu_control::relay::RelayOnlyConfig {
                data_dir: cfg.data_dir.clone(),
                listen: r.listen,
                stun_listen,
                mesh_key: mesh_key(&r.mesh)?,
                mesh_with: r.mesh.mesh_with.clone(),
                tls: r.tls_cert.zip(r.tls_key),
                limits: cfg.limits.clone(),
            })
            .await?;
            Ok(())
        }
        Command::Policy(PolicyCmd::Check { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("{}: cannot read", file.display()))?;
            tsunagu_policy::Policy::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Policy(PolicyCmd::Set { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("{}: cannot read", file.display()))?;
            admin
                .call("PUT", "/v1/policy", Some(json!({ "policy": text })))
                .await?;
            println!("policy updated");
            Ok(())
        }
        Command::Policy(PolicyCmd::Get) => {
            let v = admin.call("GET", "/v1/policy", None).await?;
            if json_out {
                println!("{v}");
            } else {
                println!(
                    "{}",
                    v.get("policy")
                        .and_then(Value::as_str)
                        .unwrap_or("(default policy)")
                );
            }
            Ok(())
        }
        Command::RelayStatus => {
            let v = admin.call("GET", "/v1/relay", None).await?;
            if json_out {
                print_json(&v);
            } else {
                println!("relay {}", v["public_key"].as_str().unwrap_or_default());
                if let Some(m) = v["metrics"].as_object() {
                    for (k, val) in m {
                        println!("  {k}: {val}");
                    }
                }
                table(
                    &rows(&v["clients"]),
                    &[("NODE KEY", "node_key"), ("HOME", "home")],
                );
            }
            Ok(())
        }
        Command::Users(cmd) => users(&admin, cmd, json_out).await,
        Command::Preauthkeys(cmd) => keys(&admin, cmd, json_out).await,
        Command::Nodes(cmd) => nodes(&admin, cmd, json_out).await,
    }
}

async fn reload_dns(
    file: Option<&std::path::Path>,
    data_dir: Option<std::path::PathBuf>,
    flags: &cli::DnsArgs,
) -> anyhow::Result<()> {
    let mut cfg = Config::resolve(file, data_dir, None, None)?;
    cfg.apply_dns_flags(flags)?;
    cfg.dns_settings()?;
    AdminClient::new(&cfg.admin_socket())
        .call("PUT", "/v1/dns", Some(serde_json::to_value(&cfg.dns)?))
        .await?;
    Ok(())
}

/// The mesh key from `--mesh-key-file` (trimmed; an empty file is an error).
fn mesh_key(m: &cli::MeshArgs) -> anyhow::Result<Option<String>> {
    let Some(path) = &m.mesh_key_file else {
        return Ok(None);
    };
    let key = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the mesh key", path.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!key.is_empty(), "{}: the mesh key is empty", path.display());
    Ok(Some(key))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    tsunagu_control::server::serve(tsunagu_control::server::ServerConfig {
        data_dir: cfg.data_dir.clone(),
        listen: cfg.listen.clone(),
        server_url: cfg.server_url.clone(),
        tls: cfg.tls.clone(),
        policy_file: cfg.policy_file.clone(),
        admin_socket: cfg.admin_socket(),
        ephemeral_timeout: std::time::Duration::from_secs(cfg.ephemeral_timeout_secs),
        relay: cfg.relay.clone(),
        derp_regions: cfg.derp_regions.clone(),
        dns: cfg.dns_settings()?,
        standby_failover_after: std::time::Duration::from_secs(cfg.standby_failover_after_secs),
        limits: cfg.limits.clone(),
    })
    .await?;
    Ok(())
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Print rows as an aligned table; `cols` are (header, JSON field).
fn table(rows: &[Value], cols: &[(&str, &str)]) {
    let cell = |row: &Value, field: &str| -> String {
        match row.get(field) {
            None | Some(Value::Null) => "-".to_string(),
            Some(Value::String(s)) if s.is_empty() => "-".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) if a.is_empty() => "-".to_string(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.to_string(),
            Some(v) => v.to_string(),
        }
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|(_, f)| cell(r, f)).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |items: Vec<String>| {
        let s: Vec<String> = items
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(cols.iter().map(|(h, _)| h.to_string()).collect());
    for r in cells {
        line(r);
    }
}

fn rows(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

async fn users(admin: &AdminClient, cmd: UsersCmd, json_out: bool) -> anyhow::Result<()> {
    match cmd {
        UsersCmd::Create { name } => {
            let v = admin
                .call("POST", "/v1/users", Some(json!({ "name": name })))
                .await?;
            if json_out {
                print_json(&v)
            } else {
                println!("user {name} created (id {})", v["id"])
            }
        }
        UsersCmd::List => {
            let v = admin.call("GET", "/v1/users", None).await?;
            if json_out {
                print_json(&v)
            } else {
                table(
                    &rows(&v),
                    &[("ID", "id"), ("NAME", "name"), ("CREATED", "created_at")],
                )
            }
        }
        UsersCmd::Delete { name } => {
            admin
                .call("DELETE", &format!("/v1/users/{name}"), None)
                .await?;
            if !json_out {
                println!("user {name} deleted")
            }
        }
    }
    Ok(())
}

async fn keys(admin: &AdminClient, cmd: KeysCmd, json_out: bool) -> anyhow::Result<()> {
    match cmd {
        KeysCmd::Create {
            user,
            reusable,
            ephemeral,
            expiration,
            tags,
        } => {
            let body = json!({
                "user": user, "reusable": reusable, "ephemeral": ephemeral,
                "expiration": expiration, "tags": tags,
            });
            let v = admin.call("POST", "/v1/preauthkeys", Some(body)).await?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "pre-auth key for user {user} ({}{}), expires {}:",
                    if reusable { "reusable" } else { "single use" },
                    if ephemeral { ", ephemeral" } else { "" },
                    v["expires_at"].as_str().unwrap_or("never")
                );
                println!("{}", v["key"].as_str().unwrap_or_default());
            }
        }
        KeysCmd::List { user } => {
            let path = match user {
                Some(u) => format!("/v1/preauthkeys?user={u}"),
                None => "/v1/preauthkeys".to_string(),
            };
            let v = admin.call("GET", &path, None).await?;
            if json_out {
                print_json(&v)
            } else {
                table(
                    &rows(&v),
                    &[
                        ("ID", "id"),
                        ("PREFIX", "key_prefix"),
                        ("USER", "user"),
                        ("REUSABLE", "reusable"),
                        ("EPHEMERAL", "ephemeral"),
                        ("USED", "used"),
                        ("EXPIRES", "expires_at"),
                        ("TAGS", "tags"),
                    ],
                )
            }
        }
        KeysCmd::Expire { id } => {
            admin
                .call("POST", &format!("/v1/preauthkeys/{id}/expire"), None)
                .await?;
            if !json_out {
                println!("key {id} expired")
            }
        }
    }
    Ok(())
}

async fn standby(admin: &AdminClient, cmd: StandbyCmd, json_out: bool) -> anyhow::Result<()> {
    match cmd {
        StandbyCmd::Add { node, expiration } => {
            let v = admin
                .call(
                    "POST",
                    &format!("/v1/nodes/{node}/standby"),
                    Some(json!({ "expiration": expiration })),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "standby key for {} (single use), expires {}; on the standby host run `tsunagu up --login-server=URL --standby-key=KEY --advertise-exit-node`:",
                    v["node"].as_str().unwrap_or(&node),
                    v["expires_at"].as_str().unwrap_or_default()
                );
                println!("{}", v["key"].as_str().unwrap_or_default());
            }
        }
        StandbyCmd::List { node } => {
            let path = match node {
                Some(n) => format!("/v1/standby?node={n}"),
                None => "/v1/standby".to_string(),
            };
            let v = admin.call("GET", &path, None).await?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            let groups = rows(&v["nodes"]);
            if groups.is_empty() {
                println!("no exit node has standby hosts");
            }
            for g in groups {
                println!(
                    "{}: active host {}",
                    g["name"].as_str().unwrap_or_default(),
                    g["active"].as_str().unwrap_or_default()
                );
                let mut hosts = rows(&g["hosts"]);
                for h in &mut hosts {
                    if h["NotReady"].as_str().is_some_and(str::is_empty) {
                        h["NotReady"] = json!("ready");
                    }
                }
                table(
                    &hosts,
                    &[
                        ("  HOST", "Name"),
                        ("ACTIVE", "Active"),
                        ("ONLINE", "Online"),
                        ("STATE", "NotReady"),
                        ("PREFER", "Prefer"),
                        ("MACHINE KEY", "MachineKey"),
                    ],
                );
                for s in rows(&g["switches"]) {
                    println!(
                        "  switch {}: {} -> {} ({})",
                        s["At"].as_str().unwrap_or_default(),
                        s["From"].as_str().unwrap_or_default(),
                        s["To"].as_str().unwrap_or_default(),
                        s["Reason"].as_str().unwrap_or_default()
                    );
                }
            }
            let keys = rows(&v["unused_keys"]);
            if !keys.is_empty() {
                println!("unused standby keys:");
                table(
                    &keys,
                    &[
                        ("  NODE", "node"),
                        ("PREFIX", "key_prefix"),
                        ("EXPIRES", "expires_at"),
                    ],
                );
            }
        }
        StandbyCmd::Remove { host } => {
            let v = admin
                .call("DELETE", &format!("/v1/standby/{host}"), None)
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!("standby host {host} removed");
            }
        }
    }
    Ok(())
}

async fn nodes(admin: &AdminClient, cmd: NodesCmd, json_out: bool) -> anyhow::Result<()> {
    let (method, path, body, done): (&str, String, Option<Value>, String) = match cmd {
        NodesCmd::List => {
            let v = admin.call("GET", "/v1/nodes", None).await?;
            if json_out {
                print_json(&v);
            } else {
                let mut list = rows(&v);
                for n in &mut list {
                    n["active_host"] = n["standby"]["active"].clone();
                }
                table(
                    &list,
                    &[
                        ("ID", "id"),
                        ("NAME", "name"),
                        ("USER", "user"),
                        ("ADDRESSES", "addresses"),
                        ("OS", "os"),
                        ("ONLINE", "online"),
                        ("LAST SEEN", "last_seen"),
                        ("ADVERTISED", "advertised_routes"),
                        ("APPROVED", "approved_routes"),
                        ("EXIT NODE", "exit_node"),
                        ("ACTIVE HOST", "active_host"),
                    ],
                );
            }
            return Ok(());
        }
        NodesCmd::Standby(cmd) => return standby(admin, cmd, json_out).await,
        NodesCmd::Failover { node, to } => {
            let v = admin
                .call(
                    "POST",
                    &format!("/v1/nodes/{node}/failover"),
                    Some(json!({ "to": to })),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "{node}: {} is the active host now (was {}; {})",
                    v["switch"]["To"].as_str().unwrap_or_default(),
                    v["switch"]["From"].as_str().unwrap_or_default(),
                    v["switch"]["Reason"].as_str().unwrap_or_default(),
                );
            }
            return Ok(());
        }
        NodesCmd::ApproveExit { node } => (
            "POST",
            format!("/v1/nodes/{node}/approve-exit"),
            None,
            format!("exit node {node} approved"),
        ),
        NodesCmd::RevokeExit { node } => (
            "POST",
            format!("/v1/nodes/{node}/revoke-exit"),
            None,
            format!("exit node {node} revoked"),
        ),
        NodesCmd::Expire { node } => (
            "POST",
            format!("/v1/nodes/{node}/expire"),
            None,
            format!("node {node} expired"),
        ),
        NodesCmd::Delete { node } => (
            "DELETE",
            format!("/v1/nodes/{node}"),
            None,
            format!("node {node} deleted"),
        ),
        NodesCmd::Rename { node, new_name } => (
            "POST",
            format!("/v1/nodes/{node}/rename"),
            Some(json!({ "name": new_name })),
            format!("node {node} renamed"),
        ),
        NodesCmd::Tag { node, tags } => (
            "POST",
            format!("/v1/nodes/{node}/tags"),
            Some(json!({ "tags": tags })),
            format!("node {node} tagged"),
        ),
        NodesCmd::Register { key, user } => (
            "POST",
            "/v1/register".to_string(),
            Some(json!({ "key": key, "user": user })),
            "registration approved".to_string(),
        ),
    };
    let v = admin.call(method, &path, body).await?;
    if json_out {
        print_json(&v)
    } else {
        println!("{done}")
    }
    Ok(())
}
