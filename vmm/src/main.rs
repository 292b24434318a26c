//! The `ddvm` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ddvm::channel::HostChannel;
use ddvm::config::{Config, DeviceSection};
use ddvm::console::Echo;
use ddvm::domain::{DeviceSpec, Domain, DomainConfig};
use ddvm::hypervisor::{Hypervisor, DEFAULT_KVM_PATH};
use ddvm::loader::Image;
use ddvm::testclient::{self, Workload};
use ddvm::vcpu::{DomainExit, RunState};
use ddvm_passthrough::NvmeConfig;

/// Exit status when a guest crashed.
const EXIT_GUEST_CRASH: u8 = 3;
/// Exit status when a guest did not become ready in time.
const EXIT_TIMEOUT: u8 = 4;

#[derive(Parser)]
#[command(
    name = "ddvm",
    version,
    about = "Crash-proof device drivers: driver domains under a reincarnation server"
)]
struct Cli {
    /// KVM device node.
    #[arg(long, global = true, env = "DDVM_KVM", default_value = DEFAULT_KVM_PATH)]
    kvm: PathBuf,
    /// Log filter (tracing syntax), e.g. `debug`.
    #[arg(long, global = true, env = "DDVM_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the built-in driver domain, watch it heartbeat, and report.
    Demo {
        /// How long to watch the domain after it is ready, in milliseconds.
        #[arg(long, default_value_t = 500)]
        watch_ms: u64,
        /// Also print every non-zero KVM statistic of the vCPU at the ready mark.
        #[arg(long)]
        stats: bool,
    },
    /// Start every domain of a TOML topology and run until interrupted or `--duration`.
    Run {
        /// Topology file.
        config: PathBuf,
        /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
        #[arg(long)]
        duration: Option<f64>,
        /// Once ready, run the in-VMM test client on every domain with a device: this many
        /// verified reads and writes (4 KiB random, queue depth 16, half writes).
        #[arg(long)]
        verify: Option<u64>,
    },
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
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Stop the guest as soon as it is ready.
        #[arg(long)]
        until_ready: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes joined, most specific last.
            eprintln!("ddvm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo { watch_ms, stats } => demo(&cli.kvm, Duration::from_millis(watch_ms), stats),
        Command::Run {
            config,
            duration,
            verify,
        } => run_config(&cli.kvm, &config, duration, verify),
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
            boot_one(
                &cli.kvm,
                &cfg,
                Duration::from_secs_f64(timeout),
                until_ready,
            )
        }
    }
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

fn report_exit(domain: &Domain, exit: &DomainExit) -> ExitCode {
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

fn demo(kvm: &Path, watch: Duration, show_stats: bool) -> anyhow::Result<ExitCode> {
    let hv = open_kvm(kvm)?;
    let cfg = DomainConfig {
        name: "nvme0-dd".into(),
        image: ddvm::builtin_driver_domain(),
        memory: 16 << 20,
        cmdline: String::new(),
        channel_size: 1 << 20,
        echo: Echo::Stderr,
        device: None,
    };
    println!(
        "ddvm demo: booting the built-in driver domain ({} KiB image)",
        ddvm_images::DRIVER_DOMAIN.len() / 1024
    );
    let mut domain = Domain::boot(&hv, &cfg, 1)?;
    let ready = match domain.wait_ready(Duration::from_secs(10)) {
        Ok(t) => t,
        Err(RunState::Stopped(exit)) => {
            return Ok(report_exit(&domain, &exit));
        }
        Err(_) => anyhow::bail!("the driver domain did not become ready within 10 s"),
    };
    let boot_exits = domain.exits().total.load(Ordering::Relaxed);
    if show_stats {
        for (k, v) in domain.vcpu_stats() {
            if v != 0 {
                println!("  kvm stat at ready   {k} = {v}");
            }
        }
    }
    let emul0 = domain.vcpu_stat("insn_emulation");
    let hb0 = domain.heartbeat().unwrap_or(0);
    let t0 = Instant::now();
    std::thread::sleep(watch);
    let hb1 = domain.heartbeat().unwrap_or(0);
    let emul1 = domain.vcpu_stat("insn_emulation");
    let waits = domain.exits().wait.load(Ordering::Relaxed);
    let kvm_exits = domain.vcpu_stat("exits");
    let watched = t0.elapsed();
    let exit = domain.stop();
    println!("ddvm demo: summary");
    println!("  platform            {}", domain.platform().name());
    println!(
        "  boot to ready       {:.3} ms ({} exits to the VMM)",
        ms(ready),
        boot_exits
    );
    println!(
        "  heartbeats          {} in {:.0} ms ({} wait exits)",
        hb1.saturating_sub(hb0),
        ms(watched),
        waits
    );
    match (emul0, emul1) {
        (Some(a), Some(b)) => println!(
            "  insn_emulation      +{} while watched ({})",
            b - a,
            if b - a < 1000 {
                "native execution"
            } else {
                "EMULATED: slow path"
            }
        ),
        _ => println!("  insn_emulation      (KVM has no binary stats here)"),
    }
    if let Some(e) = kvm_exits {
        println!("  KVM exits (all)     {e}");
    }
    println!("  stopped             {exit}");
    let (bytes, lost) = domain.console().counts();
    println!("  console             {bytes} bytes, {lost} lost");
    Ok(if hb1 > hb0 && !exit.is_crash() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_GUEST_CRASH)
    })
}

/// Runs the in-VMM test client on `d`; returns whether every byte verified.
fn verify_domain(d: &Domain, requests: u64) -> anyhow::Result<bool> {
    let (Some(gpa), Some(header)) = (d.channel(), d.channel_header()) else {
        anyhow::bail!("domain {} has no channel", d.name());
    };
    let mut ch = HostChannel::new(gpa, header);
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
    let r = testclient::run(d, &mut ch, &w).with_context(|| format!("domain {}", d.name()))?;
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

fn device_spec(config_file: &Path, domain: &str, dev: &DeviceSection) -> DeviceSpec {
    match dev {
        DeviceSection::EmulatedNvme {
            backing,
            size_mib,
            lba_size,
            volatile_write_cache,
        } => DeviceSpec::EmulatedNvme(NvmeConfig {
            backing: ddvm::config::resolve(config_file, backing),
            size: size_mib << 20,
            lba_size: *lba_size,
            volatile_write_cache: *volatile_write_cache,
            max_io_queues: 4,
            serial: format!("ddvm-{domain}").chars().take(20).collect(),
            model: "ddvm emulated NVMe".into(),
        }),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn run_config(
    kvm: &Path,
    file: &Path,
    duration: Option<f64>,
    verify: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(file)?;
    let mut cfgs = Vec::new();
    for d in &config.domains {
        let image = match d.image_path(file) {
            Some(p) => Image::from_file(&p)?,
            None => ddvm::builtin_driver_domain(),
        };
        image.check(ddvm_abi::layout::IMAGE_BASE, u64::MAX)?;
        cfgs.push(DomainConfig {
            name: d.name.clone(),
            image,
            memory: d.memory_mib << 20,
            cmdline: d.cmdline.clone(),
            channel_size: d.channel_kib << 10,
            echo: Echo::Stderr,
            device: d.device.as_ref().map(|dev| device_spec(file, &d.name, dev)),
        });
    }
    let hv = open_kvm(kvm)?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_stop_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_stop_signal as *const () as libc::sighandler_t,
        );
    }
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
    if let Some(requests) = verify {
        for d in domains.iter().filter(|d| d.nvme_stats().is_some()) {
            if !verify_domain(d, requests)? {
                crashed = true;
            }
        }
    }
    let deadline = duration.map(|s| Instant::now() + Duration::from_secs_f64(s));
    while !STOP.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        std::thread::sleep(Duration::from_millis(20));
        for d in &domains {
            if let RunState::Stopped(exit) = d.state() {
                report_exit(d, &exit);
                crashed |= exit.is_crash();
                STOP.store(true, Ordering::Relaxed);
            }
        }
    }
    for d in &mut domains {
        d.stop();
    }
    println!("ddvm: stopped {} domain(s)", domains.len());
    Ok(if crashed {
        ExitCode::from(EXIT_GUEST_CRASH)
    } else {
        ExitCode::SUCCESS
    })
}
