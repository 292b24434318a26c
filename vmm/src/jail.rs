//! The jail (`--jail DIR`): the VMM runs in mount, PID, network, IPC and UTS namespaces of its
//! own, whose file system holds only what its topology needs, with no capability it no longer
//! needs and `no_new_privs` set.
//!
//! The order of the steps, and why (docs/ARCHITECTURE.md, "Jail", says the same for users):
//!
//! 1. Still in the host's namespaces, with every privilege: the topology's host paths are
//!    collected ([`Needs`]); the files the VMM would create (a backing file, a `file:` disk,
//!    the control socket's directory, `--json` and `--svg` outputs) are created, since the jail
//!    can only show what exists; TAP interfaces are opened, because a TAP lives in the network
//!    namespace it was opened in and the jail has a network namespace of its own.
//! 2. `unshare(CLONE_NEWPID)` and `fork`: the child is process 1 of a new PID namespace. The
//!    parent stays in the host's namespaces, forwards SIGINT and SIGTERM to the child, waits
//!    for it and exits with its status.
//! 3. The child leaves the terminal's session (`setsid`, so a Ctrl-C reaches it once, through
//!    the parent), asks to be killed if the parent dies, and unshares mount, network, IPC and
//!    UTS namespaces. Every mount is made private, so nothing it mounts reaches the host.
//! 4. A tmpfs is mounted on DIR; each needed path is bind-mounted onto a mount point at the
//!    same absolute path inside it (read-only where the VMM only reads; `nosuid`, `noexec`,
//!    and `nodev` except on device nodes), and a fresh `proc` of the new PID namespace is
//!    mounted on `/proc`, its `sys`, `sysrq-trigger`, `irq`, `bus` and `fs` made read-only.
//! 5. `pivot_root` into DIR, the old root detached, the jail's own tmpfs remounted read-only,
//!    and the working directory restored (relative paths of the topology resolve as before).
//! 6. Every capability not needed is dropped from the bounding set and the ambient set (while
//!    CAP_SETPCAP, which that takes, is still effective); `--jail-gid` and `--jail-uid` are
//!    taken (the permitted set kept across the change of user); the effective and permitted
//!    sets become the needed ones and the inheritable set empty; then `no_new_privs`. Only a
//!    topology with VFIO devices needs any: `CAP_IPC_LOCK` (the memory VFIO pins is not held
//!    to `RLIMIT_MEMLOCK`) and `CAP_SYSLOG` (the IOMMU fault watch reads `/dev/kmsg`).
//! 7. Each needed path is checked to be usable as the VMM will use it, with the credentials
//!    it now has, so a file the jail's user cannot write is named at once.
//!
//! The seccomp filters go on after this (the caller's part): building the jail takes calls
//! no filter allows.
//!
//! What never enters the jail: the host's other files and devices, its processes, its network
//! interfaces (a TAP is a descriptor opened before), and programs to execute (restart hooks
//! are refused with `--jail`; the image `ctl update` names must be a path inside the jail).

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::config::{Config, DeviceSection, WireSection};

/// `CAP_IPC_LOCK`: lock memory beyond `RLIMIT_MEMLOCK` (VFIO pins a domain's memory).
pub const CAP_IPC_LOCK: u32 = 14;
/// `CAP_SYSLOG`: read `/dev/kmsg` where `kernel.dmesg_restrict` is set.
pub const CAP_SYSLOG: u32 = 34;

/// How the jail is built (`--jail DIR`, `--jail-uid`, `--jail-gid`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailOptions {
    /// An empty directory the jail's root is built in (a tmpfs is mounted on it in the jail's
    /// own mount namespace: the host never sees anything in it).
    pub dir: PathBuf,
    /// The user the VMM runs as inside the jail (default: the user it was started as).
    pub uid: Option<u32>,
    /// The group the VMM runs as inside the jail (default: the group it was started as).
    pub gid: Option<u32>,
}

/// Why the jail could not be built. Each names the path or the step, and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jail directory is unusable.
    #[error("--jail {}: {what}", dir.display())]
    Dir {
        /// The directory as given.
        dir: PathBuf,
        /// What is wrong and what was expected.
        what: String,
    },
    /// A path the topology needs is unusable.
    #[error("--jail: {} ({why}): {what}", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// What it is for.
        why: String,
        /// What is wrong and what was expected.
        what: String,
    },
    /// Something the jail cannot offer.
    #[error("--jail: {0}")]
    Refused(String),
    /// A step of building the jail failed.
    #[error("--jail: {step}: {source}")]
    Step {
        /// The step.
        step: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where a call to [`enter`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jailed {
    /// In the jail: go on running the VMM.
    Inside,
    /// In the host's namespaces, after the jailed VMM ended with this exit status (128 + the
    /// signal's number if a signal ended it): exit with it.
    Exited(u8),
}

/// What a needed path must allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Read only: bound read-only.
    Read,
    /// Read and write: bound read-write.
    Write,
}

/// What to do when a needed path does not exist yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Missing {
    /// It must exist.
    Refuse,
    /// Create an empty regular file, as the VMM itself would.
    File,
    /// Create the directory (mode 0700, and its parents), as the control socket does.
    Dir,
}

/// One host path the jailed VMM needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Need {
    /// Absolute, as the VMM will open it (not canonical: symbolic links are followed by the
    /// bind mount, and the path keeps working inside the jail as it is written).
    path: PathBuf,
    access: Access,
    missing: Missing,
    /// What it is for, for error messages.
    why: String,
}

/// A symbolic link the jail recreates (sysfs's `bus/pci/devices/ADDRESS`, which VFIO reads).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Link {
    path: PathBuf,
    target: PathBuf,
}

/// Everything the jailed VMM needs from the host: paths, TAP interfaces, capabilities.
#[derive(Clone, Debug, Default)]
pub struct Needs {
    needs: Vec<Need>,
    links: Vec<Link>,
    /// TAP interfaces opened before the network namespace is left.
    taps: Vec<(String, String)>,
    /// Capabilities kept.
    keep: Vec<u32>,
}

impl Needs {
    /// The needs of any VMM: the KVM device node at `kvm`.
    pub fn new(kvm: &Path) -> Needs {
        let mut n = Needs::default();
        n.push(
            kvm,
            Access::Write,
            Missing::Refuse,
            "the KVM device (--kvm)",
        );
        n
    }

    fn push(&mut self, path: &Path, access: Access, missing: Missing, why: &str) {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        match self.needs.iter_mut().find(|n| n.path == path) {
            // The widest of two needs of one path wins.
            Some(n) => {
                if access == Access::Write {
                    n.access = Access::Write;
                }
                if n.missing == Missing::Refuse {
                    n.missing = missing;
                }
            }
            None => self.needs.push(Need {
                path,
                access,
                missing,
                why: why.to_string(),
            }),
        }
    }

    /// An output file the VMM writes at the end (`--json`, `--svg`): created empty now.
    pub fn output(&mut self, path: &Path, why: &str) {
        self.push(path, Access::Write, Missing::File, why);
    }

    /// A disk's backing file: read and written, created empty if missing (the VMM sizes it).
    pub fn disk(&mut self, path: &Path, why: &str) {
        self.push(path, Access::Write, Missing::File, why);
    }

    /// The directory of the control socket at `socket` (created 0700 if missing, as the
    /// control socket does): the socket is made and renamed in it.
    pub fn socket_dir(&mut self, socket: &Path) {
        let dir = match socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        self.push(
            &dir,
            Access::Write,
            Missing::Dir,
            "the control socket's directory (--control)",
        );
    }

    /// The needs of the topology `config` (read from `file`, against which its relative paths
    /// resolve): images, kernels, initramfs, backing files, wire sockets' directories, TAP
    /// interfaces, and VFIO devices (their container, group node, sysfs directories and the
    /// kernel log, and the capabilities pinning memory and reading that log). Restart hooks
    /// need nothing here: the hook launcher runs them outside the jail.
    pub fn topology(&mut self, config: &Config, file: &Path) -> Result<(), JailError> {
        use crate::config::resolve;
        for d in &config.domains {
            if let Some(p) = d.image_path(file) {
                self.push(
                    &p,
                    Access::Read,
                    Missing::Refuse,
                    &format!("the image of domain {}", d.name),
                );
            }
            match &d.device {
                None => {}
                Some(DeviceSection::EmulatedNvme { backing, .. }) => {
                    self.disk(
                        &resolve(file, backing),
                        &format!("the backing file of domain {}", d.name),
                    );
                }
                Some(DeviceSection::EmulatedE1000 { wire, .. }) => match wire {
                    WireSection::Pair { .. } => {}
                    WireSection::Stream { path, .. } => {
                        self.socket_parent(&resolve(file, path), &d.name);
                    }
                    WireSection::Dgram { path, peer } => {
                        self.socket_parent(&resolve(file, path), &d.name);
                        if let Some(p) = peer {
                            self.socket_parent(&resolve(file, p), &d.name);
                        }
                    }
                    WireSection::Tap { name } => self.taps.push((d.name.clone(), name.clone())),
                },
                Some(DeviceSection::Vfio { address, .. }) => {
                    self.vfio(Path::new(crate::host::DEFAULT_SYSFS), &d.name, address)?;
                }
            }
        }
        for c in &config.clients {
            if let Some(p) = c.image_path(file) {
                self.push(
                    &p,
                    Access::Read,
                    Missing::Refuse,
                    &format!("the image of client {}", c.name),
                );
            }
            if let Some(p) = c.disk_file(file) {
                self.disk(&p, &format!("the disk file of client {}", c.name));
            }
            if let Some(boot) = c.linux_boot(file) {
                self.push(
                    &boot.kernel,
                    Access::Read,
                    Missing::Refuse,
                    &format!("the kernel of client {}", c.name),
                );
                if let Some(initrd) = &boot.initrd {
                    self.push(
                        initrd,
                        Access::Read,
                        Missing::Refuse,
                        &format!("the initramfs of client {}", c.name),
                    );
                }
            }
        }
        Ok(())
    }

    /// The directory of a wire's Unix socket: the socket is bound (or found) in it.
    fn socket_parent(&mut self, socket: &Path, domain: &str) {
        if let Some(dir) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.push(
                dir,
                Access::Write,
                Missing::Refuse,
                &format!("the directory of a wire socket of domain {domain}"),
            );
        }
    }

    /// A VFIO device at `address`: the container, its group's node, what sysfs says about it
    /// and its group's members (read while it is opened and when it is released), the kernel
    /// log, and the capabilities VFIO needs after the jail is built.
    fn vfio(&mut self, sysfs: &Path, domain: &str, address: &str) -> Result<(), JailError> {
        let why = format!("the VFIO device of domain {domain}");
        let address = crate::host::parse_address(address).map_err(|e| JailError::Path {
            path: PathBuf::from(address),
            why: why.clone(),
            what: e.to_string(),
        })?;
        let link = sysfs.join("bus/pci/devices").join(&address);
        let path_err = |path: &Path, what: String| JailError::Path {
            path: path.to_path_buf(),
            why: why.clone(),
            what,
        };
        let target = std::fs::read_link(&link).map_err(|e| {
            path_err(
                &link,
                format!("{e}; expected the sysfs link of a PCI device (is the address right?)"),
            )
        })?;
        let device = std::fs::canonicalize(&link)
            .map_err(|e| path_err(&link, format!("{e}; expected a PCI device's directory")))?;
        let group = std::fs::read_link(device.join("iommu_group"))
            .ok()
            .and_then(|g| g.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| {
                path_err(
                    &device.join("iommu_group"),
                    "no IOMMU group; expected a device the IOMMU isolates (`ddvm check` says what is missing)".into(),
                )
            })?;
        let group_dir = sysfs.join("kernel/iommu_groups").join(&group);
        self.links.push(Link { path: link, target });
        self.push(&device, Access::Read, Missing::Refuse, &why);
        self.push(&group_dir, Access::Read, Missing::Refuse, &why);
        // The group's members are read for its viability, each through its own directory.
        let members = std::fs::read_dir(group_dir.join("devices"))
            .map_err(|e| path_err(&group_dir.join("devices"), e.to_string()))?;
        for m in members.flatten() {
            if let Ok(dir) = std::fs::canonicalize(m.path()) {
                self.push(&dir, Access::Read, Missing::Refuse, &why);
            }
        }
        self.push(
            Path::new("/dev/vfio/vfio"),
            Access::Write,
            Missing::Refuse,
            "the VFIO container",
        );
        self.push(
            &Path::new("/dev/vfio").join(&group),
            Access::Write,
            Missing::Refuse,
            &format!("the IOMMU group of the VFIO device of domain {domain}"),
        );
        self.push(
            Path::new("/dev/kmsg"),
            Access::Read,
            Missing::Refuse,
            "the kernel log, where IOMMU faults are reported",
        );
        for cap in [CAP_IPC_LOCK, CAP_SYSLOG] {
            if !self.keep.contains(&cap) {
                self.keep.push(cap);
            }
        }
        Ok(())
    }

    /// The capabilities the jailed VMM keeps (by number).
    pub fn kept_capabilities(&self) -> &[u32] {
        &self.keep
    }

    /// The paths bind-mounted into the jail, in the order they are mounted.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.needs.iter().map(|n| normalize(&n.path)).collect();
        v.sort_by_key(|p| p.components().count());
        v
    }
}

/// `path` without `.` and `..` components, taken lexically (as the jail lays the path out).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Every directory a walk of `path` passes through (its `..` components included), laid out
/// lexically: what must exist in the jail for the kernel to resolve `path` as written.
fn walked_dirs(path: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut cur = PathBuf::from("/");
    let comps: Vec<Component<'_>> = path.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        match c {
            Component::Normal(n) => {
                cur.push(n);
                dirs.push(cur.clone());
            }
            Component::ParentDir => {
                cur.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    dirs
}

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Path {
        path: path.to_path_buf(),
        why: "a path".into(),
        what: "contains a NUL byte".into(),
    })
}

fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = what.into();
    move |source| JailError::Step { step, source }
}

/// `Err(last OS error)` if `r` is negative.
fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2).
fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let what = format!(
        "mount {} on {}",
        source.map_or_else(
            || fstype.unwrap_or("(none)").to_string(),
            |s| s.display().to_string()
        ),
        target.display()
    );
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|f| CString::new(f).expect("no NUL in a file system type"));
    let data = data.map(|d| CString::new(d).expect("no NUL in mount options"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call; the
    // kernel copies what it needs.
    let r = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(r).map_err(step(what))
}

/// Bind-mounts `source` on `target`, then sets the bind's own flags (a bind ignores them
/// until it is remounted).
fn bind(source: &Path, target: &Path, flags: libc::c_ulong) -> Result<(), JailError> {
    mount(Some(source), target, None, libc::MS_BIND, None)?;
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
}

/// Creates what a bind of `source` mounts on, at `target`: a directory for a directory, an
/// empty file for anything else.
fn mount_point(target: &Path, is_dir: bool) -> Result<(), JailError> {
    if target.symlink_metadata().is_ok() {
        return Ok(());
    }
    if is_dir {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(target)
            .map_err(step(format!("mkdir {}", target.display())))
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .map(drop)
            .map_err(step(format!("create {}", target.display())))
    }
}

/// `mkdir -p` inside the jail (mode 0755).
fn mkdirs(path: &Path) -> Result<(), JailError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(step(format!("mkdir {}", path.display())))
}

/// Checks the jail directory: it exists, is a directory, is empty and is not `/`. Returns it
/// canonical.
fn check_dir(dir: &Path) -> Result<PathBuf, JailError> {
    let err = |what: String| JailError::Dir {
        dir: dir.to_path_buf(),
        what,
    };
    let meta = std::fs::metadata(dir).map_err(|e| {
        err(format!(
            "{e}; expected an existing empty directory to build the jail's root in"
        ))
    })?;
    if !meta.is_dir() {
        return Err(err(
            "not a directory; expected an existing empty directory to build the jail's root in"
                .into(),
        ));
    }
    let canonical = std::fs::canonicalize(dir).map_err(|e| err(e.to_string()))?;
    if canonical == Path::new("/") {
        return Err(err(
            "is the root directory; expected an empty directory of its own".into(),
        ));
    }
    let mut entries = std::fs::read_dir(&canonical).map_err(|e| err(e.to_string()))?;
    if entries.next().is_some() {
        return Err(err(
            "not empty; expected an empty directory (the jail's root is built in it, in a file system only the jail sees)".into(),
        ));
    }
    Ok(canonical)
}

/// Step 1: creates what is missing and checks that the rest exists. Returns, per need,
/// whether it is a directory and whether it is a device node.
fn prepare(needs: &[Need], dir: &Path) -> Result<Vec<(bool, bool)>, JailError> {
    let mut kinds = Vec::new();
    for n in needs {
        let err = |what: String| JailError::Path {
            path: n.path.clone(),
            why: n.why.clone(),
            what,
        };
        let canonical = std::fs::canonicalize(&n.path).unwrap_or_else(|_| normalize(&n.path));
        if canonical.starts_with(dir) || normalize(&n.path).starts_with(dir) {
            return Err(err(format!(
                "inside the jail directory {}; expected the jail directory apart from what it holds",
                dir.display()
            )));
        }
        match std::fs::metadata(&n.path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match n.missing {
                Missing::Refuse => return Err(err(format!("{e}; expected it to exist"))),
                // The mode the VMM would have given it (0666 less the umask).
                Missing::File => {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&n.path)
                        .map_err(|e| err(format!("{e}; expected to be able to create it")))?;
                }
                Missing::Dir => {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(&n.path)
                        .map_err(|e| err(format!("{e}; expected to be able to create it")))?;
                }
            },
            Err(e) => return Err(err(e.to_string())),
        }
        let meta = std::fs::metadata(&n.path).map_err(|e| err(e.to_string()))?;
        let ft = meta.file_type();
        if n.missing == Missing::Dir && !ft.is_dir() {
            return Err(err("not a directory; expected a directory".into()));
        }
        kinds.push((ft.is_dir(), ft.is_char_device() || ft.is_block_device()));
    }
    Ok(kinds)
}

/// The jailed VMM's pid, for the parent's signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Acquire);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes any pid and signal.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Builds the jail and enters it (the steps are in the module docs). Returns
/// [`Jailed::Inside`] in the jailed VMM, and [`Jailed::Exited`] in the process left in the
/// host's namespaces once the jailed VMM has ended. Must be called while the process has
/// one thread (mount namespaces are per process; `fork` keeps only the calling thread).
pub fn enter(opts: &JailOptions, needs: Needs) -> Result<Jailed, JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::Refused(
            "building the jail needs root (it makes namespaces and mounts); run ddvm as root, with --jail-uid for the VMM's own user".into(),
        ));
    }
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads != 1 {
        return Err(JailError::Refused(format!(
            "the process has {threads} threads; the jail must be entered before any thread starts"
        )));
    }
    let dir = check_dir(&opts.dir)?;
    let kinds = prepare(&needs.needs, &dir)?;
    for (domain, name) in &needs.taps {
        crate::topology::preopen_tap(domain, name).map_err(|e| {
            JailError::Refused(format!(
                "{e} (a TAP is opened in the host's network namespace before the jail leaves it)"
            ))
        })?;
    }
    let cwd = std::env::current_dir().map_err(step("the working directory"))?;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: unshare takes no pointers; CLONE_NEWPID affects only the children made after.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map_err(step("unshare the PID namespace"))?;
    // SAFETY: the process has one thread (checked above), so the child has a consistent copy
    // of every lock and allocation.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(step("fork into the PID namespace")(
            std::io::Error::last_os_error(),
        )),
        0 => {
            build(&dir, &cwd, &needs, &kinds, opts)?;
            Ok(Jailed::Inside)
        }
        child => {
            crate::topology::forget_preopened_taps();
            Ok(Jailed::Exited(wait_forwarding(child)))
        }
    }
}

/// The parent's part: forwards SIGINT and SIGTERM to `child` and returns its exit status.
fn wait_forwarding(child: libc::pid_t) -> u8 {
    CHILD.store(child, Ordering::Release);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `forward` only loads an atomic and calls kill, both async-signal-safe.
        unsafe {
            libc::signal(sig, forward as *const () as libc::sighandler_t);
        }
    }
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer; `child` is our child.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status) as u8;
            }
            if libc::WIFSIGNALED(status) {
                return 128u8.saturating_add(libc::WTERMSIG(status) as u8);
            }
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            eprintln!("ddvm: error: --jail: waiting for the jailed VMM: {e}");
            return 1;
        }
    }
}

/// The child's part: steps 3 to 7.
fn build(
    dir: &Path,
    cwd: &Path,
    needs: &Needs,
    kinds: &[(bool, bool)],
    opts: &JailOptions,
) -> Result<(), JailError> {
    // Out of the terminal's session: a Ctrl-C reaches the parent only, which forwards it once.
    // SAFETY: setsid and prctl take no pointers.
    unsafe {
        libc::setsid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare takes no pointers; the process has one thread.
    check(unsafe { libc::unshare(flags) })
        .map_err(step("unshare the mount, network, IPC and UTS namespaces"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some(Path::new("tmpfs")),
        dir,
        Some("tmpfs"),
        hardened,
        Some("mode=0755,size=4m"),
    )?;
    let inside = |p: &Path| dir.join(normalize(p).strip_prefix("/").unwrap_or(Path::new("")));
    // Shallow first, so a file bound inside a bound directory lands on top of it.
    let mut order: Vec<usize> = (0..needs.needs.len()).collect();
    order.sort_by_key(|&i| normalize(&needs.needs[i].path).components().count());
    for i in order {
        let n = &needs.needs[i];
        let (is_dir, is_device) = kinds[i];
        for d in walked_dirs(&n.path) {
            let d = inside(&d);
            if d.symlink_metadata().is_err() {
                mkdirs(&d)?;
            }
        }
        let target = inside(&n.path);
        mount_point(&target, is_dir)?;
        let mut f = libc::MS_NOSUID | libc::MS_NOEXEC;
        if !is_device {
            f |= libc::MS_NODEV;
        }
        if n.access == Access::Read {
            f |= libc::MS_RDONLY;
        }
        bind(&n.path, &target, f)?;
    }
    for l in &needs.links {
        let at = inside(&l.path);
        if let Some(parent) = at.parent() {
            mkdirs(parent)?;
        }
        std::os::unix::fs::symlink(&l.target, &at)
            .map_err(step(format!("symlink {}", l.path.display())))?;
    }
    // The PID namespace's own proc: the jail's processes only. What in it could change the
    // host (sysctls, SysRq, IRQ affinity) is read-only.
    let proc_dir = dir.join("proc");
    mkdirs(&proc_dir)?;
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        hardened,
        None,
    )?;
    for p in ["sys", "sysrq-trigger", "irq", "bus", "fs"] {
        let p = proc_dir.join(p);
        if p.exists() {
            bind(&p, &p, hardened | libc::MS_RDONLY)?;
        }
    }
    mkdirs(&inside(cwd))?;
    pivot(dir)?;
    // Nothing more is made in the jail's root.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | hardened,
        None,
    )?;
    std::env::set_current_dir(cwd).map_err(step(format!("chdir {}", cwd.display())))?;
    // The bounding set first, while every capability is effective (it takes CAP_SETPCAP);
    // then the user; then the sets the process holds.
    drop_bounding(&needs.keep)?;
    set_ids(opts)?;
    // A change of user clears the parent-death signal: ask again.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    set_capabilities(&needs.keep)?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes no pointers.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(step("set no_new_privs"))?;
    check_access(&needs.needs, kinds)
}

/// Step 5: `pivot_root` into `dir` and the old root detached (`pivot_root(".", ".")`
/// stacks the old root on the new one; detaching it leaves the new one).
fn pivot(dir: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(dir).map_err(step(format!("chdir {}", dir.display())))?;
    let dot = c".";
    // SAFETY: both pointers are the NUL-terminated string ".", which outlives the call.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as i32)
        .map_err(step(format!("pivot_root into {}", dir.display())))?;
    // SAFETY: the pointer is the NUL-terminated string ".".
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
        .map_err(step("detach the old root"))?;
    std::env::set_current_dir("/").map_err(step("chdir /"))
}

/// `--jail-gid` and `--jail-uid` (groups: the one group), keeping the permitted capabilities
/// across the change of user ([`set_capabilities`] then makes the kept ones effective).
fn set_ids(opts: &JailOptions) -> Result<(), JailError> {
    if let Some(gid) = opts.gid {
        let groups = [gid];
        // SAFETY: `groups` holds one gid and outlives the call.
        check(unsafe { libc::setgroups(1, groups.as_ptr()) })
            .map_err(step(format!("setgroups [{gid}]")))?;
        // SAFETY: setresgid takes no pointers.
        check(unsafe { libc::setresgid(gid, gid, gid) })
            .map_err(step(format!("setresgid {gid}")))?;
    }
    if let Some(uid) = opts.uid {
        // SAFETY: prctl and setresuid take no pointers.
        unsafe {
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))
                .map_err(step("keep capabilities across setuid"))?;
            check(libc::setresuid(uid, uid, uid)).map_err(step(format!("setresuid {uid}")))?;
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0))
                .map_err(step("keep capabilities across setuid"))?;
        }
    }
    Ok(())
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Step 6: drops every capability but `keep` from the bounding set and the ambient set.
fn drop_bounding(keep: &[u32]) -> Result<(), JailError> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in (0..=last).filter(|c| !keep.contains(c)) {
        // SAFETY: prctl(PR_CAPBSET_DROP) takes no pointers.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })
            .map_err(step(format!("drop capability {cap} from the bounding set")))?;
    }
    // SAFETY: prctl(PR_CAP_AMBIENT) takes no pointers.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })
    .map_err(step("clear the ambient capabilities"))
}

/// Step 6: the effective and permitted sets become `keep`, the inheritable set empty.
fn set_capabilities(keep: &[u32]) -> Result<(), JailError> {
    let mut data = [CapData::default(); 2];
    for &cap in keep {
        let word = &mut data[(cap / 32) as usize];
        word.effective |= 1 << (cap % 32);
        word.permitted |= 1 << (cap % 32);
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: `header` and the two data words have the kernel's layout for version 3 and
    // outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    check(r as i32).map_err(step("set the capabilities"))
}

/// Step 7: each needed path is usable as the VMM will use it, by the jail's user with the
/// capabilities it kept.
fn check_access(needs: &[Need], kinds: &[(bool, bool)]) -> Result<(), JailError> {
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    for (n, &(is_dir, _)) in needs.iter().zip(kinds) {
        let mut mode = libc::R_OK;
        if n.access == Access::Write {
            mode |= libc::W_OK;
        }
        if is_dir {
            mode |= libc::X_OK;
        }
        let c = cstr(&n.path)?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let r = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let what = match (n.access, is_dir) {
                (Access::Read, false) => "readable",
                (Access::Write, false) => "readable and writable",
                (Access::Read, true) => "readable and searchable",
                (Access::Write, true) => "readable, writable and searchable",
            };
            return Err(JailError::Path {
                path: n.path.clone(),
                why: n.why.clone(),
                what: format!(
                    "{e}; expected it {what} in the jail by uid {uid} gid {gid} without capabilities"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_laid_out_as_the_kernel_walks_them() {
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
        assert_eq!(
            walked_dirs(Path::new("/a/b/../c/d.img")),
            vec![
                PathBuf::from("/a"),
                PathBuf::from("/a/b"),
                PathBuf::from("/a/c")
            ]
        );
        assert!(walked_dirs(Path::new("/x")).is_empty());
    }

    #[test]
    fn a_topology_needs_its_images_backing_files_and_kvm() {
        let text = r#"
[[domain]]
name = "nvme0"
image = "dd.elf"
[domain.device]
kind = "emulated-nvme"
backing = "disk.img"
size_mib = 8

[[client]]
name = "c0"
disk = "nvme0"
size_mib = 8
image = "/images/client.elf"
"#;
        let file = Path::new("/etc/ddvm/t.toml");
        let cfg = Config::parse(file, text).unwrap();
        let mut n = Needs::new(Path::new("/dev/kvm"));
        n.topology(&cfg, file).unwrap();
        let paths = n.paths();
        for p in [
            "/dev/kvm",
            "/etc/ddvm/dd.elf",
            "/etc/ddvm/disk.img",
            "/images/client.elf",
        ] {
            assert!(paths.contains(&PathBuf::from(p)), "{p} in {paths:?}");
        }
        assert_eq!(paths.len(), 4);
        assert!(n.kept_capabilities().is_empty());
        let disk = n
            .needs
            .iter()
            .find(|x| x.path.ends_with("disk.img"))
            .unwrap();
        assert_eq!((disk.access, disk.missing), (Access::Write, Missing::File));
    }

    #[test]
    fn the_widest_need_of_a_path_wins() {
        let mut n = Needs::new(Path::new("/dev/kvm"));
        n.push(Path::new("/x"), Access::Read, Missing::Refuse, "a");
        n.output(Path::new("/x"), "b");
        assert_eq!(n.needs.len(), 2);
        assert_eq!(n.needs[1].access, Access::Write);
        assert_eq!(n.needs[1].missing, Missing::File);
    }
}
