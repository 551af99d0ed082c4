//! Shared pieces of the benchmark programs in `src/bin`.

pub mod headscale;
pub mod procfs;
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

/// Raises this process's soft and hard limit of open files to `need` (children inherit
/// it); a failure (not root) keeps the old limit, and the run then says what ran out.
pub fn raise_nofile(need: u64) {
    let lim = libc::rlimit {
        rlim_cur: need,
        rlim_max: need,
    };
    // SAFETY: setrlimit reads the struct we pass; failure keeps the old limit.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}
