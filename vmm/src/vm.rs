//! A guest VM: memory, image, vCPU threads (one, but for a Linux client's), devices on its
//! buses — from creation to teardown. Driver domains ([`crate::domain`]) and client guests
//! ([`crate::client`]) are both guests; a stock Linux kernel is booted by [`crate::linux`].
//!
//! Booting checks everything that can be wrong with the request (image, sizes) before any KVM
//! object exists; a failure after that drops what was built, so nothing is left half-started.
//! Teardown stops the vCPU threads (a kick signal takes each out of KVM_RUN), joins them, then
//! drops the vCPUs, the VM and the memory, in that order.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ddvm_abi::boot::{BootInfo, Platform, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use ddvm_abi::layout;
use ddvm_abi::port;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestAddress;
use vmm_sys_util::signal::Killable;

use crate::arch;
use crate::console::{Console, Echo, LogReader};
use crate::devices::serial::SerialPort;
use crate::devices::Bus;
use crate::hypervisor::{register_pvm_vif, Hypervisor};
use crate::linux::LevelIrq;
use crate::loader::{Image, ImageError, Loaded};
use crate::memory::{self, GuestMem, MemoryError};
use crate::stats::VcpuStats;
use crate::vcpu::{self, GuestExit, RunState, Shared, VcpuContext, WaitWork};

/// Smallest guest: low pages, a 1 MiB-based image and a channel must fit.
pub const MIN_MEMORY: u64 = 4 << 20;

/// How to build a guest.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// Name used in logs and reports.
    pub name: String,
    /// The image to boot (a ddvm image; a stock Linux guest takes its kernel from
    /// [`crate::linux::LinuxBoot`]).
    pub image: Image,
    /// RAM in bytes (a multiple of 2 MiB).
    pub memory: u64,
    /// Guest command line.
    pub cmdline: String,
    /// Echo the console to stderr.
    pub echo: Echo,
}

/// Errors creating a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A bad image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A bad memory size.
    #[error("guest {name}: memory: {source}")]
    Memory {
        /// Guest name.
        name: String,
        /// Cause.
        #[source]
        source: MemoryError,
    },
    /// Memory too small for the layout.
    #[error(
        "guest {name}: memory of {memory} bytes is too small; expected at least {MIN_MEMORY} bytes"
    )]
    MemoryTooSmall {
        /// Guest name.
        name: String,
        /// Requested size.
        memory: u64,
    },
    /// Command line too long or with a NUL.
    #[error(
        "guest {name}: command line of {len} bytes; expected at most {} bytes without NUL",
        layout::CMDLINE_MAX
    )]
    Cmdline {
        /// Guest name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// A KVM call failed.
    #[error("guest {name}: {what}: {source}")]
    Kvm {
        /// Guest name.
        name: String,
        /// What we were doing.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the boot structures failed.
    #[error("guest {name}: writing {what} into guest memory: {source}")]
    Setup {
        /// Guest name.
        name: String,
        /// Which structure.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A stock Linux guest could not be set up.
    #[error("guest {name}: {source}")]
    Linux {
        /// Guest name.
        name: String,
        /// Cause.
        #[source]
        source: crate::linux::LinuxError,
    },
    /// The host cannot run this guest.
    #[error("guest {name}: {what}")]
    Unsupported {
        /// Guest name.
        name: String,
        /// Why.
        what: String,
    },
    /// Host resources (threads, eventfds, signals).
    #[error("guest {name}: {what}: {source}")]
    Host {
        /// Guest name.
        name: String,
        /// What we were doing.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A device a caller puts on the guest's MMIO bus (see [`Guest::boot`]).
pub struct MmioAttachment {
    /// Guest-physical base.
    pub base: u64,
    /// Length of the window.
    pub len: u64,
    /// The device.
    pub device: Arc<Mutex<dyn crate::devices::BusDevice>>,
    /// Eventfds to register as ioeventfds (guest-physical address, eventfd), no datamatch.
    pub ioevents: Vec<(u64, vmm_sys_util::eventfd::EventFd)>,
    /// The device's interrupt line. Only guests with an interrupt controller take it (a
    /// stock Linux guest); ddvm's own guests poll.
    pub irq: Option<LevelIrq>,
}

/// Builds the devices of a guest once its memory and shared state exist.
pub type AttachFn<'a> =
    dyn FnMut(&GuestMem, &Arc<Shared>) -> Result<Vec<MmioAttachment>, GuestError> + 'a;

/// What a driver domain adds to the boot of a ddvm image ([`crate::domain`]): a channel at
/// the top of memory, a device on the buses, a standby's hold. A guest that is not a domain
/// adds nothing ([`Guest::boot`]).
pub(crate) trait ImageExtras {
    /// Errors of the additions (every [`GuestError`] is one).
    type Error: From<GuestError>;
    /// Bytes at the top of memory kept from the image: the channel (0: none).
    fn channel_size(&self) -> u64 {
        0
    }
    /// Boot generation the vCPU reports the channel's ready mark with.
    fn epoch(&self) -> u64 {
        0
    }
    /// Guest-physical address of the ECAM window in the boot info (0: none).
    fn pci_ecam(&self) -> u64 {
        0
    }
    /// Whether the guest waits at its standby exit until promoted.
    fn standby(&self) -> bool {
        false
    }
    /// After the image and the boot structures are in memory, before any KVM object exists:
    /// writes what the additions keep in guest memory; returns what to append to the command
    /// line.
    fn prepare(&mut self, _mem: &GuestMem) -> Result<Option<String>, Self::Error> {
        Ok(None)
    }
    /// Puts the additions on the buses of `vm`; returns the work the vCPU thread does when
    /// the guest waits.
    fn attach(
        &mut self,
        _mem: &GuestMem,
        _shared: &Arc<Shared>,
        _vm: &Arc<VmFd>,
        _pio: &mut Bus,
        _mmio: &mut Bus,
    ) -> Result<Option<WaitWork>, Self::Error> {
        Ok(None)
    }
}

/// A guest without additions (every default above).
struct Plain;

impl ImageExtras for Plain {
    type Error = GuestError;
}

/// What a running guest is made of (see [`Guest::from_parts`]).
pub(crate) struct GuestParts {
    pub name: String,
    pub platform: Platform,
    pub loaded: Loaded,
    pub started: Instant,
    pub shared: Arc<Shared>,
    pub console: Arc<Console>,
    pub stats: Option<VcpuStats>,
    pub thread: JoinHandle<GuestExit>,
    pub cpu_clock: Option<libc::clockid_t>,
    pub aps: Vec<JoinHandle<GuestExit>>,
    pub helpers: Vec<JoinHandle<()>>,
    pub vm: Arc<VmFd>,
    pub mem: GuestMem,
}

/// A running guest.
pub struct Guest {
    name: String,
    platform: Platform,
    loaded: Loaded,
    started: Instant,
    shared: Arc<Shared>,
    console: Arc<Console>,
    stats: Option<VcpuStats>,
    thread: Option<JoinHandle<GuestExit>>,
    // The other vCPUs' threads (a Linux client's application processors), joined with it.
    aps: Vec<JoinHandle<GuestExit>>,
    // Threads that end when the guest is asked to stop (the interrupt-line resampler).
    helpers: Vec<JoinHandle<()>>,
    // The vCPU thread's CPU-time clock (valid while `thread` is held, not joined).
    cpu_clock: Option<libc::clockid_t>,
    exit: Option<GuestExit>,
    // Dropped after the vCPU thread has been joined; the VM before the memory it maps.
    vm: Option<Arc<VmFd>>,
    mem: GuestMem,
}

impl Guest {
    /// Builds and starts a guest of a ddvm image with the devices `attach` builds (client
    /// guests' virtio devices) on the MMIO bus; their ioeventfds are registered before the
    /// vCPU starts.
    pub fn boot(
        hv: &Hypervisor,
        cfg: &GuestConfig,
        attach: &mut AttachFn<'_>,
    ) -> Result<Guest, GuestError> {
        Self::boot_image(hv, cfg, Instant::now(), &mut Plain, attach)
    }

    /// Builds and starts a guest of a ddvm image with `extras` (a driver domain's), timed from
    /// `started`.
    pub(crate) fn boot_image<X: ImageExtras>(
        hv: &Hypervisor,
        cfg: &GuestConfig,
        started: Instant,
        extras: &mut X,
        attach: &mut AttachFn<'_>,
    ) -> Result<Guest, X::Error> {
        let name = cfg.name.clone();
        // 1. Everything the request can get wrong, before any KVM object exists.
        check_memory(&name, cfg.memory)?;
        check_cmdline(&name, &cfg.cmdline)?;
        let channel_size = extras.channel_size();
        let channel_gpa = cfg.memory - channel_size;
        let info = cfg
            .image
            .check(layout::IMAGE_BASE, channel_gpa)
            .map_err(GuestError::from)?;
        let mem = guest_memory(&name, cfg.memory)?;

        // 2. Guest memory contents.
        let setup = |what: &'static str| {
            let name = name.clone();
            move |source| GuestError::Setup { name, what, source }
        };
        let loaded = cfg.image.load(&info, &mem).map_err(GuestError::from)?;
        arch::write_page_tables_and_gdt(&mem).map_err(setup("page tables"))?;
        let log = LogReader::create(&mem, layout::LOG_RING, layout::LOG_RING_SIZE)
            .map_err(setup("log ring"))?;
        let channel = (channel_size > 0).then_some(channel_gpa);
        let shared = if extras.standby() {
            Shared::standby()
        } else {
            Shared::new()
        };
        let shared = Arc::new(shared.map_err(|source| GuestError::Host {
            name: name.clone(),
            what: "eventfd",
            source,
        })?);
        let cmdline = match extras.prepare(&mem)? {
            Some(more) => format!("{} {more}", cfg.cmdline),
            None => cfg.cmdline.clone(),
        };
        if cmdline.len() > layout::CMDLINE_MAX {
            return Err(GuestError::Cmdline {
                name,
                len: cmdline.len(),
            }
            .into());
        }

        // 3. KVM objects.
        let kvm_err = |what: &'static str| {
            let name = name.clone();
            move |source| GuestError::Kvm { name, what, source }
        };
        let vm = vm_with_memory(hv, &name, &mem)?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = hv
            .supported_cpuid()
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&arch::long_mode_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&arch::entry_regs(loaded.entry))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        let platform = if register_pvm_vif(&vcpu, layout::VIF_PAGE) {
            Platform::Pvm
        } else {
            hv.host_kind()
        };
        let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
        let stats = VcpuStats::open(&vcpu);

        // 4. Boot info, now that the platform is known.
        let boot_info = BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            platform: platform as u32,
            mem_size: cfg.memory,
            tsc_khz: u64::from(tsc_khz),
            log_ring: layout::LOG_RING,
            log_ring_size: layout::LOG_RING_SIZE,
            panic_record: layout::PANIC_RECORD,
            channel: channel.unwrap_or(0),
            channel_size,
            cmdline: layout::BOOT_INFO + layout::CMDLINE_OFFSET,
            cmdline_len: cmdline.len() as u64,
            // Configuration space through ECAM: one exit per access instead of two.
            pci_ecam: extras.pci_ecam(),
            reserved: [0; 4],
        };
        arch::write_boot_info(&mem, &boot_info, &cmdline).map_err(setup("boot info"))?;

        // 5. Devices and the vCPU thread.
        let console = Arc::new(Console::new(&name, cfg.echo));
        let mut pio = Bus::new();
        pio.insert(
            u64::from(port::SERIAL_COM1),
            u64::from(port::SERIAL_LEN),
            Arc::new(Mutex::new(SerialPort::new(console.clone()))),
        )
        .map_err(|e| GuestError::Host {
            name: name.clone(),
            what: "port bus",
            source: std::io::Error::other(e),
        })?;
        let mut mmio = Bus::new();
        let on_wait = extras.attach(&mem, &shared, &vm, &mut pio, &mut mmio)?;
        for a in attach(&mem, &shared)? {
            // ddvm's guests poll: their devices have no interrupt line.
            let _ = put_on_bus(&vm, &name, &mut mmio, a)?;
        }
        // Completion notifications are handled in the kernel: ~23 µs instead of ~70 µs.
        if let Err(e) = vm.register_ioevent(
            &shared.notify,
            &IoEventAddress::Pio(u64::from(port::NOTIFY)),
            NoDatamatch,
        ) {
            // Once per boot, and a failing domain is booted again and again: limited.
            crate::limited!(
                warn,
                key: name,
                "domain {name}: notify ioeventfd unavailable ({e}); using exits"
            );
        }
        let ctx = VcpuContext {
            mem: mem.clone(),
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            shared: shared.clone(),
            console: console.clone(),
            log: Some(log),
            channel: channel.map(|gpa| (gpa, extras.epoch())),
            started,
            abi_ports: true,
            on_wait,
            index: 0,
        };
        let (thread, cpu_clock) = start_vcpu(&name, vcpu, ctx)?;
        Ok(Guest::from_parts(GuestParts {
            name,
            platform,
            loaded,
            started,
            shared,
            console,
            stats,
            thread,
            cpu_clock,
            aps: Vec::new(),
            helpers: Vec::new(),
            vm,
            mem,
        }))
    }

    /// A guest of parts that run (a stock Linux guest's, [`crate::linux::boot`]).
    pub(crate) fn from_parts(p: GuestParts) -> Guest {
        Guest {
            name: p.name,
            platform: p.platform,
            loaded: p.loaded,
            started: p.started,
            shared: p.shared,
            console: p.console,
            stats: p.stats,
            thread: Some(p.thread),
            aps: p.aps,
            helpers: p.helpers,
            cpu_clock: p.cpu_clock,
            exit: None,
            vm: Some(p.vm),
            mem: p.mem,
        }
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Platform the guest runs on.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// What was loaded.
    pub fn loaded(&self) -> Loaded {
        self.loaded
    }

    /// When boot started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The console.
    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    /// Guest memory (for the channel and tests).
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// State shared with the vCPU threads.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The VM, until the guest is dropped.
    pub(crate) fn vm_fd(&self) -> Option<&Arc<VmFd>> {
        self.vm.as_ref()
    }

    /// Exit counters.
    pub fn exits(&self) -> &vcpu::ExitCounters {
        &self.shared.exits
    }

    /// A KVM statistic of the vCPU (e.g. `exits`, `insn_emulation`).
    pub fn vcpu_stat(&self, name: &str) -> Option<u64> {
        self.stats.as_ref()?.get(name)
    }

    /// Every KVM statistic of the vCPU.
    pub fn vcpu_stats(&self) -> Vec<(String, u64)> {
        self.stats.as_ref().map(|s| s.all()).unwrap_or_default()
    }

    /// Current state.
    pub fn state(&self) -> RunState {
        self.shared.state()
    }

    /// Waits for the ready mark; returns the time from boot start to it, or the state at the
    /// timeout (still booting, or stopped).
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration, RunState> {
        match self
            .shared
            .wait_for(timeout, |s| !matches!(s, RunState::Booting))
        {
            RunState::Ready(t) => Ok(t),
            other => Err(other),
        }
    }

    /// Waits until the guest stops or `timeout` passes.
    pub fn wait_stopped(&self, timeout: Duration) -> Option<GuestExit> {
        match self
            .shared
            .wait_for(timeout, |s| matches!(s, RunState::Stopped(_)))
        {
            RunState::Stopped(e) => Some(e),
            _ => None,
        }
    }

    /// How long the vCPU thread has run on a CPU so far, guest and VMM work together (`None`
    /// once it is stopped, or where the host does not say). A heartbeat that stood still
    /// while this did not move is the host's stall, not the guest's hang.
    pub fn vcpu_cpu_time(&self) -> Option<Duration> {
        // The clock names the vCPU thread's only while `self.thread` holds it (not joined).
        let clock = self.cpu_clock.filter(|_| self.thread.is_some())?;
        crate::sys::clock_time(clock)
    }

    /// The vCPU thread's id, while it runs.
    pub fn vcpu_tid(&self) -> Option<i32> {
        self.shared.tid().filter(|_| self.thread.is_some())
    }

    /// Whether the vCPU is blocked in a wait exit (idle, so a still heartbeat is no hang).
    pub fn is_waiting(&self) -> bool {
        self.shared.waiting()
    }

    /// Whether the guest has stopped (without blocking).
    pub fn has_stopped(&self) -> Option<GuestExit> {
        match self.shared.state() {
            RunState::Stopped(e) => Some(e),
            _ => None,
        }
    }

    /// Wakes the guest if it waits.
    pub fn kick(&self) {
        self.shared.kick();
    }

    /// Stops the guest (if it still runs), joins its vCPU thread and returns why it stopped.
    pub fn stop(&mut self) -> GuestExit {
        if let Some(thread) = self.thread.take() {
            self.shared.request_stop();
            let exit = join_vcpu(thread);
            for ap in self.aps.drain(..) {
                join_vcpu(ap);
            }
            for h in self.helpers.drain(..) {
                let _ = h.join();
            }
            // With several vCPUs, the first to stop says why.
            self.exit = Some(self.has_stopped().unwrap_or(exit));
        }
        self.exit.clone().unwrap_or(GuestExit::Stopped)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
        // Then the VM goes, and then (as a field) the memory.
        self.vm.take();
    }
}

/// Refuses memory too small for a ddvm image's layout.
pub(crate) fn check_memory(name: &str, memory: u64) -> Result<(), GuestError> {
    if memory < MIN_MEMORY {
        return Err(GuestError::MemoryTooSmall {
            name: name.to_string(),
            memory,
        });
    }
    Ok(())
}

/// Refuses a command line too long for the boot info, or with a NUL.
pub(crate) fn check_cmdline(name: &str, cmdline: &str) -> Result<(), GuestError> {
    if cmdline.len() > layout::CMDLINE_MAX || cmdline.contains('\0') {
        return Err(GuestError::Cmdline {
            name: name.to_string(),
            len: cmdline.len(),
        });
    }
    Ok(())
}

/// A guest's RAM, identity-mapped by the entry page tables.
pub(crate) fn guest_memory(name: &str, size: u64) -> Result<GuestMem, GuestError> {
    memory::create(size, layout::IDENTITY_MAPPED).map_err(|source| GuestError::Memory {
        name: name.to_string(),
        source,
    })
}

/// A VM whose one memory slot is `mem`, from guest address 0.
pub(crate) fn vm_with_memory(
    hv: &Hypervisor,
    name: &str,
    mem: &GuestMem,
) -> Result<Arc<VmFd>, GuestError> {
    let kvm_err = |what: &'static str| {
        let name = name.to_string();
        move |source| GuestError::Kvm { name, what, source }
    };
    let vm = Arc::new(hv.kvm().create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    let (host, len) = memory::host_range(mem).ok_or_else(|| GuestError::Setup {
        name: name.to_string(),
        what: "memory slot",
        source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(0)),
    })?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: len,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: the region maps `mem`, which the guest owns and drops only after the VM (field
    // order and `Drop` of `Guest`); the host range is exactly the mapping vm-memory created.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    Ok(vm)
}

/// Puts a device on the MMIO bus with its ioeventfds; returns its interrupt line, if it has
/// one, for the caller to register ([`crate::linux`]).
pub(crate) fn put_on_bus(
    vm: &VmFd,
    name: &str,
    mmio: &mut Bus,
    a: MmioAttachment,
) -> Result<Option<LevelIrq>, GuestError> {
    mmio.insert(a.base, a.len, a.device)
        .map_err(|e| GuestError::Host {
            name: name.to_string(),
            what: "MMIO bus",
            source: std::io::Error::other(e),
        })?;
    for (addr, fd) in &a.ioevents {
        vm.register_ioevent(fd, &IoEventAddress::Mmio(*addr), NoDatamatch)
            .map_err(|source| GuestError::Kvm {
                name: name.to_string(),
                what: "KVM_IOEVENTFD",
                source,
            })?;
    }
    Ok(a.irq)
}

/// Starts the vCPU thread (`vcpu-NAME`); returns it and its CPU-time clock.
pub(crate) fn start_vcpu(
    name: &str,
    vcpu: kvm_ioctls::VcpuFd,
    ctx: VcpuContext,
) -> Result<(JoinHandle<GuestExit>, Option<libc::clockid_t>), GuestError> {
    let host_err = |what: &'static str, source| GuestError::Host {
        name: name.to_string(),
        what,
        source,
    };
    vcpu::install_kick_handler().map_err(|e| {
        host_err(
            "kick signal handler",
            std::io::Error::from_raw_os_error(e.errno()),
        )
    })?;
    // A driver domain's vCPU (its waits run the device's or its owner's work) on one CPU:
    // see `sys::batch_scheduling`.
    let batch = ctx.on_wait.is_some() && !crate::sys::cpus_to_spare();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu-{name}"))
        .spawn(move || {
            if batch {
                let _ = crate::sys::batch_scheduling();
            }
            crate::seccomp::enter(crate::seccomp::ThreadClass::Vcpu);
            vcpu::run(vcpu, ctx)
        })
        .map_err(|e| host_err("spawning the vCPU thread", e))?;
    let clock = crate::sys::thread_cpu_clock(&thread);
    Ok((thread, clock))
}

/// Kicks the vCPU thread out of KVM_RUN until it finishes. The first signal normally does;
/// one that lands just before the thread enters KVM_RUN is repeated.
pub(crate) fn join_vcpu(thread: JoinHandle<GuestExit>) -> GuestExit {
    let mut delay = Duration::from_micros(20);
    while !thread.is_finished() {
        // The thread exists until joined, so the signal target is valid.
        let _ = thread.kill(vcpu::kick_signal());
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(5));
    }
    thread
        .join()
        .unwrap_or(GuestExit::HostError { errno: libc::EIO })
}

/// Which KVM `hv` is, as a guest booted on it finds: PVM when a vCPU set up as a guest's takes
/// PVM's VIF page, else what the CPU advertises. Builds a throwaway VM with a little memory and
/// one vCPU (no thread, never run).
pub fn probe_platform(hv: &Hypervisor) -> Result<Platform, GuestError> {
    let name = "probe";
    let kvm_err = |what: &'static str| {
        move |source| GuestError::Kvm {
            name: name.to_string(),
            what,
            source,
        }
    };
    let mem = guest_memory(name, MIN_MEMORY)?;
    let vm = vm_with_memory(hv, name, &mem)?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let cpuid = hv
        .supported_cpuid()
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&arch::long_mode_sregs(sregs))
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    Ok(if register_pvm_vif(&vcpu, layout::VIF_PAGE) {
        Platform::Pvm
    } else {
        hv.host_kind()
    })
}
