//! A whole topology: driver domains, the disks they serve, and the client guests on them.
//!
//! Start order: every driver domain boots and reports ready; each disk gets its backend (the
//! domain's channel, or a file for the `file:` baseline); each client guest boots with a
//! virtio-blk device on its range of a disk; then one block service per disk serves all of that
//! disk's clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvm_passthrough::NvmeConfig;

use crate::blk::{
    Backend, BlockGeometry, BlockService, ChannelBackend, ClientPort, FileBackend, LbaRange,
};
use crate::client::{
    builtin_workload_client, last_json, Client, ClientConfig, LinuxReport, WorkloadReport,
    HOSTILE_PREFIX,
};
use crate::config::{
    ClientSection, Config, DeviceSection, DomainSection, ResetSetting, StreamMode, WireSection,
};
use crate::console::Echo;
use crate::devices::vfio::VfioSpec;
use crate::devices::DeviceSpec;
use crate::domain::{Domain, DomainConfig};
use crate::hypervisor::Hypervisor;
use crate::loader::Image;
use crate::stop::Stop;
use crate::vcpu::{GuestExit, RunState};
use ddvm_passthrough::vfio::ResetMethod;

/// How long a domain may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A domain could not be built.
    #[error(transparent)]
    Domain(#[from] crate::domain::DomainError),
    /// A client guest could not be built.
    #[error(transparent)]
    Guest(#[from] crate::vm::GuestError),
    /// An image could not be read.
    #[error(transparent)]
    Image(#[from] crate::loader::ImageError),
    /// A domain stopped before it was ready.
    #[error("domain {name} stopped before it was ready: {exit}")]
    Crashed {
        /// Domain.
        name: String,
        /// How.
        exit: GuestExit,
    },
    /// A domain did not become ready in time.
    #[error("domain {name} was not ready within {READY_TIMEOUT:?}")]
    NotReady {
        /// Domain.
        name: String,
    },
    /// A disk's recovery policy is invalid.
    #[error("disk {disk}: recovery policy: {source}")]
    Policy {
        /// Disk (domain name).
        disk: String,
        /// What is wrong with it.
        #[source]
        source: ddvm_recovery::policy::PolicyError,
    },
    /// A disk's driver domain could not be started.
    #[error("disk {disk}: {source}")]
    Start {
        /// Disk (domain name).
        disk: String,
        /// Why.
        #[source]
        source: crate::blk::class::StartError,
    },
    /// A disk's block service thread could not be started.
    #[error("disk {disk}: starting its block service: {source}")]
    Service {
        /// Disk (domain name or file).
        disk: String,
        /// The host's refusal.
        #[source]
        source: std::io::Error,
    },
    /// A NIC's wire could not be set up.
    #[error("domain {domain}: its NIC's wire: {message}")]
    Wire {
        /// Domain.
        domain: String,
        /// Why.
        message: String,
    },
    /// A NIC's driver domain could not be started.
    #[error("NIC {nic}: {source}")]
    NicStart {
        /// NIC (domain name).
        nic: String,
        /// Why.
        #[source]
        source: crate::net::class::StartError,
    },
    /// A file disk's backing file cannot be used.
    #[error("disk {}: {source} (expected a readable and writable file)", path.display())]
    Backing {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The domain config for a `[[domain]]` section.
pub fn domain_config(
    file: &Path,
    d: &DomainSection,
    echo: Echo,
) -> Result<DomainConfig, TopologyError> {
    let image = match d.image_path(file) {
        Some(p) => Image::from_file(&p)?,
        None => crate::builtin_driver_domain(),
    };
    Ok(DomainConfig {
        name: d.name.clone(),
        image,
        memory: d.memory_mib << 20,
        cmdline: d.cmdline.clone(),
        channel_size: d.channel_kib << 10,
        echo,
        device: d
            .device
            .as_ref()
            .map(|dev| device_spec(file, &d.name, dev))
            .transpose()?,
    })
}

/// The far ends of in-process wire pairs whose first NIC was built, by (config file, domain).
static PAIR_ENDS: std::sync::Mutex<Vec<((PathBuf, String), ddvm_passthrough::PairEnd)>> =
    std::sync::Mutex::new(Vec::new());

/// The wire of a `[domain.device] wire` table.
fn wire(
    config_file: &Path,
    domain: &str,
    w: &WireSection,
) -> Result<Box<dyn ddvm_passthrough::Wire>, TopologyError> {
    use ddvm_passthrough::net::{DgramWire, StreamWire, TapWire};
    let err = |source: ddvm_passthrough::net::WireError| TopologyError::Wire {
        domain: domain.to_string(),
        message: source.to_string(),
    };
    Ok(match w {
        WireSection::Pair { with } => {
            let mut ends = crate::sync::lock(&PAIR_ENDS);
            let key = (config_file.to_path_buf(), domain.to_string());
            if let Some(i) = ends.iter().position(|(k, _)| *k == key) {
                Box::new(ends.swap_remove(i).1)
            } else {
                let (a, b) = ddvm_passthrough::wire_pair(Default::default()).map_err(err)?;
                ends.push(((config_file.to_path_buf(), with.clone()), b));
                Box::new(a)
            }
        }
        WireSection::Stream { path, mode } => {
            let path = crate::config::resolve(config_file, path);
            match mode {
                StreamMode::Connect => {
                    Box::new(StreamWire::connect(&path, MAX_FRAME).map_err(err)?)
                }
                StreamMode::Listen => Box::new(
                    StreamWire::listen(&path, MAX_FRAME)
                        .map_err(err)?
                        .accept(READY_TIMEOUT)
                        .map_err(err)?,
                ),
            }
        }
        WireSection::Dgram { path, peer } => {
            let local = crate::config::resolve(config_file, path);
            match peer {
                Some(p) => Box::new(
                    DgramWire::connect(&local, &crate::config::resolve(config_file, p), MAX_FRAME)
                        .map_err(err)?,
                ),
                None => Box::new(DgramWire::listen(&local, MAX_FRAME).map_err(err)?),
            }
        }
        WireSection::Tap { name } => {
            let opened = crate::sync::lock(&OPENED_TAPS)
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.try_clone());
            match opened {
                Some(t) => Box::new(t.map_err(err)?),
                None => Box::new(TapWire::open(name, MAX_FRAME).map_err(err)?),
            }
        }
    })
}

/// Largest frame a wire carries (an Ethernet frame without its FCS).
const MAX_FRAME: usize = 1518;

/// TAP interfaces opened before the VMM left the host's network namespace (`--jail`), by
/// name: a topology's TAP wire is a duplicate of one of these, so it stays the host's
/// interface however often a topology starts (each chaos segment starts one).
static OPENED_TAPS: std::sync::Mutex<Vec<(String, ddvm_passthrough::net::TapWire)>> =
    std::sync::Mutex::new(Vec::new());

/// Opens the TAP interface `name` of domain `domain` now, in this network namespace, for
/// the topologies started later (see [`OPENED_TAPS`]).
pub fn preopen_tap(domain: &str, name: &str) -> Result<(), TopologyError> {
    let mut taps = crate::sync::lock(&OPENED_TAPS);
    if !taps.iter().any(|(n, _)| n == name) {
        let tap = ddvm_passthrough::net::TapWire::open(name, MAX_FRAME).map_err(|source| {
            TopologyError::Wire {
                domain: domain.to_string(),
                message: source.to_string(),
            }
        })?;
        taps.push((name.to_string(), tap));
    }
    Ok(())
}

/// Closes the TAP interfaces [`preopen_tap`] opened (in a process that will start no
/// topology: the one `--jail` leaves outside).
pub fn forget_preopened_taps() {
    crate::sync::lock(&OPENED_TAPS).clear();
}

/// The device of a `[domain.device]` section.
pub fn device_spec(
    config_file: &Path,
    domain: &str,
    dev: &DeviceSection,
) -> Result<DeviceSpec, TopologyError> {
    Ok(match dev {
        DeviceSection::EmulatedE1000 { wire: w, mac } => {
            let mac = mac
                .as_deref()
                .and_then(crate::config::parse_mac)
                .unwrap_or_else(|| crate::config::derived_mac(domain));
            DeviceSpec::EmulatedE1000(crate::devices::e1000::E1000Spec::new(
                mac,
                wire(config_file, domain, w)?,
            ))
        }
        DeviceSection::EmulatedNvme {
            backing,
            size_mib,
            lba_size,
            volatile_write_cache,
        } => DeviceSpec::EmulatedNvme(NvmeConfig {
            backing: crate::config::resolve(config_file, backing),
            size: size_mib << 20,
            lba_size: *lba_size,
            volatile_write_cache: *volatile_write_cache,
            max_io_queues: 4,
            serial: format!("ddvm-{domain}").chars().take(20).collect(),
            model: "ddvm emulated NVMe".into(),
        }),
        DeviceSection::Vfio { address, reset, .. } => DeviceSpec::Vfio(VfioSpec {
            address: address.clone(),
            reset: match reset {
                ResetSetting::Flr => ResetMethod::Flr,
                ResetSetting::Controller => ResetMethod::Controller,
            },
        }),
    })
}

/// The NIC of a NIC domain, built once to outlive its domains (a wire is one cable).
fn start_nic(dc: &DomainConfig) -> Result<Arc<crate::domain::DomainDevice>, TopologyError> {
    let device = match &dc.device {
        Some(spec) => spec.device(&dc.name, crate::domain::DeviceThread::Worker)?,
        None => {
            return Err(TopologyError::Wire {
                domain: dc.name.clone(),
                message: "a NIC domain needs a device".into(),
            })
        }
    };
    // A VFIO device's class is the device's: a client's `nic` must name a NIC.
    if device.model().class() != ddvm_abi::channel::class::NET {
        let what = device.vfio_handle().map_or_else(
            || "its device".to_string(),
            |h| {
                let ids = h.ids();
                format!(
                    "its VFIO device {} ({:04x}:{:04x}, class {:06x})",
                    h.address(),
                    ids.vendor,
                    ids.device,
                    ids.class_code
                )
            },
        );
        return Err(TopologyError::Domain(crate::domain::DomainError::Device {
            name: dc.name.clone(),
            source: format!(
                "{what} is not a NIC, but a client names the domain as its `nic`; expected an Ethernet controller (class 020000)"
            )
            .into(),
        }));
    }
    Ok(device)
}

/// Boots a domain and waits for its ready mark.
pub fn boot_ready(
    hv: &Hypervisor,
    cfg: &DomainConfig,
) -> Result<(Domain, Duration), TopologyError> {
    let d = Domain::boot(hv, cfg, 1)?;
    match d.wait_ready(READY_TIMEOUT) {
        Ok(t) => Ok((d, t)),
        Err(RunState::Stopped(exit)) => Err(TopologyError::Crashed {
            name: cfg.name.clone(),
            exit,
        }),
        Err(_) => Err(TopologyError::NotReady {
            name: cfg.name.clone(),
        }),
    }
}

/// A running topology.
pub struct Topology {
    /// Block services, one per disk with clients.
    pub services: Vec<BlockService>,
    /// Client guests.
    pub clients: Vec<Client>,
    /// Domains that serve no client (they just run).
    pub idle_domains: Vec<Domain>,
    /// Boot-to-ready time of each domain.
    pub ready_times: Vec<(String, Duration)>,
    /// Recovery handles of the disk and NIC domains (commands, events, status), by domain
    /// name.
    pub recovery: Vec<(String, crate::reincarnation::RecoveryHandle)>,
    /// Network services, one per NIC domain with clients.
    pub nets: Vec<crate::net::service::NetService>,
}

impl Topology {
    /// What the control plane reads of each disk's and NIC's I/O (`ctl status`, `metrics`).
    pub fn io_sources(&self) -> Vec<crate::metrics::IoSource> {
        let disks = self.services.iter().map(BlockService::io_source);
        let nics = self
            .nets
            .iter()
            .map(crate::net::service::NetService::io_source);
        disks.chain(nics).collect()
    }
}

/// How one client ended.
#[derive(Debug)]
pub struct ClientOutcome {
    /// Client name.
    pub name: String,
    /// How the guest stopped (None: still running at the deadline; it was stopped).
    pub exit: Option<GuestExit>,
    /// Its report line, if it printed one.
    pub report: Option<WorkloadReport>,
    /// Its hostile-mode line (`ddvm-hostile: {json}`), if it printed one.
    pub hostile: Option<String>,
    /// A Linux client's report line (`ddvm-linux: {json}`), if it printed one.
    pub linux: Option<LinuxReport>,
    /// Its network-mode report (`workload=net-echo`), if it printed one.
    pub net: Option<crate::client::NetEchoReport>,
    /// Its TCP-mode report (`workload=net-tcp`), if it printed one.
    pub tcp: Option<crate::client::NetTcpReport>,
}

impl ClientOutcome {
    /// Exited 0 (a Linux client: powered off) with a clean report.
    pub fn ok(&self) -> bool {
        matches!(self.exit, Some(GuestExit::Exited { status: 0 }))
            && (self.report.as_ref().is_some_and(WorkloadReport::clean)
                || self.linux.as_ref().is_some_and(LinuxReport::clean)
                || self
                    .net
                    .as_ref()
                    .is_some_and(crate::client::NetEchoReport::clean)
                || self
                    .tcp
                    .as_ref()
                    .is_some_and(crate::client::NetTcpReport::clean))
    }
}

impl Topology {
    /// Starts everything in `cfg` (read from `file`, for resolving paths).
    pub fn start(
        hv: &Arc<Hypervisor>,
        cfg: &Config,
        file: &Path,
        echo: Echo,
    ) -> Result<Topology, TopologyError> {
        let mut backends: Vec<(String, Backend)> = Vec::new();
        let mut idle_domains = Vec::new();
        let mut ready_times = Vec::new();
        let mut recovery = Vec::new();
        let mut nics = Vec::new();
        for d in &cfg.domains {
            let dc = domain_config(file, d, echo)?;
            if cfg
                .clients
                .iter()
                .any(|c| c.nic.as_deref() == Some(d.name.as_str()))
            {
                let policy = d
                    .recovery
                    .to_policy()
                    .map_err(|source| TopologyError::Policy {
                        disk: d.name.clone(),
                        source,
                    })?;
                let t0 = Instant::now();
                let b = start_nic(&dc).and_then(|device| {
                    let launcher =
                        crate::reincarnation::vm::VmLauncher::new(hv.clone(), dc, device);
                    crate::net::class::NetBackend::start(&d.name, launcher, policy).map_err(
                        |source| TopologyError::NicStart {
                            nic: d.name.clone(),
                            source,
                        },
                    )
                })?;
                ready_times.push((d.name.clone(), t0.elapsed()));
                recovery.push((d.name.clone(), b.handle()));
                nics.push((d.name.clone(), b));
            } else if cfg.clients.iter().any(|c| c.disk == d.name) {
                let policy = d
                    .recovery
                    .to_policy()
                    .map_err(|source| TopologyError::Policy {
                        disk: d.name.clone(),
                        source,
                    })?;
                let t0 = Instant::now();
                let b = ChannelBackend::start(hv.clone(), dc, policy).map_err(|source| {
                    TopologyError::Start {
                        disk: d.name.clone(),
                        source,
                    }
                })?;
                ready_times.push((d.name.clone(), t0.elapsed()));
                recovery.push((d.name.clone(), b.handle()));
                backends.push((d.name.clone(), Backend::Channel(Box::new(b))));
            } else {
                // A VFIO device is opened first: its class (so the domain's channel's) is the
                // device's.
                let mut dc = dc;
                if let Some(spec @ DeviceSpec::Vfio(_)) = &dc.device {
                    let device = spec.device(&d.name, crate::domain::DeviceThread::Worker)?;
                    dc.device = Some(DeviceSpec::Persistent(device));
                }
                let (domain, t) = boot_ready(hv, &dc)?;
                ready_times.push((d.name.clone(), t));
                idle_domains.push(domain);
            }
        }
        for c in &cfg.clients {
            if let Some(path) = c.disk_file(file) {
                if !backends.iter().any(|(n, _)| *n == c.disk) {
                    let b = open_file_disk(&path, cfg, &c.disk)?;
                    backends.push((c.disk.clone(), Backend::File(b)));
                }
            }
        }
        let mut clients = Vec::new();
        // The section of each client booted, by index into `clients`.
        let mut sections = Vec::new();
        let mut ports: Vec<Vec<Arc<ClientPort>>> = vec![Vec::new(); backends.len()];
        for c in &cfg.clients {
            let bi = backends.iter().position(|(n, _)| *n == c.disk);
            if bi.is_none() && (!c.disk.is_empty() || c.nic.is_none()) {
                continue;
            }
            let info = bi.map(|bi| backends[bi].1.info());
            let client = Client::boot(hv, &client_config(file, c, info.as_ref(), echo)?)?;
            if let (Some(bi), Some(port)) = (bi, client.port()) {
                ports[bi].push(port.clone());
            }
            clients.push(client);
            sections.push(c);
        }
        let mut nets = Vec::new();
        for (name, backend) in nics {
            let mut switch = crate::net::switch::Switch::new(1518);
            let mut net_ports = Vec::new();
            for (c, client) in sections.iter().zip(&clients) {
                if c.nic.as_deref() != Some(name.as_str()) {
                    continue;
                }
                if let Some(p) = client.net_port() {
                    // MACs were checked unique with the configuration.
                    let _ = switch.add_client(p.config.mac);
                    net_ports.push(p.clone());
                }
            }
            let handle = Some(backend.handle());
            let s =
                crate::net::service::NetService::spawn(&name, net_ports, switch, backend, handle)
                    .map_err(|source| TopologyError::Service {
                    disk: name.clone(),
                    source,
                })?;
            nets.push(s);
        }
        let mut services = Vec::new();
        for ((name, backend), ports) in backends.into_iter().zip(ports) {
            let s = BlockService::spawn(&name, ports, backend).map_err(|source| {
                TopologyError::Service {
                    disk: name.clone(),
                    source,
                }
            })?;
            services.push(s);
        }
        Ok(Topology {
            services,
            clients,
            idle_domains,
            ready_times,
            recovery,
            nets,
        })
    }

    /// Waits until every client guest stops (or `timeout` passes; late ones are stopped).
    pub fn wait_clients(&mut self, timeout: Duration) -> Vec<ClientOutcome> {
        let deadline = Instant::now() + timeout;
        self.clients
            .iter_mut()
            .map(|c| {
                let left = deadline.saturating_duration_since(Instant::now());
                let exit = c.wait(left);
                if exit.is_none() {
                    c.guest_mut().stop();
                }
                let console = c.guest().console().text();
                ClientOutcome {
                    name: c.guest().name().to_string(),
                    exit,
                    report: WorkloadReport::find(&console),
                    hostile: last_json(&console, HOSTILE_PREFIX).map(str::to_string),
                    linux: LinuxReport::find(&console),
                    net: crate::client::NetEchoReport::find(&console),
                    tcp: crate::client::NetTcpReport::find(&console),
                }
            })
            .collect()
    }

    /// [`Topology::wait_clients`], but a requested `stop` ends the wait early: the clients
    /// still running are stopped (their outcomes have no exit).
    pub fn wait_clients_or_stop(&mut self, timeout: Duration, stop: &Stop) -> Vec<ClientOutcome> {
        self.wait_clients_or_stop_with(Some(timeout), stop, |_| {})
    }

    /// [`Topology::wait_clients_or_stop`] (`None`: no timeout, until the clients finish or a
    /// stop is requested), calling `tick` with the running topology every 20 ms while it waits
    /// (a progress line, kills on a schedule).
    pub fn wait_clients_or_stop_with(
        &mut self,
        timeout: Option<Duration>,
        stop: &Stop,
        mut tick: impl FnMut(&Topology),
    ) -> Vec<ClientOutcome> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let tick_period = Duration::from_millis(20);
        loop {
            let left =
                deadline.map_or(tick_period, |d| d.saturating_duration_since(Instant::now()));
            let running = self
                .clients
                .iter()
                .any(|c| c.wait(Duration::ZERO).is_none());
            if !running || left.is_zero() || stop.requested() {
                break;
            }
            tick(self);
            stop.sleep(left.min(tick_period));
        }
        self.wait_clients(Duration::ZERO)
    }

    /// Stops clients, services and domains, in that order; each disk in order (see
    /// [`crate::stop`]: requests taken answered, a final flush, the controller shut down
    /// before its reset). Returns what each disk's stop did (services stopped before are
    /// included).
    pub fn stop(&mut self) -> Vec<crate::stop::StopReport> {
        for c in &mut self.clients {
            c.guest_mut().stop();
        }
        for n in &mut self.nets {
            n.stop();
        }
        let mut reports = Vec::new();
        for s in &mut self.services {
            let _ = s.stop();
            reports.extend(s.stop_report());
        }
        for d in &mut self.idle_domains {
            reports.extend(crate::stop::domain_without_clients(d, None));
            d.stop();
        }
        reports
    }
}

fn open_file_disk(path: &Path, cfg: &Config, disk: &str) -> Result<FileBackend, TopologyError> {
    // The file must hold every client range on it; it is created (sparse) or grown if needed.
    let need = cfg
        .clients
        .iter()
        .filter(|c| c.disk == disk)
        .map(|c| (c.offset_mib + c.size_mib) << 20)
        .max()
        .unwrap_or(0);
    let err = |source: std::io::Error| TopologyError::Backing {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(err)?;
    if f.metadata().map_err(err)?.len() < need {
        f.set_len(need).map_err(err)?;
    }
    FileBackend::open(path, 4096).map_err(err)
}

/// The client config for a `[[client]]` section on a disk with `info` (`None`: a client
/// without a disk).
pub fn client_config(
    file: &Path,
    c: &ClientSection,
    info: Option<&crate::blk::DiskInfo>,
    echo: Echo,
) -> Result<ClientConfig, TopologyError> {
    let image = match c.image_path(file) {
        Some(p) => Image::from_file(&p)?,
        None => builtin_workload_client(),
    };
    let geometry = info.map(|info| {
        let first = (c.offset_mib << 20) / 512;
        let sectors = ((c.size_mib << 20) / 512).min(info.sectors.saturating_sub(first));
        BlockGeometry {
            range: LbaRange { first, sectors },
            block_size: info.block_size,
            read_only: c.read_only,
            discard: info.discard,
            write_zeroes: info.write_zeroes,
            serial: format!("ddvm-{}", c.name).chars().take(20).collect(),
            queues: c.queue_count(),
        }
    });
    Ok(ClientConfig {
        name: c.name.clone(),
        image,
        memory: c.memory_mib << 20,
        cmdline: c.workload.clone(),
        geometry,
        echo,
        linux: c.linux_boot(file),
        nic: c
            .nic
            .as_ref()
            .and(c.mac_address())
            .map(|mac| crate::net::device::NetConfig { mac, mtu: 1500 }),
    })
}

/// Where `ddvm demo` puts its disk: a fresh file in the system's temporary directory.
pub fn demo_disk_path() -> PathBuf {
    std::env::temp_dir().join(format!("ddvm-demo-{}.img", std::process::id()))
}
