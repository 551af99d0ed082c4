//! IP forwarding sysctls of the current network namespace.
//!
//! An exit node forwards packets between the tun and the physical network, which the
//! kernel only does with `net.ipv4.ip_forward` and `net.ipv6.conf.all.forwarding` on.
//! [`Forwarding::enable`] turns both on and remembers what they were, so that
//! [`Forwarding::restore`] can put the host back the way it was found.
//!
//! The files under `/proc/sys/net` are per network namespace: the kernel resolves them
//! against the namespace of the *thread* that opens them, so calling this from a thread
//! that `setns`-ed into a namespace affects that namespace only.
//!
//! Caveat worth knowing (and the reason restoring matters): with IPv6 forwarding on, the
//! kernel stops accepting router advertisements on interfaces whose `accept_ra` is 1,
//! so a host that gets its IPv6 default route from RAs loses it unless `accept_ra` is 2.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// `net.ipv4.ip_forward`: IPv4 forwarding on all interfaces.
pub const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// `net.ipv6.conf.all.forwarding`: IPv6 forwarding on all interfaces.
pub const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// A sysctl read or write that failed, naming the file and the kernel's reason.
#[derive(Debug, Error)]
pub enum SysctlError {
    #[error("reading sysctl {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {value:?} to sysctl {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
}

/// Where sysctl values are read and written: the seam that lets tests (or another
/// mechanism than procfs) stand in for `/proc/sys`.
pub trait SysctlBackend: Send + Sync {
    /// The current value, without the trailing newline.
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Sets the value.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
}

/// The real thing: files under `/proc/sys`, in the calling thread's network namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcSys;

impl SysctlBackend for ProcSys {
    fn read(&self, path: &Path) -> io::Result<String> {
        Ok(std::fs::read_to_string(path)?.trim().to_owned())
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        // One write(2) of the whole value: sysctl handlers parse per write call.
        std::fs::write(path, value.as_bytes())
    }
}

/// Reads one sysctl from `/proc/sys`.
pub fn read(path: &Path) -> Result<String, SysctlError> {
    ProcSys.read(path).map_err(|source| SysctlError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes one sysctl under `/proc/sys`.
pub fn write(path: &Path, value: &str) -> Result<(), SysctlError> {
    ProcSys
        .write(path, value)
        .map_err(|source| SysctlError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        })
}

/// Forwarding turned on by us, with the values found before, so they can be restored.
///
/// Dropping it without [`Forwarding::restore`] leaves forwarding on: an exit node that
/// goes away uncleanly keeps forwarding rather than flapping it under other users.
pub struct Forwarding {
    backend: Box<dyn SysctlBackend>,
    /// (file, value found before we wrote "1"), in the order they were changed.
    previous: Vec<(PathBuf, String)>,
}

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarding")
            .field("previous", &self.previous)
            .finish_non_exhaustive()
    }
}

impl Forwarding {
    /// Turns IPv4 and IPv6 forwarding on in the current network namespace.
    pub fn enable() -> Result<Self, SysctlError> {
        Self::enable_with(Box::new(ProcSys))
    }

    /// Same as [`Forwarding::enable`] with another backend.
    ///
    /// IPv6 forwarding is skipped (not an error) when the kernel has no IPv6
    /// (`ipv6.disable=1` removes the whole `/proc/sys/net/ipv6` tree): there is nothing
    /// to forward then. If a write fails, what was already changed is put back, so a
    /// failed call leaves the host as it was.
    pub fn enable_with(backend: Box<dyn SysctlBackend>) -> Result<Self, SysctlError> {
        let mut fwd = Forwarding {
            backend,
            previous: Vec::new(),
        };
        for (path, optional) in [(IPV4_FORWARD, false), (IPV6_FORWARD, true)] {
            let path = Path::new(path);
            if let Err(err) = fwd.set_remembering(path, "1", optional) {
                // Best effort: the original error is the one worth reporting.
                if let Err(undo) = fwd.restore_inner() {
                    tracing::warn!(error = %undo, "undoing partial forwarding change failed");
                }
                return Err(err);
            }
        }
        Ok(fwd)
    }

    fn set_remembering(
        &mut self,
        path: &Path,
        value: &str,
        optional: bool,
    ) -> Result<(), SysctlError> {
        let before = match self.backend.read(path) {
            Ok(v) => v,
            Err(e) if optional && e.kind() == io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "sysctl absent (IPv6 disabled?), skipping");
                return Ok(());
            }
            Err(source) => {
                return Err(SysctlError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        if before != value {
            self.backend
                .write(path, value)
                .map_err(|source| SysctlError::Write {
                    path: path.to_owned(),
                    value: value.to_owned(),
                    source,
                })?;
        }
        self.previous.push((path.to_owned(), before));
        Ok(())
    }

    /// The values found before [`Forwarding::enable`], as (file, value).
    pub fn previous(&self) -> &[(PathBuf, String)] {
        &self.previous
    }

    /// Puts back the values found before. Every file is attempted even if one fails;
    /// the first failure is returned.
    pub fn restore(mut self) -> Result<(), SysctlError> {
        self.restore_inner()
    }

    fn restore_inner(&mut self) -> Result<(), SysctlError> {
        let mut first_err = None;
        // Reverse order: IPv6 first, then IPv4. Writing ip_forward resets per-interface
        // IPv4 forwarding settings, so it goes last to leave the final word to it.
        while let Some((path, value)) = self.previous.pop() {
            let current = self.backend.read(&path).ok();
            if current.as_deref() == Some(value.as_str()) {
                continue;
            }
            if let Err(source) = self.backend.write(&path, &value) {
                first_err.get_or_insert(SysctlError::Write {
                    path,
                    value,
                    source,
                });
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// In-memory sysctls; `fail_write` makes writes to that file fail.
    #[derive(Clone, Default)]
    struct Fake {
        values: Arc<Mutex<HashMap<PathBuf, String>>>,
        fail_write: Option<PathBuf>,
    }

    impl Fake {
        fn get(&self, p: &str) -> Option<String> {
            self.values.lock().ok()?.get(Path::new(p)).cloned()
        }
        fn with(values: &[(&str, &str)]) -> Self {
            let f = Fake::default();
            if let Ok(mut m) = f.values.lock() {
                for (k, v) in values {
                    m.insert(PathBuf::from(k), (*v).to_owned());
                }
            }
            f
        }
    }

    impl SysctlBackend for Fake {
        fn read(&self, path: &Path) -> io::Result<String> {
            let m = self
                .values
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?;
            m.get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn write(&self, path: &Path, value: &str) -> io::Result<()> {
            if self.fail_write.as_deref() == Some(path) {
                return Err(io::Error::from_raw_os_error(libc::EACCES));
            }
            let mut m = self
                .values
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?;
            m.insert(path.to_owned(), value.to_owned());
            Ok(())
        }
    }

    #[test]
    fn enable_then_restore_puts_back_previous_values() {
        let fake = Fake::with(&[(IPV4_FORWARD, "0"), (IPV6_FORWARD, "0")]);
        let fwd = Forwarding::enable_with(Box::new(fake.clone())).unwrap();
        assert_eq!(fake.get(IPV4_FORWARD).as_deref(), Some("1"));
        assert_eq!(fake.get(IPV6_FORWARD).as_deref(), Some("1"));
        assert_eq!(fwd.previous().len(), 2);
        fwd.restore().unwrap();
        assert_eq!(fake.get(IPV4_FORWARD).as_deref(), Some("0"));
        assert_eq!(fake.get(IPV6_FORWARD).as_deref(), Some("0"));
    }

    #[test]
    fn already_on_stays_on_after_restore() {
        let fake = Fake::with(&[(IPV4_FORWARD, "1"), (IPV6_FORWARD, "0")]);
        let fwd = Forwarding::enable_with(Box::new(fake.clone())).unwrap();
        fwd.restore().unwrap();
        assert_eq!(fake.get(IPV4_FORWARD).as_deref(), Some("1"));
        assert_eq!(fake.get(IPV6_FORWARD).as_deref(), Some("0"));
    }

    #[test]
    fn missing_ipv6_is_skipped() {
        let fake = Fake::with(&[(IPV4_FORWARD, "0")]);
        let fwd = Forwarding::enable_with(Box::new(fake.clone())).unwrap();
        assert_eq!(fwd.previous().len(), 1);
        assert_eq!(fake.get(IPV4_FORWARD).as_deref(), Some("1"));
    }

    #[test]
    fn failed_write_rolls_back_and_names_the_file() {
        let mut fake = Fake::with(&[(IPV4_FORWARD, "0"), (IPV6_FORWARD, "0")]);
        fake.fail_write = Some(PathBuf::from(IPV6_FORWARD));
        let err = Forwarding::enable_with(Box::new(fake.clone())).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(IPV6_FORWARD), "{msg}");
        assert!(msg.contains("Permission denied"), "{msg}");
        assert_eq!(fake.get(IPV4_FORWARD).as_deref(), Some("0"));
    }
}
