//! Server configuration: defaults, overridden by the TOML file, overridden by the
//! environment and flags (clap reads both), so that `tsunagu-server serve` alone works.

use anyhow::Context as _;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tsunagu_control::limits::Limits;
use tsunagu_control::relay::RegionSpec;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/tsunagu-server";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    server_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    /// Policy file loaded at start when the database has none yet.
    policy_file: Option<PathBuf>,
    /// Seconds after which an offline ephemeral node is removed.
    ephemeral_timeout_secs: Option<u64>,
    /// Run the embedded DERP relay and STUN server (default true).
    relay: Option<bool>,
    /// UDP address of the STUN server (default: the listen address's host, port 3478).
    stun_listen: Option<String>,
    derp_region_id: Option<i32>,
    derp_region_code: Option<String>,
    derp_region_name: Option<String>,
    /// Tell clients to skip verifying the relay's certificate (labs only).
    derp_insecure_for_tests: Option<bool>,
    /// Announce the region even without TLS (clients that speak DERP over plain HTTP).
    derp_announce_http: Option<bool>,
    /// Relay regions run elsewhere, announced in the DERP map (`[[derp_region]]`).
    #[serde(default)]
    derp_region: Vec<tsunagu_control::relay::RegionConfig>,
    /// Accept DERP logins only from node keys of the tailnet.
    relay_verify_clients: Option<bool>,
    /// Key lifetime of a node that asks for none, in days (0: keys do not expire).
    key_expiry_days: Option<u64>,
    /// The longest key lifetime a node may ask for, in days.
    max_key_expiry_days: Option<u64>,
    /// Bounds on connections, sessions, requests and registrations (`[limits]`).
    #[serde(default)]
    limits: LimitsFile,
    /// The tailnet's DNS (`[dns]`, Headscale's names).
    #[serde(default)]
    dns: tsunagu_control::dns::DnsFile,
    /// Seconds an exit node's active host may be gone before a standby host takes over.
    standby_failover_after_secs: Option<u64>,
}

/// `[limits]` in the configuration file; every key optional (see
/// `tsunagu_control::limits::Limits` for what each bounds).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    header_timeout_secs: Option<u64>,
    max_connections_per_ip: Option<usize>,
    max_streams_per_session: Option<u32>,
    session_idle_timeout_secs: Option<u64>,
    max_register_body_bytes: Option<usize>,
    max_map_body_bytes: Option<usize>,
    max_hostinfo_bytes: Option<usize>,
    max_map_streams_per_node: Option<usize>,
    registration_ttl_secs: Option<u64>,
    max_pending_registrations: Option<u64>,
    registrations_per_ip_per_second: Option<f64>,
    registration_burst_per_ip: Option<f64>,
    registrations_per_second: Option<f64>,
    registration_burst: Option<f64>,
    register_requests_per_ip_per_second: Option<f64>,
    register_request_burst_per_ip: Option<f64>,
    full_maps_per_node_per_second: Option<f64>,
    full_map_burst_per_node: Option<f64>,
}

const DAY: u64 = 86_400;

impl LimitsFile {
    fn resolve(
        &self,
        key_expiry_days: Option<u64>,
        max_key_expiry_days: Option<u64>,
    ) -> anyhow::Result<Limits> {
        let d = Limits::default();
        let secs = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_secs);
        let key_expiry = match key_expiry_days {
            Some(0) => None,
            Some(days) => Some(Duration::from_secs(days.saturating_mul(DAY))),
            None => d.key_expiry,
        };
        let limits = Limits {
            header_read_timeout: secs(self.header_timeout_secs, d.header_read_timeout),
            max_connections_per_ip: self
                .max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip),
            max_streams_per_session: self
                .max_streams_per_session
                .unwrap_or(d.max_streams_per_session),
            session_idle_timeout: secs(self.session_idle_timeout_secs, d.session_idle_timeout),
            max_register_body: self.max_register_body_bytes.unwrap_or(d.max_register_body),
            max_map_body: self.max_map_body_bytes.unwrap_or(d.max_map_body),
            max_hostinfo: self.max_hostinfo_bytes.unwrap_or(d.max_hostinfo),
            max_map_streams_per_node: self
                .max_map_streams_per_node
                .unwrap_or(d.max_map_streams_per_node),
            registration_ttl: secs(self.registration_ttl_secs, d.registration_ttl),
            max_pending_registrations: self
                .max_pending_registrations
                .unwrap_or(d.max_pending_registrations),
            registrations_per_ip: (
                self.registrations_per_ip_per_second
                    .unwrap_or(d.registrations_per_ip.0),
                self.registration_burst_per_ip
                    .unwrap_or(d.registrations_per_ip.1),
            ),
            registrations_total: (
                self.registrations_per_second
                    .unwrap_or(d.registrations_total.0),
                self.registration_burst.unwrap_or(d.registrations_total.1),
            ),
            register_requests_per_ip: (
                self.register_requests_per_ip_per_second
                    .unwrap_or(d.register_requests_per_ip.0),
                self.register_request_burst_per_ip
                    .unwrap_or(d.register_requests_per_ip.1),
            ),
            full_maps_per_node: (
                self.full_maps_per_node_per_second
                    .unwrap_or(d.full_maps_per_node.0),
                self.full_map_burst_per_node
                    .unwrap_or(d.full_maps_per_node.1),
            ),
            key_expiry,
            max_key_expiry: max_key_expiry_days.map_or(d.max_key_expiry, |days| {
                Duration::from_secs(days.saturating_mul(DAY))
            }),
        };
        limits.check().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(limits)
    }
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: String,
    pub server_url: String,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub policy_file: Option<PathBuf>,
    pub ephemeral_timeout_secs: u64,
    /// The embedded relay; `None` when turned off.
    pub relay: Option<tsunagu_control::relay::RelaySettings>,
    /// Relay regions run elsewhere, announced after the embedded one.
    pub derp_regions: Vec<RegionSpec>,
    /// Announce relays that speak plain HTTP (the embedded one on a plain-HTTP server,
    /// and regions marked `http`).
    pub derp_announce_http: bool,
    /// `[dns]` as written; checked (with the command line's additions) by
    /// [`Config::dns_settings`].
    pub dns: tsunagu_control::dns::DnsFile,
    /// An exit node's active host gone (map stream and relay connection) this many
    /// seconds: a ready standby host takes over.
    pub standby_failover_after_secs: u64,
    pub limits: Limits,
}

/// A region given with `--derp-region`, checked (clap shows the error with the flag).
pub fn parse_region(spec: &str) -> Result<RegionSpec, String> {
    spec.parse::<tsunagu_control::relay::RegionConfig>()
        .and_then(|c| c.validate())
        .map_err(|e| e.to_string())
}

/// The STUN address that goes with `listen`: same host, port 3478.
pub fn default_stun_listen(listen: &str) -> String {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    format!("{host}:{}", tsunagu_control::relay::DEFAULT_STUN_PORT)
}

impl Config {
    /// Resolve from the config file (if any) and the overrides given on the command line
    /// or in the environment.
    pub fn resolve(
        file: Option<&Path>,
        data_dir: Option<PathBuf>,
        listen: Option<String>,
        server_url: Option<String>,
    ) -> anyhow::Result<Config> {
        let f: File = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("{}: cannot read", p.display()))?;
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
            }
            None => File::default(),
        };
        let data_dir = data_dir
            .or(f.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let listen = listen
            .or(f.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let tls = match (f.tls_cert, f.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => anyhow::bail!("tls_cert and tls_key must be given together"),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server_url = server_url
            .or(f.server_url)
            .unwrap_or_else(|| format!("{scheme}://{listen}"));
        let server_url = server_url.trim_end_matches('/').to_string();
        if !(server_url.starts_with("http://") || server_url.starts_with("https://")) {
            anyhow::bail!("server_url {server_url:?} must start with http:// or https://");
        }
        let mut derp_regions = Vec::with_capacity(f.derp_region.len());
        for (i, r) in f.derp_region.iter().enumerate() {
            let spec = r.validate().map_err(|e| {
                let id = r.id.map(|id| format!(" (id {id})")).unwrap_or_default();
                let file = file
                    .map(|p| format!("{}: ", p.display()))
                    .unwrap_or_default();
                anyhow::anyhow!("{file}derp_region[{i}]{id}: {e}")
            })?;
            derp_regions.push(spec);
        }
        let derp_announce_http = f.derp_announce_http.unwrap_or(false);
        let limits = f
            .limits
            .resolve(f.key_expiry_days, f.max_key_expiry_days)
            .map_err(|e| {
                let file = file
                    .map(|p| format!("{}: ", p.display()))
                    .unwrap_or_default();
                anyhow::anyhow!("{file}{e}")
            })?;
        let relay = f.relay.unwrap_or(true).then(|| {
            let d = tsunagu_control::relay::RelaySettings::default();
            tsunagu_control::relay::RelaySettings {
                stun_listen: Some(
                    f.stun_listen
                        .clone()
                        .unwrap_or_else(|| default_stun_listen(&listen)),
                ),
                region_id: f.derp_region_id.unwrap_or(d.region_id),
                region_code: f.derp_region_code.clone().unwrap_or(d.region_code),
                region_name: f.derp_region_name.clone().unwrap_or(d.region_name),
                insecure_for_tests: f.derp_insecure_for_tests.unwrap_or(false),
                mesh_key: None,
                mesh_with: Vec::new(),
                extra_nodes: Vec::new(),
                announce_plain_http: derp_announce_http,
                verify_clients: f.relay_verify_clients.unwrap_or(false),
            }
        });
        Ok(Config {
            data_dir,
            listen,
            server_url,
            tls,
            policy_file: f.policy_file,
            ephemeral_timeout_secs: f.ephemeral_timeout_secs.unwrap_or(300),
            relay,
            derp_regions,
            derp_announce_http,
            dns: f.dns,
            standby_failover_after_secs: f.standby_failover_after_secs.unwrap_or(3).max(1),
            limits,
        })
    }

    /// The checked DNS settings; a bad value names its field (`dns.base_domain: ...`).
    pub fn dns_settings(&self) -> anyhow::Result<tsunagu_control::dns::DnsSettings> {
        self.dns.validate().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// What `serve`'s DNS flags add to or change in `[dns]`.
    pub fn apply_dns_flags(&mut self, a: &crate::cli::DnsArgs) -> anyhow::Result<()> {
        let d = &mut self.dns;
        if let Some(m) = a.magic_dns {
            d.magic_dns = Some(m);
        }
        if let Some(b) = &a.base_domain {
            d.base_domain = Some(b.clone());
        }
        if a.override_local_dns {
            d.override_local_dns = Some(true);
        }
        d.nameservers
            .global
            .extend(a.dns_nameserver.iter().cloned());
        for spec in &a.dns_split {
            let (domain, servers) = spec
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--dns-split {spec:?}: give DOMAIN=IP[,IP...]"))?;
            d.nameservers.split.insert(
                domain.trim().to_string(),
                servers.split(',').map(|s| s.trim().to_string()).collect(),
            );
        }
        d.search_domains.extend(a.dns_search_domain.iter().cloned());
        for spec in &a.dns_extra_record {
            let (name, value) = spec
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--dns-extra-record {spec:?}: give NAME=IP"))?;
            d.extra_records.push(tsunagu_control::dns::ExtraRecordFile {
                name: name.trim().to_string(),
                record_type: String::new(),
                value: value.trim().to_string(),
            });
        }
        Ok(())
    }

    /// What the whole DERP map must satisfy, once the command line is applied: no region
    /// ID or code twice, and regions that speak plain HTTP only with
    /// `derp_announce_http` (Go clients reach relays over TLS only, as for the embedded
    /// relay of a plain-HTTP server).
    pub fn check_regions(&self) -> anyhow::Result<()> {
        let own = self
            .relay
            .as_ref()
            .map(|r| (r.region_id, r.region_code.as_str()));
        tsunagu_control::relay::check_regions(own, &self.derp_regions)
            .map_err(|e| anyhow::anyhow!("DERP regions: {e}"))?;
        if !self.derp_announce_http
            && let Some(r) = self.derp_regions.iter().find(|r| r.plain_http)
        {
            anyhow::bail!(
                "DERP region {} ({:?}) speaks plain HTTP: Go clients reach relays over TLS \
                 only; give --derp-announce-http (derp_announce_http = true) to announce it \
                 anyway, for clients that speak DERP over plain HTTP",
                r.id,
                r.code
            );
        }
        Ok(())
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_alone() {
        let c = Config::resolve(None, None, None, None).unwrap();
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.server_url, "http://0.0.0.0:8080");
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "listen = \"198.51.100.4:80\"\ndata_dir = \"/tmp/x\"\n").unwrap();
        let c = Config::resolve(Some(&p), None, None, None).unwrap();
        assert_eq!(c.listen, "198.51.100.4:80");
        assert_eq!(c.server_url, "http://198.51.100.4:80");
        let c = Config::resolve(
            Some(&p),
            Some("/tmp/y".into()),
            Some("127.0.0.1:1".into()),
            None,
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/y"));
        assert_eq!(c.listen, "127.0.0.1:1");
    }

    #[test]
    fn the_relay_is_on_by_default_with_stun_beside_the_listener() {
        let c = Config::resolve(None, None, Some("198.51.100.4:443".into()), None).unwrap();
        let r = c.relay.expect("relay on by default");
        assert_eq!(r.stun_listen.as_deref(), Some("198.51.100.4:3478"));
        assert_eq!(r.region_id, 900);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "relay = false\n").unwrap();
        assert!(
            Config::resolve(Some(&p), None, None, None)
                .unwrap()
                .relay
                .is_none()
        );
        std::fs::write(
            &p,
            "stun_listen = \"[::]:3479\"\nderp_region_name = \"Lab\"\n",
        )
        .unwrap();
        let r = Config::resolve(Some(&p), None, None, None)
            .unwrap()
            .relay
            .unwrap();
        assert_eq!(
            (r.stun_listen.as_deref(), r.region_name.as_str()),
            (Some("[::]:3479"), "Lab")
        );
    }

    #[test]
    fn bad_files_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "lissten = 1\n").unwrap();
        let e = Config::resolve(Some(&p), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `lissten`"), "{e}");
        std::fs::write(&p, "tls_cert = \"/a\"\n").unwrap();
        assert!(Config::resolve(Some(&p), None, None, None).is_err());
    }

    #[test]
    fn limits_and_key_expiry_from_the_file() {
        let c = Config::resolve(None, None, None, None).unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.limits.key_expiry, Some(Duration::from_secs(180 * 86_400)));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(
            &p,
            "key_expiry_days = 30\nmax_key_expiry_days = 90\nrelay_verify_clients = true\n\
             [limits]\nheader_timeout_secs = 5\nmax_connections_per_ip = 8\n\
             max_map_streams_per_node = 2\nmax_pending_registrations = 50\n\
             registrations_per_ip_per_second = 0.5\n\
             register_requests_per_ip_per_second = 2.0\nfull_map_burst_per_node = 3.0\n",
        )
        .unwrap();
        let c = Config::resolve(Some(&p), None, None, None).unwrap();
        let l = &c.limits;
        assert_eq!(l.key_expiry, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(l.max_key_expiry, Duration::from_secs(90 * 86_400));
        assert_eq!(l.header_read_timeout, Duration::from_secs(5));
        assert_eq!(
            (l.max_connections_per_ip, l.max_map_streams_per_node),
            (8, 2)
        );
        assert_eq!(l.max_pending_registrations, 50);
        assert_eq!(l.registrations_per_ip, (0.5, 10.0));
        assert_eq!(l.register_requests_per_ip, (2.0, 100.0));
        assert_eq!(l.full_maps_per_node, (1.0, 3.0));
        assert!(c.relay.unwrap().verify_clients);
        std::fs::write(
            &p,
            "key_expiry_days = 0
",
        )
        .unwrap();
        let c = Config::resolve(Some(&p), None, None, None).unwrap();
        assert_eq!(c.limits.key_expiry, None, "0: keys do not expire");
        std::fs::write(
            &p,
            "key_expiry_days = 365
",
        )
        .unwrap();
        let e = Config::resolve(Some(&p), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than the maximum"), "{e}");
        std::fs::write(&p, "[limits]\nmax_streams = 3\n").unwrap();
        let e = Config::resolve(Some(&p), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `max_streams`"), "{e}");
    }

    #[test]
    fn the_dns_section_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(
            &p,
            "[dns]\nmagic_dns = true\nbase_domain = \"ts.lab.test\"\n\
             nameservers.global = [\"203.0.113.53\"]\n\
             [[dns.extra_records]]\nname = \"web.ts.lab.test\"\nvalue = \"100.64.0.9\"\n",
        )
        .unwrap();
        let mut c = Config::resolve(Some(&p), None, None, None).unwrap();
        let flags = crate::cli::DnsArgs {
            dns_split: vec!["corp.lab.test=203.0.113.54,203.0.113.55".into()],
            override_local_dns: true,
            ..Default::default()
        };
        c.apply_dns_flags(&flags).unwrap();
        let d = c.dns_settings().unwrap();
        assert_eq!(d.base_domain, "ts.lab.test");
        assert!(d.override_local_dns);
        assert_eq!(d.split["corp.lab.test"].len(), 2);
        assert_eq!(d.extra_records.len(), 1);
        // A bad value is refused with its field.
        std::fs::write(&p, "[dns]\nbase_domain = \"bad domain\"\n").unwrap();
        let c = Config::resolve(Some(&p), None, None, None).unwrap();
        let e = c.dns_settings().unwrap_err().to_string();
        assert!(e.starts_with("dns.base_domain: "), "{e}");
        std::fs::write(&p, "[dns]\nnameserver = []\n").unwrap();
        let e = Config::resolve(Some(&p), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `nameserver`"), "{e}");
    }

    #[test]
    fn regions_elsewhere_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(
            &p,
            "derp_announce_http = true\n\
             [[derp_region]]\nid = 901\ncode = \"b\"\nhost = \"198.51.100.7\"\n\
             derp_port = 8080\nhttp = true\n\
             [[derp_region]]\nid = 902\ncode = \"c\"\nname = \"Region C\"\n\
             host = \"relay-c.tailnet.example\"\nipv4 = \"198.51.100.8\"\nstun_port = -1\n",
        )
        .unwrap();
        let c = Config::resolve(Some(&p), None, None, None).unwrap();
        c.check_regions().unwrap();
        assert!(c.derp_announce_http);
        let r: Vec<(u16, &str, u16, bool)> = c
            .derp_regions
            .iter()
            .map(|r| (r.id, r.code.as_str(), r.derp_port, r.plain_http))
            .collect();
        assert_eq!(r, [(901, "b", 8080, true), (902, "c", 443, false)]);
        assert_eq!(c.derp_regions[1].stun_port, None);
        assert_eq!(c.derp_regions[1].name, "Region C");
    }

    #[test]
    fn bad_regions_name_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        let resolve = |text: &str| {
            std::fs::write(&p, text).unwrap();
            Config::resolve(Some(&p), None, None, None)
        };
        let e =
            resolve("[[derp_region]]\nid = 901\ncode = \"b\"\nhost = \"x\"\nderp_port = 70000\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.ends_with("derp_region[0] (id 901): derp_port 70000 is not a port (1-65535)"),
            "{e}"
        );
        let e = resolve("[[derp_region]]\nid = 901\ncode = \"b\"\nhost = \"x\"\nport = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `port`"), "{e}");
        // The server's own region (900) counts for duplicates.
        let c = resolve("[[derp_region]]\nid = 900\ncode = \"b\"\nhost = \"x\"\n").unwrap();
        let e = c.check_regions().unwrap_err().to_string();
        assert!(e.contains("region id 900 is given twice"), "{e}");
        let c = resolve("relay = false\n[[derp_region]]\nid = 900\ncode = \"b\"\nhost = \"x\"\n")
            .unwrap();
        c.check_regions().unwrap();
        let c = resolve(
            "[[derp_region]]\nid = 901\ncode = \"b\"\nhost = \"x\"\n\
             [[derp_region]]\nid = 902\ncode = \"b\"\nhost = \"y\"\n",
        )
        .unwrap();
        let e = c.check_regions().unwrap_err().to_string();
        assert!(e.contains("region code \"b\" is given twice"), "{e}");
        // A plain-HTTP region needs derp_announce_http, like the embedded relay.
        let c = resolve("[[derp_region]]\nid = 901\ncode = \"b\"\nhost = \"x\"\nhttp = true\n")
            .unwrap();
        let e = c.check_regions().unwrap_err().to_string();
        assert!(
            e.contains("speaks plain HTTP") && e.contains("--derp-announce-http"),
            "{e}"
        );
    }
}
