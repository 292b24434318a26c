//! Seccomp filters, one per thread class.
//!
//! Every thread ddvm starts belongs to a [`ThreadClass`] and installs that class's filter as its
//! first act ([`enter`]); the main thread installs its own once the command line is parsed and
//! the hook launcher (the one process allowed to start programs) is running. A filter allows the
//! system calls its class makes and nothing else; `ioctl` is allowed only for the requests the
//! class issues (KVM's by number, VFIO's by type), `openat` only read-only outside the main
//! thread, `mmap` and `mprotect` never with `PROT_EXEC`, and a new thread only through `clone`
//! with `CLONE_THREAD` (`clone3`, whose flags a filter cannot read, fails with `ENOSYS`, and the C
//! library falls back to `clone`). No class may `execve`.
//!
//! A filter is inherited by the threads its thread starts, and the kernel applies every filter
//! a thread holds. So a class that starts threads of another class also allows what they do
//! ([`ThreadClass::children`]); the main thread, which starts every class, is the widest.
//!
//! `--seccomp` chooses what a forbidden call does: `true` (the default) sends `SIGSYS`, whose
//! handler names the thread class and the call on stderr and ends the process with status
//! [`EXIT_FORBIDDEN_CALL`]; `log` lets it through and has the kernel log it (the audit log,
//! `dmesg`), for finding what a filter lacks; `false` installs no filter.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status after a forbidden system call (128 + `SIGSYS`).
pub const EXIT_FORBIDDEN_CALL: i32 = 159;

/// What the filters do with a call their class does not make (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Refuse it: `SIGSYS`, then exit with [`EXIT_FORBIDDEN_CALL`].
    #[default]
    True,
    /// Allow it and have the kernel log it.
    Log,
    /// No filters.
    False,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "true" => Ok(Mode::True),
            "log" => Ok(Mode::Log),
            "false" => Ok(Mode::False),
            _ => Err(format!("expected true, false or log, not {s:?}")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::True => "true",
            Mode::Log => "log",
            Mode::False => "false",
        })
    }
}

/// The kinds of thread ddvm runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadClass {
    /// The main thread: builds topologies, runs the demo and chaos drivers, waits for signals.
    Main,
    /// A guest's vCPU (`vcpu-NAME`): KVM_RUN, and the device models it drives on exits.
    Vcpu,
    /// A disk's block service and its supervisor (`blk-NAME`): serves the clients' queues,
    /// restarts and replays.
    BlockService,
    /// A NIC's network service and its supervisor (`net-NAME`).
    NetService,
    /// A device model's worker (`nvme-worker`, `nvme-flusher`, `e1000-worker`): backing-file
    /// and wire I/O.
    DeviceWorker,
    /// A device's standby booter (`standby-NAME`): builds warm standby domains.
    StandbyBooter,
    /// A Linux client's interrupt resampler (`irq-NAME`).
    IrqResampler,
    /// The control socket's accept loop (`control`).
    Control,
    /// One control connection (`control-conn`).
    ControlConn,
}

impl ThreadClass {
    /// Every class.
    pub const ALL: [ThreadClass; 9] = [
        ThreadClass::Main,
        ThreadClass::Vcpu,
        ThreadClass::BlockService,
        ThreadClass::NetService,
        ThreadClass::DeviceWorker,
        ThreadClass::StandbyBooter,
        ThreadClass::IrqResampler,
        ThreadClass::Control,
        ThreadClass::ControlConn,
    ];

    /// Its name in messages and `ddvm ctl status`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Main => "main",
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::BlockService => "block service",
            ThreadClass::NetService => "network service",
            ThreadClass::DeviceWorker => "device worker",
            ThreadClass::StandbyBooter => "standby booter",
            ThreadClass::IrqResampler => "interrupt resampler",
            ThreadClass::Control => "control",
            ThreadClass::ControlConn => "control connection",
        }
    }

    /// Its name on the command line and in `DDVM_SECCOMP_PROBE`.
    pub fn key(self) -> &'static str {
        match self {
            ThreadClass::Main => "main",
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::BlockService => "block-service",
            ThreadClass::NetService => "network-service",
            ThreadClass::DeviceWorker => "device-worker",
            ThreadClass::StandbyBooter => "standby-booter",
            ThreadClass::IrqResampler => "irq-resampler",
            ThreadClass::Control => "control",
            ThreadClass::ControlConn => "control-conn",
        }
    }

    /// The classes of the threads a thread of this class starts (directly or not).
    pub fn children(self) -> &'static [ThreadClass] {
        use ThreadClass::*;
        match self {
            Main => &[
                Vcpu,
                BlockService,
                NetService,
                DeviceWorker,
                StandbyBooter,
                IrqResampler,
                Control,
                ControlConn,
            ],
            // A supervisor restarts domains itself when no standby is ready.
            BlockService | NetService | StandbyBooter => &[Vcpu],
            Control => &[ControlConn],
            Vcpu | DeviceWorker | IrqResampler | ControlConn => &[],
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One permission in a filter.
#[derive(Clone, Copy, Debug)]
enum Allow {
    /// The call, whatever its arguments.
    Call(libc::c_long),
    /// `ioctl` with one of these requests.
    Ioctl(&'static [u64]),
    /// `ioctl` with a request of this type (the `_IOC_TYPE` byte).
    IoctlType(u8),
    /// `openat` neither writing nor creating.
    OpenReadOnly,
    /// `openat` with any flags.
    OpenAny,
    /// `mmap` and `mprotect` without `PROT_EXEC`.
    MapNoExec,
    /// `clone` of a thread (`CLONE_THREAD` set).
    CloneThread,
    /// `prctl(PR_SET_NAME)` (a new thread names itself before it installs its own filter),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp(SECCOMP_SET_MODE_FILTER)` without flags (it
    /// then installs its filter: one more filter can only forbid more).
    Filtering,
    /// `sched_setscheduler(0, SCHED_BATCH, _)`: a new thread of a class that serves what a
    /// guest queues moves itself to batch scheduling on one CPU (`sys::batch_scheduling`),
    /// after its creator's filter applies and before its own does.
    BatchScheduling,
}

/// The KVM and other ioctl request numbers the classes issue.
mod req {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
    ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
    ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
    ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
    ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
    ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
    ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
    ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
    ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);

    /// `/dev/kvm` itself.
    pub fn system() -> Vec<u64> {
        vec![
            KVM_GET_API_VERSION(),
            KVM_CREATE_VM(),
            KVM_GET_MSR_INDEX_LIST(),
            KVM_CHECK_EXTENSION(),
            KVM_GET_VCPU_MMAP_SIZE(),
            KVM_GET_SUPPORTED_CPUID(),
        ]
    }

    /// Building a VM and its vCPUs.
    pub fn build() -> Vec<u64> {
        vec![
            KVM_CHECK_EXTENSION(),
            KVM_CREATE_VCPU(),
            KVM_SET_USER_MEMORY_REGION(),
            KVM_SET_TSS_ADDR(),
            KVM_SET_IDENTITY_MAP_ADDR(),
            KVM_CREATE_IRQCHIP(),
            KVM_CREATE_PIT2(),
            KVM_IRQFD(),
            KVM_IOEVENTFD(),
            KVM_ENABLE_CAP(),
            KVM_GET_STATS_FD(),
            KVM_GET_REGS(),
            KVM_SET_REGS(),
            KVM_GET_SREGS(),
            KVM_SET_SREGS(),
            KVM_GET_MSRS(),
            KVM_SET_MSRS(),
            KVM_GET_FPU(),
            KVM_SET_FPU(),
            KVM_GET_LAPIC(),
            KVM_SET_LAPIC(),
            KVM_SET_CPUID2(),
            KVM_SET_MP_STATE(),
            KVM_GET_TSC_KHZ(),
        ]
    }

    /// What a running vCPU and the device models it drives issue.
    pub fn vcpu() -> Vec<u64> {
        vec![
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_SET_REGS(),
            KVM_GET_SREGS(),
            KVM_IOEVENTFD(),
            KVM_IRQ_LINE(),
            KVM_SET_USER_MEMORY_REGION(),
        ]
    }

    /// Re-asserting a level-triggered line.
    pub fn irq() -> Vec<u64> {
        vec![KVM_IRQ_LINE()]
    }

    /// Terminal and socket ioctls: isatty, non-blocking mode.
    pub const TTY: [u64; 2] = [libc::TCGETS, libc::FIONBIO];
    /// Non-blocking mode alone.
    pub const FIONBIO: [u64; 1] = [libc::FIONBIO];
    /// Opening a TAP device.
    pub const TUN: [u64; 1] = [libc::TUNSETIFF];
    /// VFIO's ioctl type (`;`).
    pub const VFIO_TYPE: u8 = b';';
}

fn leak(v: Vec<u64>) -> &'static [u64] {
    Box::leak(v.into_boxed_slice())
}

/// The ioctl request lists, built once.
struct Requests {
    system: &'static [u64],
    build: &'static [u64],
    vcpu: &'static [u64],
    irq: &'static [u64],
}

fn requests() -> &'static Requests {
    static R: OnceLock<Requests> = OnceLock::new();
    R.get_or_init(|| Requests {
        system: leak(req::system()),
        build: leak(req::build()),
        vcpu: leak(req::vcpu()),
        irq: leak(req::irq()),
    })
}

/// What every thread does: memory, locks, time, signals, exiting (a panic's abort included),
/// logging, and reading its own `/proc` files.
fn base() -> Vec<Allow> {
    use libc::*;
    let mut v: Vec<Allow> = [
        SYS_brk,
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_futex,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_rseq,
        SYS_set_robust_list,
        SYS_getrandom,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_rt_sigaction,
        SYS_sigaltstack,
        SYS_gettid,
        SYS_getpid,
        SYS_tgkill,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_exit,
        SYS_exit_group,
        SYS_read,
        SYS_write,
        SYS_close,
        SYS_lseek,
        SYS_statx,
        SYS_newfstatat,
        SYS_fstat,
        SYS_readlink,
    ]
    .into_iter()
    .map(Allow::Call)
    .collect();
    v.extend([
        Allow::MapNoExec,
        Allow::OpenReadOnly,
        Allow::Filtering,
        Allow::BatchScheduling,
    ]);
    v
}

/// Backing-file and wire I/O of the device models.
fn device_io() -> Vec<Allow> {
    use libc::*;
    [
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_readv,
        SYS_writev,
        SYS_fsync,
        SYS_fdatasync,
        SYS_fallocate,
        SYS_recvfrom,
        SYS_sendto,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_poll,
        SYS_ppoll,
        SYS_timerfd_settime,
        SYS_fcntl,
    ]
    .into_iter()
    .map(Allow::Call)
    .collect()
}

/// Building VMs and starting their vCPU threads.
fn vm_builder() -> Vec<Allow> {
    use libc::*;
    let r = requests();
    let mut v: Vec<Allow> = [SYS_eventfd2, SYS_timerfd_create, SYS_clone3, SYS_fcntl]
        .into_iter()
        .map(Allow::Call)
        .collect();
    v.extend([
        Allow::CloneThread,
        Allow::Ioctl(r.system),
        Allow::Ioctl(r.build),
        Allow::IoctlType(req::VFIO_TYPE),
    ]);
    v
}

/// What a thread of `class` does itself (without its children's).
fn own(class: ThreadClass) -> Vec<Allow> {
    use libc::*;
    let r = requests();
    let mut v = base();
    match class {
        ThreadClass::Main => {
            v.extend(vm_builder());
            v.extend(device_io());
            v.extend(
                [
                    SYS_socket,
                    SYS_socketpair,
                    SYS_bind,
                    SYS_listen,
                    SYS_connect,
                    SYS_accept4,
                    SYS_getsockopt,
                    SYS_setsockopt,
                    SYS_shutdown,
                    SYS_chmod,
                    SYS_fchmod,
                    SYS_mkdir,
                    SYS_rename,
                    SYS_unlink,
                    SYS_unlinkat,
                    SYS_rmdir,
                    SYS_ftruncate,
                    SYS_getcwd,
                    SYS_geteuid,
                    SYS_getuid,
                    SYS_getegid,
                    SYS_getgid,
                    SYS_prlimit64,
                    SYS_sched_setaffinity,
                    SYS_dup,
                    SYS_dup3,
                    SYS_pipe2,
                    SYS_wait4,
                    SYS_kill,
                    SYS_memfd_create,
                    SYS_getdents64,
                    SYS_uname,
                ]
                .into_iter()
                .map(Allow::Call),
            );
            v.extend([
                Allow::OpenAny,
                Allow::Ioctl(&req::TTY),
                Allow::Ioctl(&req::TUN),
                Allow::Ioctl(r.vcpu),
                Allow::Ioctl(r.irq),
            ]);
        }
        ThreadClass::Vcpu => {
            v.extend(device_io());
            v.extend([Allow::Ioctl(r.vcpu), Allow::IoctlType(req::VFIO_TYPE)]);
        }
        ThreadClass::BlockService | ThreadClass::NetService | ThreadClass::StandbyBooter => {
            v.extend(vm_builder());
            v.extend(device_io());
        }
        ThreadClass::DeviceWorker => v.extend(device_io()),
        ThreadClass::IrqResampler => {
            v.extend(
                [SYS_poll, SYS_ppoll, SYS_fcntl]
                    .into_iter()
                    .map(Allow::Call),
            );
            v.push(Allow::Ioctl(r.irq));
        }
        ThreadClass::Control => {
            v.extend(
                [
                    SYS_accept4,
                    SYS_poll,
                    SYS_ppoll,
                    SYS_fcntl,
                    SYS_getsockopt,
                    SYS_geteuid,
                    SYS_clone3,
                    // The event manager's epoll (made by the thread that starts the server).
                    SYS_epoll_create1,
                    SYS_epoll_ctl,
                    SYS_epoll_wait,
                    SYS_epoll_pwait,
                    SYS_epoll_pwait2,
                    // Ending a followed stream; the deadline of one that lags.
                    SYS_shutdown,
                    SYS_timerfd_settime,
                ]
                .into_iter()
                .map(Allow::Call),
            );
            v.push(Allow::CloneThread);
        }
        ThreadClass::ControlConn => {
            v.extend(
                [
                    SYS_recvfrom,
                    SYS_sendto,
                    SYS_recvmsg,
                    SYS_sendmsg,
                    SYS_getsockopt,
                    SYS_setsockopt,
                    SYS_poll,
                    SYS_ppoll,
                    SYS_fcntl,
                    SYS_getdents64,
                ]
                .into_iter()
                .map(Allow::Call),
            );
            v.push(Allow::Ioctl(&req::FIONBIO));
        }
    }
    v
}

/// What a thread of `class` and every thread it starts does.
fn allowed(class: ThreadClass) -> Vec<Allow> {
    let mut v = own(class);
    for child in class.children() {
        v.extend(allowed(*child));
    }
    v
}

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, len, op, value).expect("argument index below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a rule with a condition")
}

/// The filter's rules: per call, the argument conditions of which one must hold (none: any).
fn rules(allows: &[Allow]) -> BTreeMap<i64, Vec<SeccompRule>> {
    use SeccompCmpArgLen::Dword;
    // `None`: allowed whatever the arguments.
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    let mut add = |call: libc::c_long, r: Option<SeccompRule>| {
        let entry = map.entry(call).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), r) {
            (Some(rules), Some(r)) => rules.push(r),
            (_, None) => *entry = None,
            (None, Some(_)) => {}
        }
    };
    let no_write = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u64;
    for a in allows {
        match *a {
            Allow::Call(c) => add(c, None),
            Allow::Ioctl(list) => {
                for &r in list {
                    add(
                        libc::SYS_ioctl,
                        Some(rule(vec![cond(
                            1,
                            Dword,
                            SeccompCmpOp::Eq,
                            r & 0xffff_ffff,
                        )])),
                    );
                }
            }
            Allow::IoctlType(t) => add(
                libc::SYS_ioctl,
                Some(rule(vec![cond(
                    1,
                    Dword,
                    SeccompCmpOp::MaskedEq(0xff00),
                    u64::from(t) << 8,
                )])),
            ),
            Allow::OpenReadOnly => add(
                libc::SYS_openat,
                Some(rule(vec![cond(
                    2,
                    Dword,
                    SeccompCmpOp::MaskedEq(no_write),
                    0,
                )])),
            ),
            Allow::OpenAny => add(libc::SYS_openat, None),
            Allow::Filtering => {
                for option in [libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS] {
                    add(
                        libc::SYS_prctl,
                        Some(rule(vec![cond(0, Dword, SeccompCmpOp::Eq, option as u64)])),
                    );
                }
                add(
                    libc::SYS_seccomp,
                    Some(rule(vec![
                        cond(
                            0,
                            Dword,
                            SeccompCmpOp::Eq,
                            libc::SECCOMP_SET_MODE_FILTER as u64,
                        ),
                        cond(1, Dword, SeccompCmpOp::Eq, 0),
                    ])),
                );
            }
            Allow::BatchScheduling => add(
                libc::SYS_sched_setscheduler,
                Some(rule(vec![
                    cond(0, Dword, SeccompCmpOp::Eq, 0),
                    cond(1, Dword, SeccompCmpOp::Eq, libc::SCHED_BATCH as u64),
                ])),
            ),
            Allow::MapNoExec => {
                let no_exec = || {
                    Some(rule(vec![cond(
                        2,
                        Dword,
                        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
                        0,
                    )]))
                };
                add(libc::SYS_mmap, no_exec());
                add(libc::SYS_mprotect, no_exec());
            }
            Allow::CloneThread => add(
                libc::SYS_clone,
                Some(rule(vec![cond(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                    libc::CLONE_THREAD as u64,
                )])),
            ),
        }
    }
    map.into_iter()
        .map(|(call, r)| (call, r.unwrap_or_default()))
        .collect()
}

/// The BPF program of `class`'s filter; a call outside it gets `mismatch`.
pub fn program(class: ThreadClass, mismatch: SeccompAction) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules(&allowed(class)),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| format!("the {} filter: {e}", class.name()))?;
    filter
        .try_into()
        .map_err(|e| format!("the {} filter: {e}", class.name()))
}

/// The filter every thread installs before its class's: `clone3` fails with `ENOSYS`, so the C
/// library starts threads with `clone`, whose flags the class filters check.
fn no_clone3() -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| format!("the clone3 filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e| format!("the clone3 filter: {e}"))
}

/// Installs `class`'s filter on the calling thread, refusing with `mismatch`.
pub fn apply(class: ThreadClass, mismatch: SeccompAction) -> Result<(), String> {
    let install = |p: &BpfProgram, what: &str| {
        seccompiler::apply_filter(p).map_err(|e| format!("installing the {what} filter: {e}"))
    };
    install(&no_clone3()?, "clone3")?;
    install(&program(class, mismatch)?, class.name())?;
    CLASS.with(|c| c.set(Some(class)));
    Ok(())
}

struct Installed {
    mode: Mode,
    programs: Vec<BpfProgram>,
    no_clone3: BpfProgram,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

thread_local! {
    /// The class whose filter this thread holds (read by the `SIGSYS` handler).
    static CLASS: Cell<Option<ThreadClass>> = const { Cell::new(None) };
}

/// Chooses the mode for the process: compiles every class's filter and installs the `SIGSYS`
/// handler. Until this is called (and with [`Mode::False`]) [`enter`] does nothing, which is
/// what a library user and in-process tests get. Call once, before starting any thread.
pub fn install(mode: Mode) -> Result<(), String> {
    let mismatch = match mode {
        Mode::False => {
            let _ = INSTALLED.set(Installed {
                mode,
                programs: Vec::new(),
                no_clone3: Vec::new(),
            });
            return Ok(());
        }
        Mode::Log => SeccompAction::Log,
        Mode::True => SeccompAction::Trap,
    };
    let programs = ThreadClass::ALL
        .iter()
        .map(|c| program(*c, mismatch.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    install_sigsys_handler()?;
    INSTALLED
        .set(Installed {
            mode,
            programs,
            no_clone3: no_clone3()?,
        })
        .map_err(|_| "seccomp mode chosen twice".to_string())?;
    ddvm_passthrough::on_thread_start(|| enter(ThreadClass::DeviceWorker));
    Ok(())
}

/// The mode [`install`] chose (`None`: never called).
pub fn mode() -> Option<Mode> {
    INSTALLED.get().map(|i| i.mode)
}

/// Installs `class`'s filter on the calling thread, as the mode says. A thread that cannot
/// hold its filter does not go on without it: the process aborts.
pub fn enter(class: ThreadClass) {
    let Some(installed) = INSTALLED.get() else {
        return;
    };
    if installed.mode == Mode::False {
        return;
    }
    let program = &installed.programs[class.index()];
    let r = seccompiler::apply_filter(&installed.no_clone3)
        .and_then(|()| seccompiler::apply_filter(program));
    if let Err(e) = r {
        eprintln!(
            "ddvm: seccomp: a {} thread could not install its filter: {e}",
            class.name()
        );
        std::process::abort();
    }
    CLASS.with(|c| c.set(Some(class)));
    #[cfg(feature = "fault-injection")]
    probe(class);
}

/// Fault injection: the first thread of the class named by `DDVM_SECCOMP_PROBE` makes a call no
/// filter allows (`getppid`) right after installing its filter, so a test can watch what the
/// mode does with it.
#[cfg(feature = "fault-injection")]
fn probe(class: ThreadClass) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static PROBED: AtomicBool = AtomicBool::new(false);
    let wanted = std::env::var("DDVM_SECCOMP_PROBE").ok();
    if wanted.as_deref() != Some(class.key()) || PROBED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: getppid takes no argument and cannot fail.
    let r = unsafe { libc::syscall(libc::SYS_getppid) };
    eprintln!(
        "ddvm: seccomp probe: a {} thread called getppid and the call returned {r}",
        class.name()
    );
}

/// Which filter the calling thread holds.
pub fn current() -> Option<ThreadClass> {
    CLASS.with(|c| c.get())
}

/// Threads of this process, and how many of them hold a seccomp filter (`Seccomp: 2` in
/// `/proc/self/task/TID/status`).
pub fn filtered_threads() -> std::io::Result<(usize, usize)> {
    let mut threads = 0;
    let mut filtered = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let status = match std::fs::read_to_string(task?.path().join("status")) {
            Ok(s) => s,
            // The thread ended while we looked.
            Err(_) => continue,
        };
        threads += 1;
        if status
            .lines()
            .any(|l| l.strip_prefix("Seccomp:").map(str::trim) == Some("2"))
        {
            filtered += 1;
        }
    }
    Ok((threads, filtered))
}

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
    // calls async-signal-safe functions (write, _exit) and reads a const thread-local.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        act.sa_sigaction = handler as usize;
        act.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "installing the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Writes `n` in decimal into the end of `buf`; returns where it starts.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return i;
        }
    }
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The system call number: `si_syscall`, an int after the signal's three ints, its padding
    // and `si_call_addr` (offset 24 on x86-64).
    // SAFETY: the kernel passes a valid siginfo for SIGSYS with SA_SIGINFO; offset 24 is inside
    // its 128 bytes.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let class = CLASS
        .with(|c| c.get())
        .map_or("new (under its parent's filter)", |c| c.name());
    let mut digits = [0u8; 20];
    let start = decimal(nr.max(0) as u64, &mut digits);
    let parts: [&[u8]; 5] = [
        b"ddvm: seccomp: a ",
        class.as_bytes(),
        b" thread made system call ",
        &digits[start..],
        b", which its filter forbids (see ausyscall or asm/unistd_64.h); stopping\n",
    ];
    for p in parts {
        // SAFETY: writes a valid buffer to stderr; write is allowed in every class.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(EXIT_FORBIDDEN_CALL) };
}

#[cfg(test)]
mod tests;
