//! Command-line interface of `tsunagu-server`: `serve` runs the server; every other
//! subcommand is an admin command that talks to the running server over its local
//! admin socket (`<data-dir>/admin.sock`, owner-only), except `policy check`, which
//! needs no server.

use clap::{Args as ClapArgs, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "tsunagu-server",
    version,
    about = "tsunagu coordination server"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, ClapArgs)]
pub struct Common {
    /// Data directory (database, keys, admin socket). Env: TSUNAGU_DATA_DIR.
    #[arg(long, global = true, value_name = "DIR", env = "TSUNAGU_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Configuration file (TOML). Env: TSUNAGU_CONFIG.
    #[arg(long, global = true, value_name = "FILE", env = "TSUNAGU_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordination server (with its embedded DERP relay and STUN server).
    Serve(Box<ServeArgs>),
    /// Run a DERP relay and STUN server on their own.
    Relay(RelayArgs),
    /// Show the running server's embedded relay: counters and connected clients.
    RelayStatus,
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Manage pre-auth keys.
    #[command(subcommand)]
    Preauthkeys(KeysCmd),
    /// Manage nodes.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Check, set or show the ACL policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Debug, ClapArgs)]
pub struct ServeArgs {
    /// Address to listen on for clients (HTTP, or HTTPS with a certificate).
    #[arg(long, value_name = "ADDR:PORT", env = "TSUNAGU_LISTEN")]
    pub listen: Option<String>,
    /// The URL clients are told to use (defaults to http://<listen>).
    #[arg(long, value_name = "URL", env = "TSUNAGU_SERVER_URL")]
    pub server_url: Option<String>,
    /// TLS certificate chain (PEM); with --tls-key the server speaks HTTPS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// UDP address of the STUN server (default: the listen host, port 3478).
    #[arg(long, value_name = "ADDR:PORT", env = "TSUNAGU_STUN_LISTEN")]
    pub stun_listen: Option<String>,
    /// Run no DERP relay and no STUN server (and announce no DERP map).
    #[arg(long)]
    pub no_relay: bool,
    /// The relay region's name as clients show it.
    #[arg(long, value_name = "NAME")]
    pub derp_region_name: Option<String>,
    /// Tell clients to skip verifying the relay's TLS certificate (labs only).
    #[arg(long)]
    pub derp_insecure_for_tests: bool,
    /// Announce the relay region even without TLS (for clients that speak DERP over plain
    /// HTTP; Go clients only with TS_DEBUG_USE_DERP_HTTP=1).
    #[arg(long)]
    pub derp_announce_http: bool,
    /// Accept DERP logins only from node keys of this tailnet (authorized, not expired);
    /// other relays of the region (mesh key) are let in.
    #[arg(long)]
    pub relay_verify_clients: bool,
    /// Another relay of the region to announce after this server (its URL, e.g.
    /// https://198.51.100.5); repeat or comma-separate for more.
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    pub derp_node: Vec<String>,
    /// A relay region run elsewhere to announce in the DERP map (repeat for more):
    /// id=901,code=b,host=198.51.100.7[,name=NAME][,ipv4=IP][,ipv6=IP][,derp_port=443]
    /// [,stun_port=3478|-1][,http][,insecure_for_tests]. `http`: the relay speaks plain
    /// HTTP (default port 80; needs --derp-announce-http).
    #[arg(long, value_name = "SPEC", value_parser = crate::config::parse_region)]
    pub derp_region: Vec<tsunagu_control::relay::RegionSpec>,
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// An exit node's active host gone (map stream and relay connection) this many
    /// seconds: a ready standby host takes over (default 3).
    #[arg(
        long,
        value_name = "SECS",
        env = "TSUNAGU_STANDBY_FAILOVER_AFTER",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub standby_failover_after: Option<u64>,
    #[command(flatten)]
    pub dns: DnsArgs,
}

/// The tailnet's DNS (`[dns]` in the file; these add to it or override it).
#[derive(Debug, Default, ClapArgs)]
pub struct DnsArgs {
    /// MagicDNS: clients answer node names (NAME.<base domain>) themselves.
    #[arg(long, value_name = "BOOL")]
    pub magic_dns: Option<bool>,
    /// The domain under which nodes are named (default tailnet.internal).
    #[arg(long, value_name = "DOMAIN")]
    pub base_domain: Option<String>,
    /// Make clients use the tailnet's nameservers instead of their own.
    #[arg(long)]
    pub override_local_dns: bool,
    /// A global nameserver (IP, IP:port or https:// URL); repeat for more.
    #[arg(long, value_name = "NS")]
    pub dns_nameserver: Vec<String>,
    /// Split DNS: DOMAIN=IP[,IP...]; repeat for more domains.
    #[arg(long, value_name = "DOMAIN=NS,...")]
    pub dns_split: Vec<String>,
    /// A search domain; repeat for more.
    #[arg(long, value_name = "DOMAIN")]
    pub dns_search_domain: Vec<String>,
    /// An extra A/AAAA record answered by clients: NAME=IP; repeat for more.
    #[arg(long, value_name = "NAME=IP")]
    pub dns_extra_record: Vec<String>,
}

/// Meshing with the other relays of the region.
#[derive(Debug, ClapArgs)]
pub struct MeshArgs {
    /// File holding the region's shared mesh key (other relays present it to watch this
    /// one's clients and forward packets to them).
    #[arg(long, value_name = "FILE")]
    pub mesh_key_file: Option<PathBuf>,
    /// The other relays of the region, `http://HOST:PORT` or `https://HOST:PORT`
    /// (certificate checked against the system's roots or SSL_CERT_FILE), comma-separated.
    #[arg(
        long,
        value_name = "URL",
        value_delimiter = ',',
        requires = "mesh_key_file"
    )]
    pub mesh_with: Vec<String>,
}

#[derive(Debug, ClapArgs)]
pub struct RelayArgs {
    /// Address for DERP over HTTP (or HTTPS with a certificate).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: String,
    /// UDP address of the STUN server (default: the listen host, port 3478).
    #[arg(long, value_name = "ADDR:PORT")]
    pub stun_listen: Option<String>,
    /// Run no STUN server.
    #[arg(long, conflicts_with = "stun_listen")]
    pub no_stun: bool,
    /// TLS certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

#[derive(Debug, Subcommand)]
pub enum UsersCmd {
    Create { name: String },
    List,
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key; the key alone is printed on the last line.
    Create {
        #[arg(long)]
        user: String,
        #[arg(long)]
        reusable: bool,
        #[arg(long)]
        ephemeral: bool,
        /// Lifetime, e.g. 90m, 24h, 7d (default 24h).
        #[arg(long, value_name = "DUR")]
        expiration: Option<String>,
        /// Tags for nodes registered with the key: tag:a,tag:b
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    List {
        #[arg(long)]
        user: Option<String>,
    },
    Expire {
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    List,
    /// Approve a node's advertised exit-node routes (0.0.0.0/0, ::/0).
    ApproveExit {
        node: String,
    },
    /// Revoke a node's exit-node approval.
    RevokeExit {
        node: String,
    },
    /// Expire a node's key now: it is cut off until it re-authenticates.
    Expire {
        node: String,
    },
    Delete {
        node: String,
    },
    Rename {
        node: String,
        new_name: String,
    },
    /// Set a node's tags (replacing its user ownership): tag:a,tag:b
    Tag {
        node: String,
        #[arg(value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// Approve an interactive registration (the key printed in the client's login URL).
    Register {
        #[arg(long)]
        key: String,
        #[arg(long)]
        user: String,
    },
    /// Standby hosts of an exit node: other machines that hold its identity and take over
    /// when it goes away (tagged, approved exit nodes run by tsunagud).
    #[command(subcommand)]
    Standby(StandbyCmd),
    /// Move an exit node's members to another of its hosts now (planned maintenance).
    Failover {
        node: String,
        /// The host to move to (hostname or machine key); default: the best ready one.
        #[arg(long, value_name = "HOST")]
        to: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum StandbyCmd {
    /// A single-use key that enrols one standby host of NODE (`tsunagu up
    /// --standby-key=KEY` on it); the key alone is printed on the last line.
    Add {
        node: String,
        /// Lifetime of the key, e.g. 30m, 24h (default 1h).
        #[arg(long, value_name = "DUR")]
        expiration: Option<String>,
    },
    /// Exit nodes with standby hosts: their hosts, which is active, the last switches.
    List { node: Option<String> },
    /// Remove a standby host (hostname or machine key): it is refused at once.
    Remove { host: String },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Parse and validate a policy file without a server.
    Check { file: PathBuf },
    /// Replace the running policy (validated first; the old one keeps serving on error).
    Set { file: PathBuf },
    /// Print the running policy.
    Get,
}
