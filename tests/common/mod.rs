//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ddvm::console::Echo;
use ddvm::domain::{Domain, DomainConfig};
use ddvm::hypervisor::{Hypervisor, DEFAULT_KVM_PATH};

/// Opens /dev/kvm or fails the test loudly: tests that need KVM never skip silently.
pub fn kvm() -> Hypervisor {
    match Hypervisor::open(Path::new(DEFAULT_KVM_PATH)) {
        Ok(hv) => hv,
        Err(e) => panic!("this test needs KVM and cannot run without it: {e}"),
    }
}

/// A driver-domain config with the built-in image.
pub fn dd_config(name: &str, cmdline: &str) -> DomainConfig {
    DomainConfig {
        name: name.to_string(),
        image: ddvm::builtin_driver_domain(),
        memory: 16 << 20,
        cmdline: cmdline.to_string(),
        channel_size: 1 << 20,
        echo: Echo::Off,
        device: None,
    }
}

/// Boots the built-in driver domain and waits until it is ready.
pub fn boot_ready(hv: &Hypervisor, name: &str, cmdline: &str) -> Domain {
    let d = Domain::boot(hv, &dd_config(name, cmdline), 1).expect("boot");
    if let Err(state) = d.wait_ready(Duration::from_secs(10)) {
        panic!(
            "domain {name} not ready: {state:?}\nconsole:\n{}",
            d.console().text()
        );
    }
    d
}

/// The ddvm binary.
pub fn ddvm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ddvm"))
}

/// Runs the ddvm binary with `args`.
pub fn ddvm(args: &[&str]) -> Output {
    Command::new(ddvm_bin())
        .args(args)
        .env_remove("DDVM_KVM")
        .output()
        .expect("run ddvm")
}

/// A unique scratch directory for one test, removed when the test ends.
///
/// A test that fails keeps its directory (disk images, consoles, sockets) for a look
/// afterwards and prints where it is; one that passes leaves nothing behind, so a machine
/// that runs the suite again and again does not fill its disk.
pub struct Scratch(PathBuf);

impl Scratch {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

/// Removes, once per process, the scratch directories that failed tests kept, or that runs
/// killed midway left, once their process is gone and an hour has passed.
fn sweep() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("ddvm-test-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600));
            if let Some(pid) = pid {
                if old && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    });
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the failed test's files in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Pins the calling thread to the CPU it runs on now: the threads it starts from then on
/// (a topology's services, its vCPUs) inherit that one CPU, and the VMM's code that asks how
/// many CPUs it has (`ddvm::sys::cpus_to_spare`) finds one.
pub fn pin_to_one_cpu() {
    // SAFETY: sched_getcpu takes no arguments; cpu_set_t is plain data that CPU_ZERO/CPU_SET
    // initialise, and sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it.
    unsafe {
        let cpu = usize::try_from(libc::sched_getcpu()).unwrap_or(0);
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    assert!(!ddvm::sys::cpus_to_spare(), "pinned to one CPU");
}

/// A unique scratch directory for one test; see [`Scratch`].
pub fn scratch(test: &str) -> Scratch {
    sweep();
    let dir = std::env::temp_dir().join(format!("ddvm-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    Scratch(dir)
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads the VMM made (vCPUs, device workers, block services, the control socket), by
/// name. The test harness's own threads come and go with the tests around this one, so a
/// count of every thread would race with them.
pub fn thread_count() -> usize {
    const OURS: [&str; 4] = ["vcpu-", "nvme-worker", "blk-", "control"];
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            OURS.iter().any(|p| comm.starts_with(p))
        })
        .count()
}

/// Resident set size of this process, in KiB.
pub fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4
}

/// Memory mappings of this process.
pub fn mapping_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

/// QEMU for the tests that check our guests against device models written by others.
pub const QEMU: &str = "qemu-system-x86_64";

/// Runs QEMU (TCG, no display, serial on stdout, `isa-debug-exit` at 0xf4 so the guest's exit
/// status becomes QEMU's: `(status << 1) | 1`) with `machine` and `args`; returns its exit code
/// and everything it printed. Output is read while QEMU runs, so a chatty guest cannot fill
/// the pipe and stall it; a run longer than 120 s is killed and fails the test.
pub fn qemu(machine: &str, args: &[&str]) -> (Option<i32>, String) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(QEMU)
        .args([
            "-machine", machine, "-accel", "tcg", "-cpu", "max", "-m", "64M",
        ])
        .args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{QEMU} is needed (Debian package qemu-system-x86): {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for QEMU") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = out.join().unwrap_or_default() + &err.join().unwrap_or_default();
    (status.code(), text)
}

/// Writes `dir/crash.elf`: a static x86-64 executable at 1 MiB whose first instruction is
/// `ud2` (an image that crashes at once). Returns its path.
pub fn crashing_image(dir: &Path) -> PathBuf {
    const PT_LOAD: u32 = 1;
    let base: u64 = 0x10_0000;
    let code = [0x0f, 0x0b];
    let mut b = vec![0u8; 0x1000];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    b[6] = 1; // version
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&base.to_le_bytes()); // entry
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    b[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    b[ph + 16..ph + 24].copy_from_slice(&base.to_le_bytes());
    b[ph + 24..ph + 32].copy_from_slice(&base.to_le_bytes());
    b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    b[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    b.extend_from_slice(&code);
    let path = dir.join("crash.elf");
    std::fs::write(&path, b).expect("write the crashing image");
    path
}

/// Kills the domain behind `h` (an operator kill) and waits for its recovery; fails the test
/// (naming kill `i`) once `limit` has passed since `t0`.
pub fn kill_and_wait_recovered(
    h: &ddvm::reincarnation::RecoveryHandle,
    i: u64,
    t0: std::time::Instant,
    limit: Duration,
) {
    let before = h.with(|o| o.recovered);
    h.send(ddvm::reincarnation::Command::Kill);
    while h.with(|o| o.recovered) == before {
        assert!(t0.elapsed() < limit, "kill {i} never recovered");
        std::thread::sleep(Duration::from_millis(1));
    }
}
