//! What one client can make the server hold, do or store, and for how long: the bounds
//! of the public listener, of Noise sessions, of requests, of map streams, of
//! registrations waiting for an admin, and of node key lifetimes.
//!
//! Every one has a default that a tailnet of a few thousand devices (official clients
//! and tsunagud) never reaches in normal use; `tsunagu-server`'s configuration file can
//! change them (`[limits]`, `key_expiry_days`, `max_key_expiry_days`).

use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;

/// Endpoints kept of a node's report (the mapper's cap, named here with the other bounds).
pub use crate::mapper::MAX_ENDPOINTS;

/// The largest Hostinfo accepted (as stored: its known fields, serialized). It goes into
/// every peer's map, so it is bounded; a real one is 1-3 KiB.
pub const MAX_HOSTINFO: usize = 16 * 1024;

/// How long the HTTP/2-over-Noise session waits for the client's handshake answer to be
/// written before giving up.
pub const NOISE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// A client must send a request's whole header within this (slowloris); an idle
    /// HTTP/1.1 keep-alive connection is closed after it too.
    pub header_read_timeout: Duration,
    /// Connections open at once from one source address (plain, TLS, upgraded: Noise
    /// sessions and DERP included); further ones are closed at once.
    pub max_connections_per_ip: usize,
    /// HTTP/2 streams (requests) open at once on one Noise session.
    pub max_streams_per_session: u32,
    /// A Noise session with no request in flight (no map stream, no registration
    /// waiting) for this long is closed.
    pub session_idle_timeout: Duration,
    /// Largest `/machine/register` body (a register request with its Hostinfo).
    pub max_register_body: usize,
    /// Largest `/machine/map` body.
    pub max_map_body: usize,
    /// Largest Hostinfo (see [`MAX_HOSTINFO`]).
    pub max_hostinfo: usize,
    /// Map streams open at once per node; a new one closes the oldest.
    pub max_map_streams_per_node: usize,
    /// How long an interactive registration waits for an admin.
    pub registration_ttl: Duration,
    /// Registrations stored at most (waiting or recently approved), whatever the number
    /// of machine keys asking.
    pub max_pending_registrations: u64,
    /// New interactive registrations per second from one source address, and the burst.
    pub registrations_per_ip: (f64, f64),
    /// New interactive registrations per second from everyone, and the burst.
    pub registrations_total: (f64, f64),
    /// Register requests of any kind (with a key, interactive, follow-ups) per second
    /// from one source address, and the burst: what is over it is answered 429 before
    /// the request is even parsed.
    pub register_requests_per_ip: (f64, f64),
    /// Full maps (a new map stream, or a non-streaming request that wants the peers) per
    /// second per node, and the burst; more are answered 429 before a map is built.
    pub full_maps_per_node: (f64, f64),
    /// Key lifetime a node gets when it registers without asking for one (and after an
    /// interactive approval); `None`: keys do not expire. Tagged nodes never expire.
    pub key_expiry: Option<Duration>,
    /// The longest key lifetime a node may ask for.
    pub max_key_expiry: Duration,
}

/// 180 days, as Tailscale.
pub const DEFAULT_KEY_EXPIRY: Duration = Duration::from_secs(180 * 86_400);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_connections_per_ip: 256,
            max_streams_per_session: 16,
            session_idle_timeout: Duration::from_secs(60),
            max_register_body: 32 * 1024,
            max_map_body: 64 * 1024,
            max_hostinfo: MAX_HOSTINFO,
            max_map_streams_per_node: 4,
            registration_ttl: Duration::from_secs(30 * 60),
            max_pending_registrations: 10_000,
            registrations_per_ip: (1.0, 10.0),
            registrations_total: (20.0, 100.0),
            register_requests_per_ip: (10.0, 100.0),
            full_maps_per_node: (1.0, 10.0),
            key_expiry: Some(DEFAULT_KEY_EXPIRY),
            max_key_expiry: DEFAULT_KEY_EXPIRY,
        }
    }
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

impl Limits {
    /// Whether the settings make sense together; the reason when not.
    pub fn check(&self) -> Result<(), String> {
        if let Some(d) = self.key_expiry
            && d > self.max_key_expiry
        {
            return Err(format!(
                "the default key expiry ({} days) is longer than the maximum ({} days)",
                d.as_secs() / 86_400,
                self.max_key_expiry.as_secs() / 86_400
            ));
        }
        let positive = [
            ("max_connections_per_ip", self.max_connections_per_ip as u64),
            (
                "max_streams_per_session",
                u64::from(self.max_streams_per_session),
            ),
            (
                "max_map_streams_per_node",
                self.max_map_streams_per_node as u64,
            ),
            ("max_pending_registrations", self.max_pending_registrations),
            ("max_hostinfo", self.max_hostinfo as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.max_register_body < self.max_hostinfo || self.max_map_body < self.max_hostinfo {
            return Err("request body limits must be at least max_hostinfo".into());
        }
        Ok(())
    }

    /// The key expiry of a node registering at `now` that asked for `requested` (`None`:
    /// nothing asked): the default when nothing was asked, else the request, clamped to
    /// the maximum. (A node owned by tags gets none: the store sees to that.)
    pub fn node_expiry(
        &self,
        now: DateTime<Utc>,
        requested: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        let latest = now + delta(self.max_key_expiry);
        match requested {
            Some(t) => Some(t.min(latest)),
            None => self.key_expiry.map(|d| now + delta(d)),
        }
    }

    /// The key expiry given by an interactive approval at `now`.
    pub fn approval_expiry(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.node_expiry(now, None)
    }

    pub fn registration_ttl(&self) -> TimeDelta {
        delta(self.registration_ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_expiry_default_clamp_and_off() {
        let l = Limits::default();
        let now = Utc::now();
        assert_eq!(l.node_expiry(now, None), Some(now + TimeDelta::days(180)));
        let soon = now + TimeDelta::days(7);
        assert_eq!(l.node_expiry(now, Some(soon)), Some(soon));
        let never = now + TimeDelta::days(3650);
        assert_eq!(
            l.node_expiry(now, Some(never)),
            Some(now + TimeDelta::days(180))
        );
        let off = Limits {
            key_expiry: None,
            ..Limits::default()
        };
        assert_eq!(off.node_expiry(now, None), None);
        assert_eq!(off.approval_expiry(now), None);
        assert_eq!(l.approval_expiry(now), Some(now + TimeDelta::days(180)));
        assert!(l.check().is_ok());
        let bad = Limits {
            key_expiry: Some(Duration::from_secs(200 * 86_400)),
            ..Limits::default()
        };
        assert!(bad.check().unwrap_err().contains("longer than the maximum"));
    }
}
