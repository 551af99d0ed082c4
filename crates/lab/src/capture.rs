//! Packet captures with tcpdump, for leak checks ("nothing but UDP to the tailnet's
//! endpoints on the cafe LAN").

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::cmd::{self, ADMIN_TIMEOUT};
use crate::error::LabError;
use crate::lab::{Lab, ProcId};
use crate::netns::Netns;

/// How long tcpdump may take to start capturing.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// A running tcpdump, started by [`capture`]. Finish it with [`Capture::finish`]; if it is
/// just dropped, the lab still kills tcpdump when the lab itself is dropped.
#[derive(Debug)]
#[must_use = "call finish() to stop the capture and read it"]
pub struct Capture {
    id: ProcId,
    file: PathBuf,
    log: PathBuf,
}

/// Captures on `iface` inside `ns` into the pcap file `file`, and returns once tcpdump is
/// capturing. See [`capture_filtered`].
pub fn capture(lab: &mut Lab, ns: &Netns, iface: &str, file: &Path) -> Result<Capture, LabError> {
    capture_filtered(lab, ns, iface, file, &[])
}

/// Like [`capture`] with a pcap filter expression (e.g. `["not", "arp"]`).
///
/// tcpdump runs as `tcpdump -i IFACE -n -U --immediate-mode -Z root -w FILE [filter]`:
/// `-U` and `--immediate-mode` write every packet as it arrives, so nothing sent just before
/// [`Capture::finish`] is lost in a buffer; `-Z root` stops tcpdump from switching to its
/// own user, which could not write into root's directories. Its stderr goes to
/// `FILE.log`; the capture counts as started when tcpdump prints "listening on" there.
pub fn capture_filtered(
    lab: &mut Lab,
    ns: &Netns,
    iface: &str,
    file: &Path,
    filter: &[&str],
) -> Result<Capture, LabError> {
    cmd::require_tool("tcpdump", "tcpdump")?;
    let file_str = file.to_str().ok_or_else(|| {
        LabError::invalid("capture file", format!("{} is not UTF-8", file.display()))
    })?;
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .map_err(|e| LabError::io(format!("creating {}", parent.display()), e))?;
    }
    let mut log = OsString::from(file.as_os_str());
    log.push(".log");
    let log = PathBuf::from(log);
    // Fresh files: the readiness check must not see an earlier run's "listening on".
    for path in [file, log.as_path()] {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LabError::io(format!("removing old {}", path.display()), e)),
        }
    }

    let mut argv = vec![
        "tcpdump",
        "-i",
        iface,
        "-n",
        "-U",
        "--immediate-mode",
        "-Z",
        "root",
        "-w",
        file_str,
    ];
    argv.extend_from_slice(filter);
    let id = lab.spawn(ns, &argv, Some(&log))?;
    let capture = Capture {
        id,
        file: file.to_owned(),
        log,
    };

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let log_text = fs::read_to_string(&capture.log).unwrap_or_default();
        if log_text.contains("listening on") {
            return Ok(capture);
        }
        let exited = lab.try_wait(id)?;
        if exited.is_some() || Instant::now() >= deadline {
            let _ = lab.kill(id, Signal::SIGKILL);
            let status = match exited {
                Some(status) => format!("exited with {status}"),
                None => "still not listening".to_owned(),
            };
            return Err(LabError::NotReady {
                what: format!("tcpdump on {iface} in {}", ns.name),
                timeout: READY_TIMEOUT,
                detail: format!("{status}; log: {}", log_text.trim()),
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
}

impl Capture {
    /// The pcap file being written.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// tcpdump's log (its stderr).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The tcpdump process, e.g. for [`Lab::pid`].
    pub fn proc_id(&self) -> ProcId {
        self.id
    }

    /// Stops tcpdump (SIGTERM by PID, bounded wait, SIGKILL if needed) and returns one line
    /// per captured packet as printed by `tcpdump -n -nn -r FILE`.
    pub fn finish(self, lab: &mut Lab) -> Result<Vec<String>, LabError> {
        lab.kill(self.id, Signal::SIGTERM)?;
        read_pcap(&self.file)
    }
}

/// One summary line per packet of a pcap file (`tcpdump -n -nn -r FILE`).
pub fn read_pcap(file: &Path) -> Result<Vec<String>, LabError> {
    cmd::require_tool("tcpdump", "tcpdump")?;
    if !file.exists() {
        return Err(LabError::MissingFile(file.to_owned()));
    }
    let file_str = file.to_str().ok_or_else(|| {
        LabError::invalid("capture file", format!("{} is not UTF-8", file.display()))
    })?;
    let out = cmd::run_checked(
        &["tcpdump", "-n", "-nn", "-r", file_str],
        None,
        ADMIN_TIMEOUT,
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The lines of a cafe-LAN capture that are *not* the tunnel: leaks.
///
/// Allowed: UDP between `client` (any port, the LAN side of the NAT) and the exit node's
/// WireGuard endpoint `exit_ep` (`"198.51.100.2.41641"`, tcpdump's notation) in either
/// direction; the exit node's ICMP error about that UDP; traffic between the client and
/// the endpoints in `allowed` (the coordination server `"198.51.100.4.8080"`, its relay
/// and STUN `"198.51.100.4.3478"`), which the daemon keeps outside the tunnel on purpose;
/// ARP, IPv6 link-local control (`fe80::` to `ff02::`) and link-local multicast from
/// others (IGMP to 224.0.0.x). Anything else is a leak.
pub fn tunnel_leaks(
    lines: &[String],
    client: std::net::Ipv4Addr,
    exit_ep: &str,
    allowed: &[&str],
) -> Vec<String> {
    let client = client.to_string();
    let exit_ip = exit_ep.rsplit_once('.').map_or(exit_ep, |(ip, _)| ip);
    let client_side = |a: &str| a == client || a.starts_with(&format!("{client}."));
    lines
        .iter()
        .filter(|l| {
            if l.contains(" ARP,") {
                return false;
            }
            if let Some(rest) = l.split(" IP6 ").nth(1) {
                let link_local = rest.starts_with("fe80:") && rest.contains(" > ff02:");
                return !link_local;
            }
            let Some(rest) = l.split(" IP ").nth(1) else {
                return true; // not IP, not ARP: unexpected
            };
            let mut words = rest.split_whitespace();
            let (src, _, dst) = (words.next(), words.next(), words.next());
            let (src, dst) = (src.unwrap_or(""), dst.unwrap_or("").trim_end_matches(':'));
            let between =
                |ep: &str| (client_side(src) && dst == ep) || (src == ep && client_side(dst));
            let tunnel = rest.contains("UDP") && between(exit_ep);
            let icmp_about_tunnel = src == exit_ip
                && rest.contains("ICMP")
                && rest.contains(&format!(
                    "udp port {} unreachable",
                    exit_ep.rsplit('.').next().unwrap_or("")
                ));
            let control = allowed.iter().any(|c| between(c));
            let link_control = dst.starts_with("224.0.0.") && !client_side(src);
            !(tunnel || icmp_about_tunnel || control || link_control)
        })
        .cloned()
        .collect()
}
