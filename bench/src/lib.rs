//! Shared pieces of the benchmark programs in `src/bin`.

pub mod headscale;
pub mod server;
pub mod tls;
pub mod wg;

/// The host's load average (1, 5 and 15 minutes) from `/proc/loadavg`, to print beside
/// figures measured on a machine that other work may share.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}
