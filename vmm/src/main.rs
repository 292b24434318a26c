//! The `ddvm` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ddvm::blk::Backend;
use ddvm::config::Config;
use ddvm::console::Echo;
use ddvm::domain::{Domain, DomainConfig};
use ddvm::host_channel::HostChannel;
use ddvm::hypervisor::{Hypervisor, DEFAULT_KVM_PATH};
use ddvm::loader::Image;
use ddvm::stop::Stop;
use ddvm::testclient::{self, Workload};
use ddvm::topology::Topology;
use ddvm::vcpu::{GuestExit, RunState};

/// What each exit status means (`--help`, the README).
const EXIT_CODES: &str = "Exit status:
  0  success: every client verified everything it read (demo, run, chaos)
  1  an error: the configuration, an image, KVM, a device, the control socket (one line on stderr)
  2  a usage error: an unknown option, a bad value, a bad --log filter
  3  a guest crashed, or a client saw an error, a mismatch or its link down
  4  a domain did not become ready in time
  5  ddvm chaos --strict: a target was missed (the report's targets say which)
159  a thread made a system call its seccomp filter forbids (stderr names the thread class and
     the call; see --seccomp)";

/// Exit status when a guest crashed.
const EXIT_GUEST_CRASH: u8 = 3;
/// Exit status when a guest did not become ready in time.
const EXIT_TIMEOUT: u8 = 4;
/// Exit status of `ddvm chaos --strict` when a target was missed.
const EXIT_TARGET_MISSED: u8 = 5;

#[derive(Parser)]
#[command(
    name = "ddvm",
    version,
    about = "Crash-proof device drivers: driver domains under a reincarnation server",
    after_help = EXIT_CODES
)]
struct Cli {
    /// KVM device node.
    #[arg(long, global = true, env = "DDVM_KVM", default_value = DEFAULT_KVM_PATH)]
    kvm: PathBuf,
    /// Log filter (tracing syntax), e.g. `debug`.
    /// [default: warn; for `chaos`, warn with the engine's per-fault lines left out:
    /// `warn,ddvm::reincarnation=error`, as chaos prints a progress line instead]
    #[arg(long, global = true, env = "DDVM_LOG")]
    log: Option<String>,
    /// Seccomp filters on every thread of `run`, `demo`, `chaos` and `boot`: `true` (a call a
    /// thread's filter forbids ends ddvm with status 159), `log` (the kernel logs it and lets it
    /// through), `false` (no filters).
    #[arg(long, global = true, env = "DDVM_SECCOMP", default_value = "true")]
    seccomp: ddvm::seccomp::Mode,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The built-in topology: an NVMe driver domain on an emulated controller backed by a
    /// temporary file, and two client guests running the verifying workload through it.
    Demo {
        /// Requests each client runs.
        #[arg(long, default_value_t = 40_000)]
        requests: u64,
        /// Queue depth of each client.
        #[arg(long, default_value_t = 16)]
        qd: u32,
        /// Frames the network client sends (each echoed back and verified).
        #[arg(long, default_value_t = 4_000)]
        frames: u64,
        /// Operator kills of the driver domains during the run (the disk's and the NICs', in
        /// turn; each while its clients run, each after the previous one recovered).
        #[arg(long, default_value_t = 6)]
        kills: u32,
        /// Time from one recovery to the next kill (e.g. 250ms, 1s).
        #[arg(long, default_value = "250ms", value_parser = duration_arg)]
        kill_every: Duration,
        /// Echo the guests' consoles to stderr.
        #[arg(long)]
        verbose: bool,
        /// Also write the summary as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        jail: JailArgs,
    },
    /// Start every domain of a TOML topology and run until interrupted or `--duration`.
    Run {
        /// Topology file.
        config: PathBuf,
        /// Stop after this long (e.g. 30s, 2m; a bare number is seconds; default: run until
        /// SIGINT/SIGTERM).
        #[arg(long, value_parser = duration_arg)]
        duration: Option<Duration>,
        /// Serve the control socket (JSON; see `ddvm ctl`) at this path: mode 0600, for this
        /// user and root only (a missing directory is made 0700).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Once ready, run the in-VMM test client on every domain with a device: this many
        /// verified reads and writes (4 KiB random, queue depth 16, half writes).
        #[arg(long)]
        verify: Option<u64>,
        /// With clients: also write the summary as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        jail: JailArgs,
    },
    /// Run the configured clients while injecting faults into the disk domains; report
    /// recoveries, recovery times, errors, mismatches and throughput against a fault-free run.
    Chaos {
        /// Topology file (its clients' workloads get the run's duration).
        config: PathBuf,
        /// Fault kinds, injected in turn: a comma list or `all`.
        #[arg(long, default_value = "kill")]
        faults: String,
        /// Time between faults (e.g. 100ms, 1s); a fault also waits for the domain to recover
        /// from the last one (at most 8 such periods).
        #[arg(long, default_value = "1s")]
        every: String,
        /// Length of the chaos run, and of the fault-free baseline run.
        #[arg(long, default_value = "10s")]
        duration: String,
        /// Rounds of alternating baseline and chaos segments the time is split into
        /// (default: one per 10 s, at most 6), so luck falls on both sides alike.
        #[arg(long)]
        rounds: Option<u32>,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write `PREFIX-throughput.svg` and `PREFIX-recovery.svg`.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Skip the fault-free baseline run.
        #[arg(long)]
        no_baseline: bool,
        /// Target for the recovery p99, detection to first completion (e.g. 10ms).
        #[arg(long, default_value = "10ms")]
        target_recovery_p99: String,
        /// Target for the throughput under faults, as a fraction of the baseline's.
        #[arg(long, default_value_t = ddvm_chaos_report::MIN_THROUGHPUT_RATIO)]
        target_throughput: f64,
        /// A missed target is a failure: exit status 5.
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        jail: JailArgs,
    },
    /// Talk to a running `ddvm run --control SOCKET`: status, metrics, events (or follow them),
    /// kill, restart, update, inject, stop, version. Answers are printed as JSON (metrics as
    /// Prometheus text); the exit status is 1 when the server answers with an error.
    Ctl {
        /// The control socket.
        socket: PathBuf,
        #[command(subcommand)]
        request: CtlRequest,
    },
    /// Check this host for PCI passthrough: KVM, the IOMMU, vfio-pci, the locked-memory limit
    /// and, for each ADDRESS, its driver, IOMMU group, VFIO node and reset. One line per item
    /// (ok, warn or FAIL, with what to fix); exits 1 if something needed is missing.
    Check {
        /// PCI addresses of the devices to pass through (0000:00:04.0 or 00:04.0).
        addresses: Vec<String>,
        /// Memory of a domain (it is pinned for DMA: the locked-memory limit must allow it).
        #[arg(long, default_value_t = ddvm::config::DEFAULT_MEMORY_MIB)]
        memory_mib: u64,
        /// The sysfs root (the device nodes are beside it: `/dev` for `/sys`).
        #[arg(long, default_value = ddvm::host::DEFAULT_SYSFS, hide = true)]
        sysfs: PathBuf,
    },
    /// Prove a VFIO device's isolation (a build with fault injection): the domain's DMA aimed
    /// outside its memory is blocked and reported, a retired domain's memory stays untouched
    /// by its successor's I/O, and a failed reset keeps the device from the next domain until
    /// a reset succeeds.
    Isolation {
        /// PCI address of a device bound to vfio-pci (`ddvm device bind`).
        address: String,
        /// Negative control: map the canary page where the DMA is aimed, on purpose; it must
        /// then be overwritten.
        #[arg(long)]
        control: bool,
    },
    /// Hand PCI devices to vfio-pci for passthrough, and back to their drivers.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// The hook launcher (started by ddvm itself, with its socket as standard input).
    #[command(hide = true)]
    HookLauncher,
    /// Print a shell completion script to stdout (e.g. `ddvm completions bash >
    /// /usr/share/bash-completion/completions/ddvm`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout (e.g. `ddvm man > /usr/share/man/man1/ddvm.1`).
    Man,
    /// Boot one image and wait until it stops; the exit status tells how it stopped.
    Boot {
        /// ELF image (x86-64 static executable); default: the built-in driver domain.
        image: Option<PathBuf>,
        /// RAM in MiB.
        #[arg(long, default_value_t = 16)]
        memory_mib: u64,
        /// Guest command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Channel size in KiB (0: none).
        #[arg(long, default_value_t = 1024)]
        channel_kib: u64,
        /// Give up after this long (e.g. 10s, 500ms; a bare number is seconds).
        #[arg(long, default_value = "10s", value_parser = duration_arg)]
        timeout: Duration,
        /// Stop the guest as soon as it is ready.
        #[arg(long)]
        until_ready: bool,
    },
}

/// `--jail DIR` and its options (`ddvm run`, `demo`, `chaos`).
#[derive(clap::Args)]
struct JailArgs {
    /// Run in a jail built in this empty directory: own mount, PID, network, IPC and UTS
    /// namespaces holding only what the topology needs, no capability it no longer needs,
    /// no_new_privs (needs root; docs/ARCHITECTURE.md, "Jail").
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,
    /// In the jail, run as this user id.
    #[arg(long, value_name = "UID", requires = "jail")]
    jail_uid: Option<u32>,
    /// In the jail, run as this group id (and no other group).
    #[arg(long, value_name = "GID", requires = "jail")]
    jail_gid: Option<u32>,
    /// The seccomp filters the jailed VMM installs once the jail is built (`--seccomp`).
    #[arg(skip)]
    seccomp: ddvm::seccomp::Mode,
}

impl JailArgs {
    /// Builds the jail and enters it when `--jail` is given, with what `needs` lists besides
    /// the KVM device; `Some(status)` in the process left outside once the jailed VMM ended.
    fn enter(
        &self,
        kvm: &Path,
        needs: impl FnOnce(&mut ddvm::jail::Needs) -> anyhow::Result<()>,
    ) -> anyhow::Result<Option<ExitCode>> {
        let Some(dir) = &self.jail else {
            return Ok(None);
        };
        let mut n = ddvm::jail::Needs::new(kvm);
        needs(&mut n)?;
        let opts = ddvm::jail::JailOptions {
            dir: dir.clone(),
            uid: self.jail_uid,
            gid: self.jail_gid,
        };
        Ok(match ddvm::jail::enter(&opts, n)? {
            // The hook launcher, if any, was started before the jail, outside it.
            ddvm::jail::Jailed::Inside => {
                install_filters(self.seccomp)?;
                None
            }
            ddvm::jail::Jailed::Exited(status) => Some(ExitCode::from(status)),
        })
    }
}

/// The requests of `ddvm ctl SOCKET`.
#[derive(Subcommand)]
enum CtlRequest {
    /// Each domain's state, epoch, recoveries (and their p50/p90/p99), standbys, requests in
    /// flight and queued, the supervisor's status; each device's requests, bytes, errors,
    /// latency percentiles and VM exits; the seccomp filters.
    Status,
    /// Counters and gauges of every domain and device, as Prometheus text (exposition format
    /// 0.0.4), or JSON with `--json`.
    Metrics {
        /// JSON instead of Prometheus text.
        #[arg(long)]
        json: bool,
    },
    /// The events logged since SINCE (a sequence number; default 0: all kept); with
    /// `--follow`, then every new event as it happens, one JSON line each, until the VMM
    /// stops (or the reader lags too far behind: exit status 1).
    Events {
        /// The first sequence number wanted.
        since: Option<u64>,
        /// Keep the connection and print each new event as it happens.
        #[arg(long, short)]
        follow: bool,
    },
    /// Kill DOMAIN's driver domain as a failure would (it is recovered).
    Kill {
        /// The domain.
        domain: String,
    },
    /// Restart DOMAIN's driver domain (an operator restart, not a failure).
    Restart {
        /// The domain.
        domain: String,
    },
    /// Restart DOMAIN's driver domain on IMAGE (a regular file of at most 64 MiB), and
    /// restart it on IMAGE from now on.
    Update {
        /// The domain.
        domain: String,
        /// The new image.
        image: PathBuf,
    },
    /// Inject FAULT into DOMAIN (a build with fault injection; see `ddvm chaos --faults`).
    Inject {
        /// The domain.
        domain: String,
        /// The fault kind.
        fault: String,
        /// The fault's argument (0: its default).
        arg: Option<u32>,
    },
    /// End the run, as SIGTERM does (in order: every disk flushed and shut down).
    Stop,
    /// This client's version and the server's (ddvm's version and the protocol's).
    Version,
}

#[derive(Subcommand)]
enum DeviceAction {
    /// Bind devices to vfio-pci (driver_override, unbind, drivers_probe), remembering their
    /// drivers in /run/ddvm/devices; the members of one IOMMU group go together.
    Bind {
        /// PCI addresses (0000:00:04.0 or 00:04.0).
        #[arg(required = true)]
        addresses: Vec<String>,
        /// The sysfs root (the device nodes are beside it: `/dev` for `/sys`).
        #[arg(long, default_value = ddvm::host::DEFAULT_SYSFS, hide = true)]
        sysfs: PathBuf,
    },
    /// Give devices bound with `bind` back to the drivers they had (none if they had none).
    Unbind {
        /// PCI addresses (0000:00:04.0 or 00:04.0).
        #[arg(required = true)]
        addresses: Vec<String>,
        /// The sysfs root (the device nodes are beside it: `/dev` for `/sys`).
        #[arg(long, default_value = ddvm::host::DEFAULT_SYSFS, hide = true)]
        sysfs: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = cli.log.clone().unwrap_or_else(|| {
        match cli.command {
            // Faults are the point of a chaos run: a progress line counts them instead of a
            // warning for each.
            Command::Chaos { .. } => "warn,ddvm::reincarnation=error",
            _ => "warn",
        }
        .to_string()
    });
    let filter = match tracing_subscriber::EnvFilter::try_new(&log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "ddvm: error: --log (or DDVM_LOG) {log:?}: {e}; expected a tracing filter such as `warn` or `info,ddvm::net=debug`"
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a pipe or a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes joined, most specific last; a cause that an
            // error's own message already spells out is not repeated.
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !line.contains(&cause) {
                    line.push_str(": ");
                    line.push_str(&cause);
                }
            }
            eprintln!("ddvm: error: {line}");
            ExitCode::FAILURE
        }
    }
}

/// Tells the service manager (systemd's `Type=notify`, through `$NOTIFY_SOCKET`) how the run
/// stands: ready once every domain is ready and the clients run, stopping when the orderly
/// stop begins. Nothing without `$NOTIFY_SOCKET`; a failure is a warning, not the run's end.
fn notify_service_manager(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("telling the service manager ($NOTIFY_SOCKET): {e}");
    }
}

/// A duration option: a number and a unit (`500ms`, `1.5s`, `2m`), or a bare number of
/// seconds, as every command takes them.
fn duration_arg(s: &str) -> Result<Duration, String> {
    ddvm_chaos_report::parse_duration(s).map_err(|e| e.to_string())
}

/// Starts the hook launcher for `hooks`, when there are any: the one process of ddvm's that may
/// start programs, in the namespaces ddvm started in (a jail is built after it).
fn start_hook_launcher(hooks: Vec<ddvm_recovery::hook::Hook>) -> anyhow::Result<()> {
    if !hooks.is_empty() {
        let mut command = std::process::Command::new("/proc/self/exe");
        command.arg("hook-launcher");
        let launcher = ddvm::launcher::Launcher::start(command, hooks)
            .context("starting the hook launcher")?;
        ddvm_recovery::hook::use_launcher(Box::new(launcher));
    }
    Ok(())
}

/// Installs the main thread's seccomp filter; every thread started after this installs its own
/// class's.
fn install_filters(mode: ddvm::seccomp::Mode) -> anyhow::Result<()> {
    ddvm::seccomp::install(mode).map_err(|e| anyhow::anyhow!("seccomp: {e}"))?;
    ddvm::seccomp::enter(ddvm::seccomp::ThreadClass::Main);
    Ok(())
}

/// The restart hooks a topology file configures (none when it does not load: the command
/// reports that itself).
fn config_hooks(file: &Path) -> Vec<ddvm_recovery::hook::Hook> {
    let Ok(config) = Config::load(file) else {
        return Vec::new();
    };
    let mut hooks: Vec<ddvm_recovery::hook::Hook> = Vec::new();
    for d in &config.domains {
        if let Some(h) = d.recovery.to_policy().ok().and_then(|p| p.restart.hook) {
            if !hooks.contains(&h) {
                hooks.push(h);
            }
        }
    }
    hooks
}

fn run(mut cli: Cli) -> anyhow::Result<ExitCode> {
    match &mut cli.command {
        // Jailed: the filters go on once the jail is built (mounts and namespaces are calls
        // no filter allows), by the jailed VMM (`JailArgs::enter`).
        Command::Demo { jail, .. } if jail.jail.is_some() => jail.seccomp = cli.seccomp,
        Command::Run { jail, config, .. } | Command::Chaos { jail, config, .. }
            if jail.jail.is_some() =>
        {
            jail.seccomp = cli.seccomp;
            start_hook_launcher(config_hooks(config))?;
        }
        Command::Demo { .. } | Command::Boot { .. } => install_filters(cli.seccomp)?,
        Command::Run { config, .. } | Command::Chaos { config, .. } => {
            start_hook_launcher(config_hooks(config))?;
            install_filters(cli.seccomp)?
        }
        Command::HookLauncher => {
            use std::os::fd::AsFd;
            let socket = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .context("the hook launcher's socket")?;
            ddvm::launcher::serve(std::os::unix::net::UnixStream::from(socket))
                .context("the hook launcher")?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    match cli.command {
        Command::Demo {
            requests,
            qd,
            frames,
            kills,
            kill_every,
            verbose,
            json,
            jail,
        } => demo(
            &cli.kvm,
            &jail,
            DemoOptions {
                requests,
                qd,
                frames,
                kills,
                kill_every,
                verbose,
                json: json.as_deref(),
            },
        ),
        Command::Run {
            config,
            duration,
            control,
            verify,
            json,
            jail,
        } => run_config(
            &cli.kvm,
            &config,
            duration,
            control.as_deref(),
            verify,
            json.as_deref(),
            &jail,
        ),
        Command::Ctl { socket, request } => ctl(&socket, request),
        Command::HookLauncher => Ok(ExitCode::SUCCESS),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ddvm", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("writing the manual page")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            addresses,
            memory_mib,
            sysfs,
        } => Ok(check(&cli.kvm, &sysfs, &addresses, memory_mib)),
        Command::Device { action } => device(action),
        Command::Isolation { address, control } => {
            match ddvm::isolation::run(&cli.kvm, &address, control) {
                Ok(r) => {
                    for l in &r.lines {
                        println!("{l}");
                    }
                    Ok(if r.passed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                Err(e) => Err(e),
            }
        }
        Command::Chaos {
            config,
            faults,
            every,
            duration,
            json,
            svg,
            no_baseline,
            rounds,
            target_recovery_p99,
            target_throughput,
            strict,
            jail,
        } => {
            let duration = ddvm_chaos_report::parse_duration(&duration).context("--duration")?;
            let p99 = ddvm_chaos_report::parse_duration(&target_recovery_p99)
                .context("--target-recovery-p99")?;
            if !(target_throughput.is_finite() && target_throughput >= 0.0) {
                anyhow::bail!(
                    "--target-throughput {target_throughput}: expected a fraction of the baseline's throughput, 0 or more (e.g. 0.95)"
                );
            }
            let targets = ChaosTargets {
                recovery_p99: p99,
                throughput: target_throughput,
                strict,
            };
            let plan = ddvm::chaos::ChaosPlan {
                faults: ddvm_recovery::fault::parse_fault_list(&faults).context("--faults")?,
                every: ddvm_chaos_report::parse_duration(&every).context("--every")?,
                duration,
                skip_baseline: no_baseline,
                rounds: rounds
                    .unwrap_or_else(|| ddvm::chaos::ChaosPlan::default_rounds(duration))
                    .max(1),
            };
            chaos(
                &cli.kvm,
                &config,
                &plan,
                &targets,
                json.as_deref(),
                svg.as_deref(),
                &jail,
            )
        }
        Command::Boot {
            image,
            memory_mib,
            cmdline,
            channel_kib,
            timeout,
            until_ready,
        } => {
            let image = match image {
                Some(p) => Image::from_file(&p)?,
                None => ddvm::builtin_driver_domain(),
            };
            let cfg = DomainConfig {
                name: "dd0".into(),
                image,
                memory: memory_mib << 20,
                cmdline,
                channel_size: channel_kib << 10,
                echo: Echo::Stderr,
                device: None,
            };
            boot_one(&cli.kvm, &cfg, timeout, until_ready)
        }
    }
}

/// `ddvm check`: prints one line per item; 1 if any failed.
fn check(kvm: &Path, sysfs: &Path, addresses: &[String], memory_mib: u64) -> ExitCode {
    let kvm_facts = Hypervisor::open(kvm)
        .map_err(|e| e.to_string())
        .and_then(|hv| {
            ddvm::vm::probe_platform(&hv)
                .map(|p| (kvm.to_path_buf(), p))
                .map_err(|e| format!("{}: cannot create a VM: {e}", kvm.display()))
        });
    let facts = ddvm::host::HostFacts::of_process(kvm_facts, memory_mib << 20);
    let lines = ddvm::host::Host::new(sysfs).check(&facts, addresses);
    for l in &lines {
        println!("{l}");
    }
    if lines.iter().any(|l| l.status == ddvm::host::Status::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `ddvm device bind|unbind`.
fn device(action: DeviceAction) -> anyhow::Result<ExitCode> {
    match action {
        DeviceAction::Bind { addresses, sysfs } => {
            let host = ddvm::host::Host::new(&sysfs);
            for b in host.bind(&addresses)? {
                let node = host.vfio_node(b.group);
                if b.already {
                    println!(
                        "ddvm: {} already bound to vfio-pci, IOMMU group {}, {}",
                        b.address,
                        b.group,
                        node.display()
                    );
                } else {
                    println!(
                        "ddvm: {} bound to vfio-pci (was: {}), IOMMU group {}, {}",
                        b.address,
                        b.previous.as_deref().unwrap_or("no driver"),
                        b.group,
                        node.display()
                    );
                }
            }
        }
        DeviceAction::Unbind { addresses, sysfs } => {
            for u in ddvm::host::Host::new(&sysfs).unbind(&addresses)? {
                let driver = u.driver.as_deref().unwrap_or("no driver");
                if u.changed {
                    println!("ddvm: {} unbound from vfio-pci, now: {driver}", u.address);
                } else {
                    println!(
                        "ddvm: {} was not bound to vfio-pci (driver: {driver}); nothing to undo",
                        u.address
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open_kvm(path: &Path) -> anyhow::Result<Hypervisor> {
    Ok(Hypervisor::open(path)?)
}

fn boot_one(
    kvm: &Path,
    cfg: &DomainConfig,
    timeout: Duration,
    until_ready: bool,
) -> anyhow::Result<ExitCode> {
    // Check the image before touching KVM: a bad image is the user's first problem to know.
    cfg.image.check(ddvm_abi::layout::IMAGE_BASE, u64::MAX)?;
    let hv = open_kvm(kvm)?;
    let mut domain = Domain::boot(&hv, cfg, 1)?;
    println!(
        "ddvm: domain {} booting on {} (entry {:#x})",
        domain.name(),
        domain.platform().name(),
        domain.loaded().entry
    );
    if until_ready {
        return match domain.wait_ready(timeout) {
            Ok(t) => {
                println!("ddvm: domain {} ready in {:.3} ms", domain.name(), ms(t));
                domain.stop();
                Ok(ExitCode::SUCCESS)
            }
            Err(RunState::Stopped(exit)) => Ok(report_exit(&domain, &exit)),
            Err(_) => {
                eprintln!("ddvm: domain {} not ready after {timeout:?}", domain.name());
                Ok(ExitCode::from(EXIT_TIMEOUT))
            }
        };
    }
    match domain.wait_stopped(timeout) {
        Some(exit) => Ok(report_exit(&domain, &exit)),
        None => {
            domain.stop();
            eprintln!(
                "ddvm: domain {} still running after {timeout:?}; stopped it",
                domain.name()
            );
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
    }
}

fn report_exit(domain: &Domain, exit: &GuestExit) -> ExitCode {
    println!(
        "ddvm: domain {} {} [reason={}]",
        domain.name(),
        exit,
        exit.reason()
    );
    if exit.is_crash() {
        ExitCode::from(EXIT_GUEST_CRASH)
    } else {
        ExitCode::SUCCESS
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `ddvm demo`'s options.
struct DemoOptions<'a> {
    requests: u64,
    qd: u32,
    frames: u64,
    kills: u32,
    kill_every: Duration,
    verbose: bool,
    json: Option<&'a Path>,
}

fn demo(kvm: &Path, jail: &JailArgs, opts: DemoOptions<'_>) -> anyhow::Result<ExitCode> {
    let DemoOptions {
        requests,
        qd,
        frames,
        kills,
        kill_every,
        verbose,
        json,
    } = opts;
    let disk = ddvm::topology::demo_disk_path();
    let text = ddvm::demo::topology(&disk, requests, qd, frames);
    let file = Path::new("builtin:demo.toml");
    let config = Config::parse(file, &text)?;
    let jailed = jail.enter(kvm, |n| {
        n.topology(&config, file)?;
        json.iter().for_each(|p| n.output(p, "--json"));
        Ok(())
    });
    match jailed {
        Ok(None) => {}
        // Outside the jail: the temporary disk is removed here (inside, it is a mount point).
        done => {
            let _ = std::fs::remove_file(&disk);
            return done.map(|s| s.unwrap_or(ExitCode::FAILURE));
        }
    }
    println!(
        "ddvm demo: an NVMe driver domain (emulated controller on {}) serving two client guests, each running {requests} verified 4 KiB requests (70% reads, queue depth {qd}); two NIC driver domains (emulated e1000s joined by a wire) carrying {frames} verified frames between two more clients; {kills} operator kills of the driver domains, in turn, while the clients run",
        disk.display()
    );
    let hv = Arc::new(open_kvm(kvm)?);
    let echo = if verbose { Echo::Stderr } else { Echo::Off };
    let stop = Stop::on_signals();
    let plan = KillPlan {
        count: kills,
        every: kill_every,
    };
    let opts = TopologyRun {
        echo,
        duration: None,
        control: None,
        kills: Some(plan),
        json,
    };
    let result = run_topology(&hv, &config, file, opts, &stop);
    let _ = std::fs::remove_file(&disk);
    result
}

/// How [`run_topology`] runs a topology.
struct TopologyRun<'a> {
    /// Where the guests' consoles go.
    echo: Echo,
    /// Stop after this many seconds.
    duration: Option<Duration>,
    /// Serve the control socket here.
    control: Option<&'a Path>,
    /// Kill the domains on this plan while the clients run.
    kills: Option<KillPlan>,
    /// Also write the summary as JSON here.
    json: Option<&'a Path>,
}

/// Operator kills made while a topology's clients run (the demo).
struct KillPlan {
    count: u32,
    every: Duration,
}

fn ctl(socket: &Path, request: CtlRequest) -> anyhow::Result<ExitCode> {
    use serde_json::json;
    let context = || format!("control socket {}", socket.display());
    let req = match request {
        CtlRequest::Status => json!({"cmd": "status"}),
        CtlRequest::Metrics { json } => json!({
            "cmd": "metrics",
            "format": if json { "json" } else { "prometheus" },
        }),
        CtlRequest::Events {
            since,
            follow: true,
        } => {
            use std::io::Write;
            let end = ddvm::control::follow(socket, since.unwrap_or(0), |event| {
                let mut out = std::io::stdout().lock();
                // A reader that went away (a closed pipe) ends the stream.
                writeln!(out, "{event}").and_then(|()| out.flush()).is_ok()
            })
            .with_context(context)?;
            return Ok(match end {
                Some(last) if last["ok"] == false => {
                    println!("{}", serde_json::to_string_pretty(&last)?);
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            });
        }
        CtlRequest::Events { since, .. } => json!({"cmd": "events", "since": since.unwrap_or(0)}),
        CtlRequest::Kill { domain } => json!({"cmd": "kill", "domain": domain}),
        CtlRequest::Restart { domain } => json!({"cmd": "restart", "domain": domain}),
        // The server resolves a relative path from its own directory: send an absolute one.
        CtlRequest::Update { domain, image } => json!({
            "cmd": "update",
            "domain": domain,
            "image": std::path::absolute(&image)
                .with_context(|| format!("update IMAGE {}", image.display()))?,
        }),
        CtlRequest::Inject { domain, fault, arg } => {
            json!({"cmd": "inject", "domain": domain, "fault": fault, "arg": arg.unwrap_or(0)})
        }
        CtlRequest::Stop => json!({"cmd": "stop"}),
        CtlRequest::Version => {
            println!(
                "client: ddvm {}, control protocol {}",
                env!("CARGO_PKG_VERSION"),
                ddvm::control::PROTOCOL_VERSION
            );
            let a =
                ddvm::control::request(socket, &json!({"cmd": "version"})).with_context(context)?;
            if a["ok"] != true {
                println!("{}", serde_json::to_string_pretty(&a)?);
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "server: ddvm {}, control protocol {}",
                a["ddvm"].as_str().unwrap_or("unknown"),
                a["protocol"]
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    let answer = ddvm::control::request(socket, &req).with_context(context)?;
    if answer["ok"] == true && answer["format"] == "prometheus" {
        print!("{}", answer["text"].as_str().unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(if answer["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `ddvm chaos` checks its run against.
struct ChaosTargets {
    recovery_p99: Duration,
    throughput: f64,
    /// A missed target sets the exit status.
    strict: bool,
}

fn chaos(
    kvm: &Path,
    file: &Path,
    plan: &ddvm::chaos::ChaosPlan,
    targets: &ChaosTargets,
    json: Option<&Path>,
    svg: Option<&Path>,
    jail: &JailArgs,
) -> anyhow::Result<ExitCode> {
    if !ddvm::chaos::ENABLED {
        return Err(ddvm::chaos::ChaosError::Disabled.into());
    }
    let config = Config::load(file)?;
    let plots = svg.map(|prefix| {
        let named = |what: &str| {
            prefix.with_file_name(format!(
                "{}-{what}.svg",
                prefix.file_name().unwrap_or_default().to_string_lossy()
            ))
        };
        (named("throughput"), named("recovery"))
    });
    let jailed = jail.enter(kvm, |n| {
        n.topology(&config, file)?;
        json.iter().for_each(|p| n.output(p, "--json"));
        for p in plots.iter().flat_map(|(t, h)| [t, h]) {
            n.output(p, "--svg");
        }
        Ok(())
    })?;
    if let Some(status) = jailed {
        return Ok(status);
    }
    let hv = Arc::new(open_kvm(kvm)?);
    println!(
        "ddvm chaos: {} fault(s) every {:?} for {:?} ({})",
        plan.faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(","),
        plan.every,
        plan.duration,
        if plan.skip_baseline {
            "no baseline".to_string()
        } else {
            format!(
                "against a fault-free baseline of the same length, in {} alternating round(s)",
                plan.rounds
            )
        }
    );
    // SIGINT or SIGTERM ends the run early: the report covers what ran.
    let stop = Stop::on_signals();
    let started = ddvm::chaos::run_info("unknown");
    let mut report = ddvm::chaos::run(&hv, &config, file, plan, &stop)?;
    report.run = ddvm_chaos_report::RunInfo {
        platform: report.run.platform.clone(),
        ..started
    };
    report.target_recovery_p99_ms = targets.recovery_p99.as_secs_f64() * 1e3;
    report.target_throughput_ratio = targets.throughput;
    report.targets = report.targets();
    if report.stopped {
        println!("ddvm chaos: stopped on request; the report covers what ran before");
    }
    print!("{}", report.table());
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("report: {}", p.display());
    }
    if let Some((t, h)) = plots {
        std::fs::write(&t, report.throughput_svg())
            .with_context(|| format!("writing {}", t.display()))?;
        std::fs::write(&h, report.recovery_histogram_svg())
            .with_context(|| format!("writing {}", h.display()))?;
        println!("plots: {} {}", t.display(), h.display());
    }
    let clean = report.client_errors == 0 && report.mismatches == 0;
    let missed: Vec<&str> = report
        .targets
        .iter()
        .filter(|t| !t.pass)
        .map(|t| t.name.as_str())
        .collect();
    Ok(if !clean {
        ExitCode::from(EXIT_GUEST_CRASH)
    } else if targets.strict && !missed.is_empty() {
        println!(
            "ddvm chaos: --strict: target(s) missed: {}",
            missed.join(", ")
        );
        ExitCode::from(EXIT_TARGET_MISSED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs a topology with clients until they finish (or `duration`), then prints a summary.
fn run_topology(
    hv: &Arc<Hypervisor>,
    config: &Config,
    file: &Path,
    opts: TopologyRun<'_>,
    stop: &Stop,
) -> anyhow::Result<ExitCode> {
    let TopologyRun {
        echo,
        duration,
        control,
        kills: kill_plan,
        json,
    } = opts;
    let t0 = Instant::now();
    let mut topo = Topology::start(hv, config, file, echo)?;
    let control = match control {
        Some(p) => Some(
            ddvm::control::ControlServer::start_with(
                p,
                topo.recovery.clone(),
                topo.io_sources(),
                Some(stop.clone()),
            )
            .with_context(|| format!("control socket {}", p.display()))?,
        ),
        None => None,
    };
    for (name, t) in &topo.ready_times {
        println!("ddvm: domain {name} ready in {:.3} ms", ms(*t));
    }
    let platform = topo
        .clients
        .first()
        .map_or("unknown", |c| c.guest().platform().name());
    let running = format!(
        "{} client(s) running on {} disk(s), KVM platform {platform}",
        topo.clients.len(),
        topo.services.len()
    );
    println!("ddvm: {running}");
    notify_service_manager(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&running),
    ]);
    // Without --duration: until the clients finish or a stop is asked for, however long.
    let timeout = duration;
    let mut kills = kill_plan.map(|p| {
        let order = [
            ddvm::demo::DISK_DOMAIN,
            ddvm::demo::NIC_DOMAINS[0],
            ddvm::demo::NIC_DOMAINS[1],
        ];
        (
            ddvm::demo::Kills::new(&topo, &order, p.count, p.every),
            ddvm::demo::Progress::new(),
        )
    });
    let outcomes = topo.wait_clients_or_stop_with(timeout, stop, |topo| {
        if let Some((k, p)) = &mut kills {
            k.tick(topo);
            p.tick(topo, k);
        }
    });
    let stopped = stop.requested();
    notify_service_manager(&[sd_notify::NotifyState::Stopping]);
    drop(control);
    let mut disks = Vec::new();
    for s in &mut topo.services {
        let c = s.counters();
        let answered = c.answered.load(Ordering::Relaxed);
        let copy_bytes = c.copy_bytes.load(Ordering::Relaxed);
        let copy_ns = c.copy_ns.load(Ordering::Relaxed);
        let name = s.name().to_string();
        let backend = s.stop();
        let (kind, exits, emul) = match &backend {
            Ok(Backend::Channel(b)) => (
                "driver domain",
                b.domain().and_then(|d| d.vcpu_stat("exits")),
                b.domain().and_then(|d| d.vcpu_stat("insn_emulation")),
            ),
            Ok(Backend::File(_)) => ("file (no isolation)", None, None),
            Err(e) => {
                println!("ddvm: disk {name}: service failed: {e}");
                ("failed", None, None)
            }
        };
        disks.push((name, kind, answered, copy_bytes, copy_ns, exits, emul));
    }
    // Every disk's stop, in order (services stopped above, then domains without clients).
    let stops = topo.stop();
    println!();
    println!(
        "{:<10} {:>8} {:>9} {:>8} {:>8} {:>8} {:>7} {:>10} {:>9}",
        "client", "ops", "IOPS", "p50 us", "p99 us", "max us", "errors", "mismatches", "verified"
    );
    let mut ok = true;
    let nets: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.net.as_ref().map(|r| (o.name.as_str(), r)))
        .collect();
    for o in &outcomes {
        match &o.report {
            Some(r) => println!(
                "{:<10} {:>8} {:>9.0} {:>8} {:>8} {:>8} {:>7} {:>10} {:>9}",
                o.name,
                r.ops,
                r.iops,
                r.lat_us.p50,
                r.lat_us.p99,
                r.lat_us.max,
                r.errors,
                r.mismatches,
                r.verified
            ),
            None if o.net.is_some() => println!("{:<10} net-echo (below)", o.name),
            None if o.tcp.is_some() => println!("{:<10} net-tcp (below)", o.name),
            None => match &o.linux {
                Some(l) => println!(
                    "{:<10} Linux {} on {} CPUs, {} disk queues: {} checks, {} failed; {} MiB verified in {} rounds, {} O_DIRECT blocks ({} from every CPU at once)",
                    o.name, l.kernel, l.cpus, l.queues, l.checks, l.failed, l.verified_mib, l.rounds, l.direct_blocks, l.cpu_blocks
                ),
                None => println!("{:<10} (no report)", o.name),
            },
        }
        if let Some(e) = o.linux.as_ref().and_then(|l| l.first_error.as_ref()) {
            println!("{:<10} first failed check: {e}", "");
        }
        if let Some(e) = o.report.as_ref().and_then(|r| r.first_error.as_ref()) {
            println!("{:<10} first error: {e}", "");
        }
        if let Some(e) = o.net.as_ref().and_then(|r| r.first_error.as_ref()) {
            println!("{:<10} first error: {e}", "");
        }
        if let Some(e) = o.tcp.as_ref().and_then(|r| r.first_error.as_ref()) {
            println!("{:<10} first error: {e}", "");
        }
        match &o.exit {
            Some(GuestExit::Exited { status: 0 }) => {}
            Some(e) => println!("{:<10} {e}", ""),
            None if stopped => println!("{:<10} stopped on request before it finished", ""),
            None => println!(
                "{:<10} still running after {:?}; stopped",
                "",
                timeout.unwrap_or_default()
            ),
        }
        // A client stopped on request is not a failure; one that reported errors is.
        ok &= o.ok() || (stopped && o.exit.is_none());
    }
    if !nets.is_empty() {
        println!();
        println!(
            "{:<10} {:<5} {:>8} {:>8} {:>7} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9}",
            "client",
            "role",
            "frames",
            "frames/s",
            "retries",
            "dupes",
            "corrupt",
            "p50 us",
            "p99 us",
            "max us",
            "errors",
            "link_down"
        );
        for (name, r) in &nets {
            println!(
                "{:<10} {:<5} {:>8} {:>8} {:>7} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9}",
                name,
                r.role,
                r.frames,
                r.frames_s,
                r.retries,
                r.duplicates,
                r.corrupt,
                r.rtt_us.p50,
                r.rtt_us.p99,
                r.rtt_us.max,
                r.errors,
                r.link_down
            );
        }
    }
    let tcps: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.tcp.as_ref().map(|r| (o.name.as_str(), r)))
        .collect();
    if !tcps.is_empty() {
        println!();
        println!(
            "{:<10} {:<6} {:<4} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>7} {:>7} {:>9}",
            "client",
            "role",
            "mode",
            "bytes",
            "tx MB/s",
            "rx MB/s",
            "p50 us",
            "p99 us",
            "retrans",
            "resets",
            "corrupt",
            "timeout",
            "link_down"
        );
        for (name, r) in &tcps {
            println!(
                "{:<10} {:<6} {:<4} {:>10} {:>8.2} {:>8.2} {:>8} {:>8} {:>7} {:>6} {:>7} {:>7} {:>9}",
                name,
                r.role,
                r.mode,
                r.verified,
                r.tx_mb_s,
                r.rx_mb_s,
                r.rtt_us.p50,
                r.rtt_us.p99,
                r.retransmits,
                r.resets,
                r.corrupt,
                r.timeout,
                r.link_down
            );
        }
    }
    println!();
    for (name, kind, answered, copy_bytes, copy_ns, exits, emul) in &disks {
        print!("disk {name} ({kind}): {answered} requests answered");
        if *copy_bytes > 0 {
            print!(
                ", {:.1} MiB copied at {:.2} GiB/s",
                *copy_bytes as f64 / (1 << 20) as f64,
                *copy_bytes as f64 / (*copy_ns).max(1) as f64 / 1.073_741_824
            );
        }
        if let Some(e) = exits {
            print!(
                ", domain VM exits {e} ({:.2}/request)",
                *e as f64 / (*answered).max(1) as f64
            );
        }
        if let Some(e) = emul {
            print!(", insn_emulation {e}");
        }
        println!();
    }
    for r in &stops {
        println!("ddvm: {r}");
        ok &= r.clean();
    }
    let mut kill_rows = Vec::new();
    if let Some((k, _)) = &kills {
        println!();
        println!(
            "{:<10} {:>6} {:>10} {:>13} {:>13} {:>13}",
            "domain", "kills", "recovered", "recovery p50", "recovery p99", "recovery max"
        );
        let ms_of = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} ms", ms(d)));
        let mut all = ddvm_recovery::events::Samples::default();
        let (mut made, mut recovered) = (0u64, 0u64);
        for d in k.results() {
            println!(
                "{:<10} {:>6} {:>10} {:>13} {:>13} {:>13}",
                d.name,
                d.kills,
                d.recovered,
                ms_of(d.recovery.p50()),
                ms_of(d.recovery.p99()),
                ms_of(d.recovery.max())
            );
            let us = |d: Option<Duration>| d.map(|d| d.as_micros() as u64);
            kill_rows.push(serde_json::json!({
                "domain": d.name,
                "kills": d.kills,
                "recovered": d.recovered,
                "recovery_p50_us": us(d.recovery.p50()),
                "recovery_p99_us": us(d.recovery.p99()),
                "recovery_max_us": us(d.recovery.max()),
            }));
            made += u64::from(d.kills);
            recovered += d.recovered;
            for t in d.recovery.iter() {
                all.push(t);
            }
        }
        // Every kill must have been recovered: a kill whose clients stopped first is not
        // made (see ddvm::demo::Kills); a stop asked for right after a kill may leave that
        // one without the client request that would end its recovery.
        let owed = made - u64::from(stopped && k.pending());
        ok &= recovered >= owed;
        // The NICs' clients must never have seen their link go down.
        let link_down: u64 = nets.iter().map(|(_, r)| r.link_down).sum();
        ok &= link_down == 0;
        println!(
            "ddvm: {made} kill(s) of the driver domains, {recovered} recovered (p50 {}, p99 {}); the clients saw {}",
            ms_of(all.p50()),
            ms_of(all.p99()),
            if ok { "no error, no mismatch and no link down" } else { "a failure (above)" }
        );
    }
    if let Some(path) = json {
        let clients: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|o| {
                serde_json::json!({
                    "name": o.name,
                    "exit": o.exit.as_ref().map(|e| e.to_string()),
                    "ok": o.ok(),
                    "workload": o.report,
                    "net_echo": o.net,
                    "net_tcp": o.tcp,
                    "linux": o.linux,
                })
            })
            .collect();
        let disk_rows: Vec<serde_json::Value> = disks
            .iter()
            .map(|(name, kind, answered, copy_bytes, _, exits, _)| {
                serde_json::json!({
                    "name": name,
                    "backend": kind,
                    "answered": answered,
                    "copy_bytes": copy_bytes,
                    "domain_exits": exits,
                })
            })
            .collect();
        let summary = serde_json::json!({
            "ddvm_version": env!("CARGO_PKG_VERSION"),
            "config": file.display().to_string(),
            "platform": platform,
            "elapsed_s": t0.elapsed().as_secs_f64(),
            "stopped": stopped,
            "ok": ok,
            "clients": clients,
            "disks": disk_rows,
            "stops": stops.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            "kills": kill_rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    println!(
        "ddvm: {} in {:.2} s",
        if ok && stopped {
            "stopped on request; every client that finished verified every block it read"
        } else if ok {
            "every client verified every block it read"
        } else {
            "FAILED: a client saw an error or a mismatch"
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_GUEST_CRASH)
    })
}

/// Runs the in-VMM test client on `d`; returns whether every byte verified.
fn verify_domain(d: &Domain, ch: &mut HostChannel, requests: u64) -> anyhow::Result<bool> {
    let info = ch
        .device_info(d.memory())
        .with_context(|| format!("domain {}", d.name()))?;
    println!(
        "ddvm: domain {} device: {} MiB, {}-byte blocks, max transfer {} KiB, model {:?}",
        d.name(),
        info.capacity_sectors / 2048,
        info.block_size,
        info.max_transfer / 1024,
        String::from_utf8_lossy(&info.model).trim_end_matches(['\0', ' '])
    );
    let block_sectors = (4096 / 512).max(info.block_size / 512);
    let w = Workload {
        requests,
        queue_depth: 16,
        block_sectors,
        write_percent: 50,
        random: true,
        first_sector: 0,
        range_sectors: info.capacity_sectors.min(1 << 21),
        seed: 0x5eed,
        timeout: Duration::from_secs(10),
    };
    let r = testclient::run(d, ch, &w).with_context(|| format!("domain {}", d.name()))?;
    println!(
        "ddvm: domain {} verify: {} reads ({} of unwritten blocks), {} writes, {} errors, {} mismatches, {:.0} IOPS, p50 {:.1} us, p99 {:.1} us, {:.2} exits/request",
        d.name(),
        r.reads,
        r.unverified_reads,
        r.writes,
        r.errors,
        r.mismatches,
        r.iops(),
        r.latency(0.5).as_secs_f64() * 1e6,
        r.latency(0.99).as_secs_f64() * 1e6,
        r.exits_per_request()
    );
    if let Some(e) = &r.first_error {
        println!("ddvm: domain {} first error: {e}", d.name());
    }
    if let Some(m) = &r.first_mismatch {
        println!("ddvm: domain {} first mismatch: {m}", d.name());
    }
    Ok(r.errors == 0 && r.mismatches == 0)
}

fn run_config(
    kvm: &Path,
    file: &Path,
    duration: Option<Duration>,
    control: Option<&Path>,
    verify: Option<u64>,
    json: Option<&Path>,
    jail: &JailArgs,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(file)?;
    let jailed = jail.enter(kvm, |n| {
        n.topology(&config, file)?;
        control.iter().for_each(|p| n.socket_dir(p));
        json.iter().for_each(|p| n.output(p, "--json"));
        Ok(())
    })?;
    if let Some(status) = jailed {
        return Ok(status);
    }
    // SIGINT, SIGTERM and the control socket's `stop` end the run alike.
    let stop = Stop::on_signals();
    if !config.clients.is_empty() {
        if verify.is_some() {
            anyhow::bail!(
                "--verify: {} has clients, which verify what they read themselves; --verify runs the in-VMM test client on a topology without clients",
                file.display()
            );
        }
        let hv = Arc::new(open_kvm(kvm)?);
        return run_topology(
            &hv,
            &config,
            file,
            TopologyRun {
                echo: Echo::Stderr,
                duration,
                control,
                kills: None,
                json,
            },
            &stop,
        );
    }
    if json.is_some() {
        anyhow::bail!(
            "--json: {} has no clients; the JSON summary is of what clients saw",
            file.display()
        );
    }
    let mut cfgs = Vec::new();
    for d in &config.domains {
        let cfg = ddvm::topology::domain_config(file, d, Echo::Stderr)?;
        // Check the image before touching KVM: a bad image is the user's first problem to know.
        cfg.image.check(ddvm_abi::layout::IMAGE_BASE, u64::MAX)?;
        cfgs.push(cfg);
    }
    let hv = open_kvm(kvm)?;
    let mut domains = Vec::new();
    for cfg in &cfgs {
        let d = Domain::boot(&hv, cfg, 1).with_context(|| format!("starting {}", cfg.name))?;
        match d.wait_ready(Duration::from_secs(10)) {
            Ok(t) => println!(
                "ddvm: domain {} ready in {:.3} ms on {}",
                d.name(),
                ms(t),
                d.platform().name()
            ),
            Err(RunState::Stopped(exit)) => {
                let code = report_exit(&d, &exit);
                return Ok(code);
            }
            Err(_) => anyhow::bail!("domain {} did not become ready within 10 s", cfg.name),
        }
        domains.push(d);
    }
    let mut crashed = false;
    // The VMM's side of each domain's channel, kept for the stop's FLUSH and SHUTDOWN.
    let mut channels: Vec<Option<HostChannel>> = domains
        .iter()
        .map(|d| {
            let header = d
                .channel_header()
                .filter(|h| h.class == ddvm_abi::channel::class::BLK)?;
            Some(HostChannel::new(d.channel()?, header))
        })
        .collect();
    if let Some(requests) = verify {
        for (d, ch) in domains.iter().zip(&mut channels) {
            let Some(ch) = ch.as_mut().filter(|_| d.device().is_some()) else {
                continue;
            };
            if !verify_domain(d, ch, requests)? {
                crashed = true;
            }
        }
    }
    // Domains without clients have no recovery handles: the socket serves status and stop.
    let control = match control {
        Some(p) => Some(
            ddvm::control::ControlServer::start_with(p, Vec::new(), Vec::new(), Some(stop.clone()))
                .with_context(|| format!("control socket {}", p.display()))?,
        ),
        None => None,
    };
    notify_service_manager(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("{} domain(s) running", domains.len())),
    ]);
    let deadline = duration.map(|d| Instant::now() + d);
    let mut ended = false;
    while !ended && !stop.requested() && deadline.is_none_or(|d| Instant::now() < d) {
        stop.sleep(Duration::from_millis(20));
        for d in &domains {
            if let RunState::Stopped(exit) = d.state() {
                report_exit(d, &exit);
                crashed |= exit.is_crash();
                ended = true;
            }
        }
    }
    if stop.requested() {
        println!("ddvm: stopped on request");
    }
    notify_service_manager(&[sd_notify::NotifyState::Stopping]);
    drop(control);
    for (d, ch) in domains.iter_mut().zip(&mut channels) {
        if let Some(r) = ddvm::stop::domain_without_clients(d, ch.as_mut()) {
            println!("ddvm: {r}");
            crashed |= !r.clean();
        }
        d.stop();
    }
    println!("ddvm: stopped {} domain(s)", domains.len());
    Ok(if crashed {
        ExitCode::from(EXIT_GUEST_CRASH)
    } else {
        ExitCode::SUCCESS
    })
}
