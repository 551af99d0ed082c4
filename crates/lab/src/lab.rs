//! The [`Lab`]: owner of a test's namespaces and processes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

use crate::addr::{Cidr, ensure_lab_addr};
use crate::cmd::{self, ADMIN_TIMEOUT};
use crate::error::LabError;
use crate::netns::{NETNS_ETC_DIR, NETNS_RUN_DIR, Netns, package_for};
use crate::seed::{RESOLVER, Seed, SeedOptions};

/// Lock files proving that a lab prefix is in use (see [`Lab::new`]).
const LOCK_DIR: &str = "/run/tsunagu-lab";

/// Namespace names start with this, so a stray namespace is recognisably ours.
pub const NAME_PREFIX: &str = "tsl";

/// How long a SIGTERMed process gets before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// How long we wait for a SIGKILLed process to be reapable before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Distinguishes several labs of one process (tests run on parallel threads).
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Serialises `ip netns add` within this process: the first `ip netns add` on a machine
/// sets up the `/run/netns` mount point, and concurrent first calls can stack mounts.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Handle on a process started by [`Lab::spawn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProcId(u64);

/// A process started by [`Lab::spawn`].
struct Proc {
    child: Child,
    pid: u32,
    cmd: String,
    /// Set once reaped; from then on the PID may belong to someone else and is never
    /// signalled again.
    status: Option<ExitStatus>,
}

/// A set of network namespaces and processes belonging to one test.
///
/// Everything is torn down in [`Drop`], including while unwinding from a failed assertion:
/// processes get SIGTERM, then SIGKILL after a bounded wait (always by PID), then the
/// namespaces and their `/etc/netns/NAME` directories are deleted.
///
/// Names: every namespace is called `<prefix>-<role>`, where the prefix is
/// `tsl<6 hex digits of a hash of test_name>p<pid in hex>n<counter>`. The hash part lets a
/// later run of the same test find and remove leftovers from a run that crashed (SIGKILL,
/// abort, power loss) before its `Drop` could run; the PID and counter keep concurrent labs
/// apart, including labs of the same test in two processes.
///
/// Liveness: a lab holds an exclusive `flock` on `/run/tsunagu-lab/<prefix>.lock` for its
/// lifetime. The kernel drops that lock when the process dies, however it dies, so
/// "namespaces with our hash whose lock is free" is exactly "leftovers of a dead run",
/// without trusting PIDs that may have been reused.
pub struct Lab {
    test_name: String,
    prefix: String,
    namespaces: Vec<(String, Netns)>,
    procs: BTreeMap<ProcId, Proc>,
    next_proc: u64,
    dir: PathBuf,
    lock_path: PathBuf,
    lock: Option<Flock<File>>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("test_name", &self.test_name)
            .field("prefix", &self.prefix)
            .field(
                "namespaces",
                &self
                    .namespaces
                    .iter()
                    .map(|(_, ns)| &ns.name)
                    .collect::<Vec<_>>(),
            )
            .field("processes", &self.procs.len())
            .finish()
    }
}

impl Lab {
    /// Creates an empty lab for the test `test_name` (short, e.g. `"exit_basic"`), after
    /// removing leftovers of earlier crashed runs of the same test (namespaces, their
    /// processes, `/etc/netns` directories, scratch directories), whatever PID made them.
    /// Labs of the same test that are still alive, in this or another process, are left
    /// alone.
    pub fn new(test_name: &str) -> Result<Lab, LabError> {
        if test_name.is_empty() || test_name.len() > 64 || test_name.chars().any(char::is_control) {
            return Err(LabError::invalid(
                "test name",
                format!("{test_name:?}: must be 1-64 printable characters"),
            ));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(LabError::NotRoot { euid });
        }
        cmd::require_tool("ip", "iproute2")?;

        let tag = Self::tag(test_name);
        let seq = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{tag}p{:x}n{seq:x}", std::process::id());

        fs::create_dir_all(LOCK_DIR)
            .map_err(|e| LabError::io(format!("creating {LOCK_DIR}"), e))?;
        let lock_path = Path::new(LOCK_DIR).join(format!("{prefix}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LabError::io(format!("creating {}", lock_path.display()), e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| LabError::sys(format!("locking {}", lock_path.display()), e))?;

        let dir = scratch_root().join(&prefix);
        fs::create_dir_all(&dir)
            .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;

        let lab = Lab {
            test_name: test_name.to_owned(),
            prefix,
            namespaces: Vec::new(),
            procs: BTreeMap::new(),
            next_proc: 0,
            dir,
            lock_path,
            lock: Some(lock),
        };
        lab.remove_stale(&tag);
        tracing::debug!(prefix = %lab.prefix, test = test_name, "lab created");
        Ok(lab)
    }

    /// Builds the seed scenario (see [`crate::seed`]).
    pub fn seed(test_name: &str, opts: SeedOptions) -> Result<Seed, LabError> {
        crate::seed::build(test_name, opts)
    }

    /// The name part shared by every lab of `test_name`: `tsl` + 6 hex digits of an FNV-1a
    /// hash. Namespaces whose name starts with it and whose lab is dead are removed by
    /// [`Lab::new`].
    pub fn tag(test_name: &str) -> String {
        // FNV-1a: stable across Rust versions and platforms, unlike `DefaultHasher`.
        let mut hash: u32 = 0x811c_9dc5;
        for byte in test_name.bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        format!("{NAME_PREFIX}{:06x}", hash & 0x00ff_ffff)
    }

    /// This lab's prefix; every namespace it creates is named `<prefix>-<role>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The test name given to [`Lab::new`].
    pub fn test_name(&self) -> &str {
        &self.test_name
    }

    /// A scratch directory for logs and captures, `$TMPDIR/tsunagu-lab/<prefix>`. It is
    /// removed when the lab is dropped normally and kept (its path printed on stderr) when
    /// dropped during a panic, so a failing test's logs can be read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `self.dir()/file_name`: a convenient place for [`Lab::spawn`] logs.
    pub fn log_path(&self, file_name: &str) -> PathBuf {
        self.dir.join(file_name)
    }

    /// Creates the namespace `<prefix>-<role>` with loopback up, IPv6 duplicate address
    /// detection off (addresses usable at once) and an `/etc/netns/NAME/resolv.conf` naming
    /// the lab resolver [`RESOLVER`], so nothing run inside ever asks the host's resolver.
    ///
    /// `role`: 1-32 characters of `[A-Za-z0-9_-]`.
    pub fn add_ns(&mut self, role: &str) -> Result<Netns, LabError> {
        validate_role(role)?;
        if self.namespaces.iter().any(|(r, _)| r == role) {
            return Err(LabError::DuplicateRole(role.to_owned()));
        }
        let ns = Netns::new(format!("{}-{role}", self.prefix));

        let etc = ns.etc_dir();
        fs::create_dir_all(&etc)
            .map_err(|e| LabError::io(format!("creating {}", etc.display()), e))?;
        // Recorded before creation so that Drop removes whatever part of it exists.
        self.namespaces.push((role.to_owned(), ns.clone()));
        let resolv = etc.join("resolv.conf");
        fs::write(
            &resolv,
            format!("# tsunagu lab: DNS stays in the lab\nnameserver {RESOLVER}\noptions timeout:1 attempts:1\n"),
        )
        .map_err(|e| LabError::io(format!("writing {}", resolv.display()), e))?;

        {
            // A poisoned lock only means another thread panicked while holding it; the
            // mutex guards no data, so carrying on is safe.
            let _guard = NETNS_ADD.lock().unwrap_or_else(|p| p.into_inner());
            cmd::run_checked(
                &["ip", "netns", "add", ns.name.as_str()],
                None,
                ADMIN_TIMEOUT,
            )?;
        }
        // Before any interface exists, so that `default` applies to every later one
        // (including link-local addresses).
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        ns.set_up("lo")?;
        tracing::debug!(ns = %ns.name, "namespace created");
        Ok(ns)
    }

    /// The namespace created for `role`.
    ///
    /// # Panics
    /// If this lab has no such role: this is a test helper, and a typo in a role name is a
    /// bug in the test. Use [`Lab::try_ns`] to probe.
    pub fn ns(&self, role: &str) -> Netns {
        match self.try_ns(role) {
            Some(ns) => ns,
            None => panic!(
                "lab {} has no namespace with role {role:?} (roles: {:?})",
                self.prefix,
                self.roles()
            ),
        }
    }

    /// The namespace created for `role`, if any.
    pub fn try_ns(&self, role: &str) -> Option<Netns> {
        self.namespaces
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, ns)| ns.clone())
    }

    /// Roles in creation order.
    pub fn roles(&self) -> Vec<&str> {
        self.namespaces.iter().map(|(r, _)| r.as_str()).collect()
    }

    /// All namespaces in creation order.
    pub fn namespaces(&self) -> Vec<Netns> {
        self.namespaces.iter().map(|(_, ns)| ns.clone()).collect()
    }

    /// Whether `ns` was created by this lab. The lab only ever configures its own
    /// namespaces (lab rule: only namespaces you create).
    pub fn owns(&self, ns: &Netns) -> bool {
        self.namespaces.iter().any(|(_, n)| n == ns)
    }

    fn ensure_owned(&self, ns: &Netns) -> Result<(), LabError> {
        if self.owns(ns) {
            Ok(())
        } else {
            Err(LabError::invalid(
                "namespace",
                format!("{} does not belong to lab {}", ns.name, self.prefix),
            ))
        }
    }

    /// Connects two namespaces with a veth pair: `a.1` inside `a.0` and `b.1` inside `b.0`,
    /// each brought up with the addresses `a.2` / `b.2` (`"198.51.100.2/24"`,
    /// `"2001:db8:1::2/64"`; may be empty).
    ///
    /// The pair is created directly inside the two namespaces (`ip -n A link add ... peer
    /// ... netns B`), so nothing ever appears in the host namespace and interface names
    /// need only be unique per namespace.
    pub fn link(
        &mut self,
        a: (&Netns, &str, &[&str]),
        b: (&Netns, &str, &[&str]),
    ) -> Result<(), LabError> {
        for (ns, ifname, addrs) in [a, b] {
            self.ensure_owned(ns)?;
            validate_ifname(ifname)?;
            for addr in addrs {
                let cidr: Cidr = addr.parse()?;
                ensure_lab_addr(cidr.addr, "address")?;
            }
        }
        let (a_ns, a_if, a_addrs) = a;
        let (b_ns, b_if, b_addrs) = b;
        if a_ns == b_ns && a_if == b_if {
            return Err(LabError::invalid(
                "interface name",
                format!("both ends are {a_if} in {}", a_ns.name),
            ));
        }
        let mut args = vec![
            "link", "add", "name", a_if, "type", "veth", "peer", "name", b_if,
        ];
        if a_ns != b_ns {
            args.extend_from_slice(&["netns", b_ns.name.as_str()]);
        }
        a_ns.ip(&args)?;
        for (ns, ifname, addrs) in [(a_ns, a_if, a_addrs), (b_ns, b_if, b_addrs)] {
            for addr in addrs {
                ns.add_addr(ifname, addr)?;
            }
            ns.set_up(ifname)?;
        }
        Ok(())
    }

    /// Starts `argv` inside `ns` (via `ip netns exec`, which `exec`s it: the PID is the
    /// program's own) with stdin from /dev/null and stdout+stderr appended to `log` (or
    /// discarded). The process leads its own process group so that its children can be
    /// swept with it; it is killed when the lab is dropped.
    pub fn spawn(
        &mut self,
        ns: &Netns,
        argv: &[&str],
        log: Option<&Path>,
    ) -> Result<ProcId, LabError> {
        self.ensure_owned(ns)?;
        let full = ns.exec_argv(argv)?;
        let cmd_line = cmd::display_argv(&full);
        let (stdout, stderr) = match log {
            Some(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| LabError::io(format!("opening log {}", path.display()), e))?;
                let copy = file
                    .try_clone()
                    .map_err(|e| LabError::io(format!("duplicating log {}", path.display()), e))?;
                (Stdio::from(file), Stdio::from(copy))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let (program, args) = full
            .split_first()
            .ok_or_else(|| LabError::invalid("command", "empty argv"))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|source| LabError::Spawn {
                cmd: cmd_line.clone(),
                source,
            })?;
        let id = ProcId(self.next_proc);
        self.next_proc += 1;
        let pid = child.id();
        tracing::debug!(pid, cmd = %cmd_line, "spawned");
        self.procs.insert(
            id,
            Proc {
                child,
                pid,
                cmd: cmd_line,
                status: None,
            },
        );
        Ok(id)
    }

    /// The PID of a spawned process (still reported after it exited).
    ///
    /// # Panics
    /// If `id` was not returned by this lab's [`Lab::spawn`] (a bug in the test).
    pub fn pid(&self, id: ProcId) -> u32 {
        match self.procs.get(&id) {
            Some(p) => p.pid,
            None => panic!("lab {} never spawned {id:?}", self.prefix),
        }
    }

    /// The command line a process was started with.
    pub fn command(&self, id: ProcId) -> Option<&str> {
        self.procs.get(&id).map(|p| p.cmd.as_str())
    }

    /// Sends `sig` to the process, by PID.
    ///
    /// For SIGTERM and SIGKILL it also waits for the process to exit (SIGTERM escalates to
    /// SIGKILL after a bounded grace period), SIGKILLs whatever else is left in its process
    /// group, and reaps it. Those two are no-ops on a process that already exited; other
    /// signals to an exited process are [`LabError::ProcessExited`].
    pub fn kill(&mut self, id: ProcId, sig: Signal) -> Result<(), LabError> {
        let proc = self
            .procs
            .get_mut(&id)
            .ok_or(LabError::UnknownProcess(id))?;
        let terminal = matches!(sig, Signal::SIGTERM | Signal::SIGKILL);
        if proc.status.is_none() && has_exited(proc.pid)? {
            reap(proc)?;
        }
        if let Some(status) = proc.status {
            return if terminal {
                Ok(())
            } else {
                Err(LabError::ProcessExited {
                    id,
                    pid: proc.pid,
                    status,
                })
            };
        }
        // Not reaped, so the PID is still ours even if the process is a zombie.
        let pid = Pid::from_raw(proc_pid(proc)?);
        signal::kill(pid, sig)
            .map_err(|e| LabError::sys(format!("sending {sig} to pid {}", proc.pid), e))?;
        if !terminal {
            return Ok(());
        }
        let mut exited = wait_exit(
            proc.pid,
            if sig == Signal::SIGTERM {
                TERM_GRACE
            } else {
                KILL_WAIT
            },
        )?;
        if !exited && sig == Signal::SIGTERM {
            tracing::debug!(pid = proc.pid, "no exit after SIGTERM, sending SIGKILL");
            let _ = signal::kill(pid, Signal::SIGKILL);
            exited = wait_exit(proc.pid, KILL_WAIT)?;
        }
        if !exited {
            return Err(LabError::ProcessStuck {
                id,
                pid: proc.pid,
                waited: KILL_WAIT,
            });
        }
        reap(proc)
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self, id: ProcId) -> Result<Option<ExitStatus>, LabError> {
        let proc = self
            .procs
            .get_mut(&id)
            .ok_or(LabError::UnknownProcess(id))?;
        if proc.status.is_none() && has_exited(proc.pid)? {
            reap(proc)?;
        }
        Ok(proc.status)
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it still runs.
    pub fn wait_timeout(
        &mut self,
        id: ProcId,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait(id)? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes the leftovers of dead labs of the same test (see [`Lab`] on liveness).
    /// Failures are logged, not returned: a leftover we cannot remove does not stop this
    /// lab from working, since its names differ.
    fn remove_stale(&self, tag: &str) {
        let mut prefixes = BTreeSet::new();
        let scratch = scratch_root();
        for dir in [
            Path::new(NETNS_RUN_DIR),
            Path::new(NETNS_ETC_DIR),
            Path::new(LOCK_DIR),
            &scratch,
        ] {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(prefix) = stale_candidate(&name, tag)
                    && prefix != self.prefix
                {
                    prefixes.insert(prefix.to_owned());
                }
            }
        }
        for prefix in prefixes {
            let lock_path = Path::new(LOCK_DIR).join(format!("{prefix}.lock"));
            // Hold the dead lab's lock while cleaning, so two labs starting at once do not
            // both clean (harmless, but noisy), and a live lab is never touched.
            let _held = match File::open(&lock_path) {
                Ok(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                    Ok(lock) => Some(lock),
                    Err((_, Errno::EWOULDBLOCK)) => continue, // alive
                    Err((_, e)) => {
                        tracing::warn!(path = %lock_path.display(), error = %e, "cannot test lab lock");
                        continue;
                    }
                },
                Err(_) => None, // no lock file: its owner is long gone
            };
            tracing::info!(%prefix, test = %self.test_name, "removing leftovers of a crashed lab");
            let ns_prefix = format!("{prefix}-");
            if let Ok(entries) = fs::read_dir(NETNS_RUN_DIR) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&ns_prefix) {
                        delete_namespace(&Netns::new(name));
                    }
                }
            }
            if let Ok(entries) = fs::read_dir(NETNS_ETC_DIR) {
                for entry in entries.flatten() {
                    if entry.file_name().to_string_lossy().starts_with(&ns_prefix) {
                        remove_dir_logged(&entry.path());
                    }
                }
            }
            remove_dir_logged(&scratch.join(&prefix));
            if let Err(e) = fs::remove_file(&lock_path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %lock_path.display(), error = %e, "cannot remove stale lock");
            }
        }
    }

    /// Terminates all tracked processes: SIGTERM to each process group, a shared bounded
    /// wait, SIGKILL for the rest, then reaping.
    fn stop_all_processes(&mut self) {
        let mut running = Vec::new();
        for proc in self.procs.values_mut() {
            if proc.status.is_some() {
                continue;
            }
            let Ok(raw) = proc_pid(proc) else { continue };
            // Unreaped, so the group id (== its PID) cannot have been reused.
            let pgid = Pid::from_raw(raw);
            if signal::killpg(pgid, Signal::SIGTERM).is_err() {
                let _ = signal::kill(pgid, Signal::SIGTERM);
            }
            running.push(proc.pid);
        }
        let deadline = Instant::now() + TERM_GRACE;
        while !running.is_empty() && Instant::now() < deadline {
            running.retain(|&pid| !has_exited(pid).unwrap_or(true));
            if !running.is_empty() {
                thread::sleep(Duration::from_millis(10));
            }
        }
        for proc in self.procs.values_mut() {
            if proc.status.is_some() {
                continue;
            }
            let Ok(raw) = proc_pid(proc) else { continue };
            if !has_exited(proc.pid).unwrap_or(true) {
                tracing::debug!(pid = proc.pid, cmd = %proc.cmd, "no exit after SIGTERM, sending SIGKILL");
                let _ = signal::kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
            match wait_exit(proc.pid, KILL_WAIT) {
                Ok(true) => {
                    if let Err(e) = reap(proc) {
                        tracing::warn!(pid = proc.pid, error = %e, "cannot reap");
                    }
                }
                _ => {
                    tracing::warn!(pid = proc.pid, cmd = %proc.cmd, "process did not exit after SIGKILL")
                }
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_all_processes();
        for (_, ns) in self.namespaces.iter().rev() {
            delete_namespace(ns);
            remove_dir_logged(&ns.etc_dir());
        }
        if thread::panicking() {
            eprintln!(
                "tsunagu-lab: test {:?} panicked; logs kept in {}",
                self.test_name,
                self.dir.display()
            );
        } else {
            remove_dir_logged(&self.dir);
        }
        // Remove the lock file while still holding the lock, then release it.
        if let Err(e) = fs::remove_file(&self.lock_path) {
            tracing::warn!(path = %self.lock_path.display(), error = %e, "cannot remove lock file");
        }
        self.lock.take();
    }
}

/// Kills (SIGKILL, by PID) whatever still runs in `ns`, then deletes it. Errors are logged:
/// this runs in Drop and in stale cleanup, where there is nobody to return them to.
fn delete_namespace(ns: &Netns) {
    if !ns.path().exists() {
        return;
    }
    match ns.pids() {
        Ok(pids) => {
            let me = std::process::id();
            for pid in pids.into_iter().filter(|&p| p != me) {
                if let Ok(raw) = i32::try_from(pid) {
                    tracing::debug!(pid, ns = %ns.name, "killing leftover process");
                    let _ = signal::kill(Pid::from_raw(raw), Signal::SIGKILL);
                }
            }
        }
        Err(e) => tracing::warn!(ns = %ns.name, error = %e, "cannot list processes"),
    }
    if let Err(e) = cmd::run_checked(
        &["ip", "netns", "delete", ns.name.as_str()],
        None,
        ADMIN_TIMEOUT,
    ) {
        tracing::warn!(ns = %ns.name, error = %e, "cannot delete namespace");
    }
}

fn remove_dir_logged(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove directory");
    }
}

/// Root of the per-lab scratch directories.
fn scratch_root() -> PathBuf {
    std::env::temp_dir().join("tsunagu-lab")
}

/// If `entry` (a namespace, `/etc/netns` dir, lock file or scratch dir name) belongs to a
/// lab of the test with `tag`, its lab prefix.
fn stale_candidate<'a>(entry: &'a str, tag: &str) -> Option<&'a str> {
    let rest = entry.strip_prefix(tag)?;
    if !rest.starts_with('p') {
        return None;
    }
    let end = rest.find(['-', '.']).unwrap_or(rest.len());
    let prefix = &entry[..tag.len() + end];
    // p<hex>n<hex>
    let (pid, seq) = prefix[tag.len() + 1..].split_once('n')?;
    let hex = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit());
    (hex(pid) && hex(seq)).then_some(prefix)
}

/// The PID as the signed type the syscalls take.
fn proc_pid(proc: &Proc) -> Result<i32, LabError> {
    i32::try_from(proc.pid).map_err(|_| LabError::invalid("pid", proc.pid.to_string()))
}

/// Whether the child `pid` has exited, without reaping it (`waitid(WNOWAIT)`): while
/// unreaped its PID and process-group id stay reserved, so sweeping its group afterwards
/// cannot hit an unrelated process.
fn has_exited(pid: u32) -> Result<bool, LabError> {
    let raw = i32::try_from(pid).map_err(|_| LabError::invalid("pid", pid.to_string()))?;
    match waitid(
        Id::Pid(Pid::from_raw(raw)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    ) {
        Ok(WaitStatus::StillAlive) => Ok(false),
        Ok(_) => Ok(true),
        // Already reaped (not by us: we track that), so certainly gone.
        Err(Errno::ECHILD) => Ok(true),
        Err(e) => Err(LabError::sys(format!("waitid for pid {pid}"), e)),
    }
}

/// Polls [`has_exited`] for up to `timeout`.
fn wait_exit(pid: u32, timeout: Duration) -> Result<bool, LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        if has_exited(pid)? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Reaps an exited process after SIGKILLing anything left in its process group.
fn reap(proc: &mut Proc) -> Result<(), LabError> {
    let raw = proc_pid(proc)?;
    // The leader is a zombie, so the group id is still reserved; ESRCH means the group is
    // already empty.
    let _ = signal::killpg(Pid::from_raw(raw), Signal::SIGKILL);
    let status = proc
        .child
        .wait()
        .map_err(|e| LabError::io(format!("reaping pid {} ({})", proc.pid, proc.cmd), e))?;
    tracing::debug!(pid = proc.pid, %status, "reaped");
    proc.status = Some(status);
    Ok(())
}

/// Checks a role name.
fn validate_role(role: &str) -> Result<(), LabError> {
    let ok = !role.is_empty()
        && role.len() <= 32
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(LabError::invalid(
            "role",
            format!("{role:?}: use 1-32 characters of [A-Za-z0-9_-]"),
        ))
    }
}

/// Checks an interface name against the kernel's rules (at most 15 bytes, no `/`, `:` or
/// whitespace, not `.`/`..`), so the error names the culprit instead of `ip`'s generic one.
pub(crate) fn validate_ifname(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
    if ok {
        Ok(())
    } else {
        Err(LabError::invalid(
            "interface name",
            format!("{name:?}: 1-15 printable ASCII characters without '/' or ':'"),
        ))
    }
}

/// Fails with [`LabError::MissingTool`] unless `tool` is installed (package guessed from the
/// tool name).
pub fn require(tool: &str) -> Result<(), LabError> {
    cmd::require_tool(tool, package_for(tool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_is_stable_and_short() {
        let tag = Lab::tag("exit_basic");
        assert_eq!(tag, Lab::tag("exit_basic"));
        assert_ne!(tag, Lab::tag("exit_basic2"));
        assert_eq!(tag.len(), 9);
        assert!(tag.starts_with("tsl"));
    }

    #[test]
    fn recognises_stale_names() {
        let tag = Lab::tag("t");
        let ns = format!("{tag}p1a2bn0-client");
        assert_eq!(stale_candidate(&ns, &tag), Some(&ns[..tag.len() + 7]));
        let lock = format!("{tag}p1a2bn3.lock");
        assert_eq!(
            stale_candidate(&lock, &tag).map(str::len),
            Some(tag.len() + 7)
        );
        let dir = format!("{tag}p1n1");
        assert_eq!(stale_candidate(&dir, &tag), Some(dir.as_str()));
        assert_eq!(stale_candidate(&format!("{tag}x-client"), &tag), None);
        assert_eq!(stale_candidate(&format!("{tag}pzzn0-client"), &tag), None);
        assert_eq!(
            stale_candidate("tslffffffp1n0-x", &tag).is_some(),
            tag == "tslffffff"
        );
    }

    #[test]
    fn validates_names() {
        assert!(validate_role("client").is_ok());
        assert!(validate_role("exit-2_b").is_ok());
        assert!(validate_role("").is_err());
        assert!(validate_role("a b").is_err());
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("p-control").is_ok());
        assert!(validate_ifname("sixteen_chars_xx").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("..").is_err());
    }
}
