//! Client guests: a VM with a virtio-blk device (virtio-mmio) whose queue a block service
//! serves, and the report of the workload client guest that runs in it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::{BlockGeometry, ClientPort, VirtioBlock};
use crate::console::Echo;
use crate::hypervisor::Hypervisor;
use crate::linux::{self, LevelIrq, LinuxBoot};
use crate::loader::Image;
use crate::memory::GuestMem;
use crate::vcpu::GuestExit;
use crate::vcpu::Shared;
use crate::virtio::mmio::{MmioTransport, WINDOW};
use crate::virtio::Interrupt;
use crate::vm::{Guest, GuestConfig, GuestError, MmioAttachment};

/// Guest-physical base of a client's first virtio-mmio device.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Guest-physical base of a client's virtio-net device (the second window).
pub const VIRTIO_NET_BASE: u64 = VIRTIO_MMIO_BASE + WINDOW;
/// The GSI of a Linux client's virtio-blk device (an ISA line: edge-triggered, active-high
/// without an override; the DSDT makes it level-triggered).
pub const VIRTIO_GSI: u32 = 5;
/// The GSI of a Linux client's virtio-net device (the second window), level-triggered like
/// the disk's.
pub const VIRTIO_NET_GSI: u32 = 6;
/// QueueNotify register offset.
const QUEUE_NOTIFY: u64 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Prefix of the workload client's report line.
pub const REPORT_PREFIX: &str = "ddvm-workload: ";
/// Prefix of a stock Linux client's report line (`images/linux-client/init`).
pub const LINUX_PREFIX: &str = "ddvm-linux: ";
/// Prefix of the workload client's hostile-mode line.
pub const HOSTILE_PREFIX: &str = "ddvm-hostile: ";

/// The JSON object after `prefix` on the last console line that has one.
pub fn last_json<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console.lines().rev().find_map(|l| {
        let rest = l[l.find(prefix)? + prefix.len()..].trim();
        rest.starts_with('{').then_some(rest)
    })
}

/// The workload client image built into ddvm.
pub fn builtin_workload_client() -> Image {
    Image::from_static("builtin:workload-client", ddvm_images::WORKLOAD_CLIENT)
}

/// How to build a client guest.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Name.
    pub name: String,
    /// Image (normally the workload client).
    pub image: Image,
    /// RAM in bytes.
    pub memory: u64,
    /// Command line (the workload's keys); the device's address is appended.
    pub cmdline: String,
    /// The virtio-blk device it sees on the first window ([`VIRTIO_MMIO_BASE`]); `None`: no
    /// disk (a client with only a NIC).
    pub geometry: Option<BlockGeometry>,
    /// Echo its console.
    pub echo: Echo,
    /// Boot this stock Linux kernel instead of `image` (VMX/SVM hosts only): it finds its
    /// disk through ACPI and takes its interrupts.
    pub linux: Option<LinuxBoot>,
    /// A virtio-net device (its MAC and MTU) on the second window ([`VIRTIO_NET_BASE`]); a
    /// Linux client finds it in the DSDT with its interrupt, [`VIRTIO_NET_GSI`].
    pub nic: Option<crate::net::device::NetConfig>,
}

/// A running client guest.
pub struct Client {
    guest: Guest,
    port: Option<Arc<ClientPort>>,
    net: Option<Arc<crate::net::device::NetPort>>,
}

impl Client {
    /// Boots a client; its block device is `port()`, to be served by a block service.
    pub fn boot(hv: &Hypervisor, cfg: &ClientConfig) -> Result<Client, GuestError> {
        let cmdline = match &cfg.linux {
            Some(linux) => linux.cmdline.clone(),
            None => {
                let mut line = cfg.cmdline.clone();
                if cfg.geometry.is_some() {
                    line.push_str(&format!(" virtio_mmio.device=4K@{VIRTIO_MMIO_BASE:#x}"));
                }
                if cfg.nic.is_some() {
                    line.push_str(&format!(" virtio_mmio.device=4K@{VIRTIO_NET_BASE:#x}"));
                }
                line.trim_start().to_string()
            }
        };
        let gcfg = GuestConfig {
            name: cfg.name.clone(),
            image: cfg.image.clone(),
            memory: cfg.memory,
            cmdline,
            echo: cfg.echo,
        };
        let mut port = None;
        let mut net = None;
        let mut attach = |mem: &GuestMem, shared: &Arc<Shared>| {
            let mut devices = Vec::new();
            if let Some(geometry) = &cfg.geometry {
                let (device, p) = virtio_blk(cfg, geometry, mem, shared)?;
                port = Some(p);
                devices.push(device);
            }
            if let Some(nic) = cfg.nic {
                let (device, p) = virtio_net(cfg, nic, mem, shared)?;
                net = Some(p);
                devices.push(device);
            }
            Ok(devices)
        };
        let guest = match &cfg.linux {
            Some(boot) => linux::boot(hv, &gcfg, boot, &mut attach)?,
            None => Guest::boot(hv, &gcfg, &mut attach)?,
        };
        if cfg.geometry.is_some() && port.is_none() {
            return Err(GuestError::Host {
                name: cfg.name.clone(),
                what: "virtio-blk device",
                source: std::io::Error::other("device was not built"),
            });
        }
        Ok(Client { guest, port, net })
    }

    /// The port of its virtio-net device, if it has one.
    pub fn net_port(&self) -> Option<&Arc<crate::net::device::NetPort>> {
        self.net.as_ref()
    }

    /// The port of its virtio-blk device, which a block service serves (`None`: no disk).
    pub fn port(&self) -> Option<&Arc<ClientPort>> {
        self.port.as_ref()
    }

    /// The guest.
    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    /// The guest, mutably (to stop it).
    pub fn guest_mut(&mut self) -> &mut Guest {
        &mut self.guest
    }

    /// Waits for the guest to finish; returns how it stopped (None: still running).
    pub fn wait(&self, timeout: Duration) -> Option<GuestExit> {
        self.guest.wait_stopped(timeout)
    }
}

/// A device's interrupt: for a ddvm guest, a kick of its vCPU (which polls, and waits in the
/// VMM when idle); for a stock Linux guest, a level-triggered line on `gsi` of its I/O APIC,
/// asserted again after each EOI while InterruptStatus is not all acknowledged.
fn interrupt_line(
    cfg: &ClientConfig,
    gsi: u32,
    shared: &Arc<Shared>,
) -> std::io::Result<(Interrupt, Option<LevelIrq>)> {
    if cfg.linux.is_none() {
        let waker = shared.clone();
        return Ok((Interrupt::new(Arc::new(move || waker.kick())), None));
    }
    let trigger = EventFd::new(libc::EFD_NONBLOCK)?;
    let line = trigger.try_clone()?;
    // An eventfd write fails only when its counter would overflow: already raised.
    let signal = Arc::new(move || {
        let _ = line.write(1);
    });
    let interrupt = Interrupt::new(signal);
    let status = interrupt.clone();
    let irq = LevelIrq {
        gsi,
        trigger,
        pending: Arc::new(move || status.status() != 0),
    };
    Ok((interrupt, Some(irq)))
}

/// The client's virtio-blk device on its MMIO window, and the port a block service serves. Its
/// interrupt wakes the vCPU of a ddvm guest (which polls, and waits in the VMM when idle); a
/// stock Linux guest's is an irqfd on [`VIRTIO_GSI`].
fn virtio_blk(
    cfg: &ClientConfig,
    geometry: &BlockGeometry,
    mem: &GuestMem,
    shared: &Arc<Shared>,
) -> Result<(MmioAttachment, Arc<ClientPort>), GuestError> {
    let host = |source| GuestError::Host {
        name: cfg.name.clone(),
        what: "virtio-blk device",
        source,
    };
    let (interrupt, irq) = interrupt_line(cfg, VIRTIO_GSI, shared).map_err(host)?;
    let port = ClientPort::new(&cfg.name, mem.clone(), geometry.clone(), interrupt.clone())
        .map_err(host)?;
    let notify = port.notify.try_clone().map_err(host)?;
    let ioevent = port.notify.try_clone().map_err(host)?;
    let transport = MmioTransport::new(
        VirtioBlock::new(port.clone()),
        mem.clone(),
        interrupt,
        notify,
    );
    let device = MmioAttachment {
        base: VIRTIO_MMIO_BASE,
        len: WINDOW,
        device: Arc::new(Mutex::new(transport)),
        ioevents: vec![(VIRTIO_MMIO_BASE + QUEUE_NOTIFY, ioevent)],
        irq,
    };
    Ok((device, port))
}

/// The client's virtio-net device on the second window. Its interrupt wakes the vCPU of a ddvm
/// guest; a stock Linux guest's is an irqfd on [`VIRTIO_NET_GSI`].
fn virtio_net(
    cfg: &ClientConfig,
    nic: crate::net::device::NetConfig,
    mem: &GuestMem,
    shared: &Arc<Shared>,
) -> Result<(MmioAttachment, Arc<crate::net::device::NetPort>), GuestError> {
    let host = |source| GuestError::Host {
        name: cfg.name.clone(),
        what: "virtio-net device",
        source,
    };
    let (interrupt, irq) = interrupt_line(cfg, VIRTIO_NET_GSI, shared).map_err(host)?;
    let port = crate::net::device::NetPort::new(&cfg.name, mem.clone(), nic, interrupt.clone())
        .map_err(host)?;
    let notify = port.notify.try_clone().map_err(host)?;
    let ioevent = port.notify.try_clone().map_err(host)?;
    let transport = MmioTransport::new(
        crate::net::device::VirtioNet::new(port.clone()),
        mem.clone(),
        interrupt,
        notify,
    );
    let device = MmioAttachment {
        base: VIRTIO_NET_BASE,
        len: WINDOW,
        device: Arc::new(Mutex::new(transport)),
        ioevents: vec![(VIRTIO_NET_BASE + QUEUE_NOTIFY, ioevent)],
        irq,
    };
    Ok((device, port))
}

/// Latency percentiles in µs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

/// The workload client's report line (`ddvm-workload: {json}`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct WorkloadReport {
    /// Client id.
    pub id: u64,
    /// Workload name.
    pub workload: String,
    /// Block size.
    pub bs: u64,
    /// Queue depth.
    pub qd: u64,
    /// Requests in the timed phase.
    pub ops: u64,
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Duration of the timed phase.
    pub elapsed_us: u64,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency.
    pub lat_us: Latency,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Reads whose data was wrong.
    pub mismatches: u64,
    /// Of which: an older generation than acknowledged.
    pub lost: u64,
    /// Of which: another block's or client's data.
    pub misplaced: u64,
    /// Of which: bad checksum or payload.
    pub corrupt: u64,
    /// Reads of blocks never written in this run.
    pub unverified: u64,
    /// Reads checked.
    pub verified: u64,
    /// The first error or mismatch.
    pub first_error: Option<String>,
}

/// Round-trip times in µs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Rtt {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

/// The workload client's report line in its network mode (`workload=net-echo`; also after
/// [`REPORT_PREFIX`]): what a sender got back, or what an echo side sent back.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct NetEchoReport {
    /// Client id.
    pub id: u64,
    /// Always `net-echo`.
    pub workload: String,
    /// `send` or `echo`.
    pub role: String,
    /// Its MAC.
    pub mac: String,
    /// The peer's MAC (an echo side may have none).
    pub peer: Option<String>,
    /// Frames asked for (sender).
    pub count: u64,
    /// Frames in flight at most (sender).
    pub window: u64,
    /// Sender: frames delivered and verified on return; echo: data frames echoed.
    pub frames: u64,
    /// Frames transmitted (retries and FINs included).
    pub sent: u64,
    /// Frames received.
    pub received: u64,
    /// Frames of this workload whose bytes were wrong.
    pub corrupt: u64,
    /// Frames back after their number was delivered (at-least-once TX, retries).
    pub duplicates: u64,
    /// Frames sent again after the retry timeout.
    pub retries: u64,
    /// Frames the echo side dropped while its TX queue was full.
    pub dropped: u64,
    /// Samples of the virtio-net status that read link down.
    pub link_down: u64,
    /// Samples of the status taken (one a millisecond).
    pub link_samples: u64,
    /// Duration of the run.
    pub elapsed_us: u64,
    /// Frames delivered per second.
    pub frames_s: u64,
    /// Round trips of delivered frames (from their last transmission).
    pub rtt_us: Rtt,
    /// Errors other than corrupt frames (timeouts, device errors).
    pub errors: u64,
    /// The first error or corrupt frame.
    pub first_error: Option<String>,
}

impl NetEchoReport {
    /// Finds and parses the report line in console text.
    pub fn find(console: &str) -> Option<NetEchoReport> {
        serde_json::from_str::<NetEchoReport>(last_json(console, REPORT_PREFIX)?)
            .ok()
            .filter(|r| r.workload == "net-echo")
    }

    /// Whether nothing was wrong and a sender got every frame back.
    pub fn clean(&self) -> bool {
        self.errors == 0 && self.corrupt == 0 && (self.role != "send" || self.frames == self.count)
    }
}

/// The workload client's report line in its TCP mode (`workload=net-tcp`; also after
/// [`REPORT_PREFIX`]): one end of a TCP connection (smoltcp in the guest) carrying a verified
/// bulk transfer both ways or request/response round trips.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct NetTcpReport {
    /// Client id.
    pub id: u64,
    /// Always `net-tcp`.
    pub workload: String,
    /// `client` or `server`.
    pub role: String,
    /// `bulk` or `rr`.
    pub mode: String,
    /// Its MAC.
    pub mac: String,
    /// Its IPv4 address.
    pub ip: String,
    /// The other end's address (a server may have none).
    pub peer: Option<String>,
    /// The server's port.
    pub port: u64,
    /// Bytes of each socket buffer, and so of the window each way.
    pub window: u64,
    /// Bytes each way the run is to carry (bulk: `bytes`; rr: `count` × `size`).
    pub bytes: u64,
    /// Bytes of its own stream the other end acknowledged.
    pub sent: u64,
    /// Bytes of the other end's stream received.
    pub received: u64,
    /// Of which: checked and right.
    pub verified: u64,
    /// Bytes received that differ from the stream.
    pub corrupt: u64,
    /// Offset of the first of them.
    pub first_corrupt: Option<u64>,
    /// From the connection's establishment to the end of the exchange.
    pub elapsed_us: u64,
    /// Bytes sent (acknowledged) per µs of the exchange: MB/s.
    pub tx_mb_s: f64,
    /// Bytes received per µs: MB/s.
    pub rx_mb_s: f64,
    /// Round trips asked for (rr; 0 in bulk).
    pub count: u64,
    /// Bytes of each request and answer (rr; 0 in bulk).
    pub size: u64,
    /// Round trips completed (rr client) or requests received whole (rr server).
    pub rounds: u64,
    /// Round-trip times of the rr client.
    pub rtt_us: Rtt,
    /// TCP segments sent with data, SYN or FIN.
    pub segments: u64,
    /// Of which: sent again (a sequence range starting below the furthest already sent).
    pub retransmits: u64,
    /// RST segments received once the connection was established.
    pub resets: u64,
    /// Connection attempts answered with RST (the server not listening yet).
    pub refused: u64,
    /// The run did not finish within its `timeout_ms`.
    pub timeout: bool,
    /// The connection closed (CLOSED or TIME-WAIT) after the exchange.
    pub closed: bool,
    /// Samples of the virtio-net status that read link down.
    pub link_down: u64,
    /// Samples of the status taken (one a millisecond).
    pub link_samples: u64,
    /// Errors (resets, early closes, timeouts, device errors).
    pub errors: u64,
    /// The first error.
    pub first_error: Option<String>,
}

impl NetTcpReport {
    /// Finds and parses the report line in console text.
    pub fn find(console: &str) -> Option<NetTcpReport> {
        serde_json::from_str::<NetTcpReport>(last_json(console, REPORT_PREFIX)?)
            .ok()
            .filter(|r| r.workload == "net-tcp")
    }

    /// Whether every byte went both ways and was verified, with no corruption, reset, timeout
    /// or error.
    pub fn clean(&self) -> bool {
        self.errors == 0
            && self.corrupt == 0
            && self.resets == 0
            && !self.timeout
            && self.bytes > 0
            && self.sent == self.bytes
            && self.received == self.bytes
            && self.verified == self.bytes
    }
}

/// A stock Linux client's report line (`ddvm-linux: {json}`, from `images/linux-client/init`):
/// what its kernel saw of the disk, and the checks it ran through it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct LinuxReport {
    /// `uname -r`.
    pub kernel: String,
    /// Checks run.
    pub checks: u64,
    /// Checks failed.
    pub failed: u64,
    /// Write-fsync-read-verify rounds of the test area.
    pub rounds: u64,
    /// MiB written and read back.
    pub verified_mib: u64,
    /// Blocks written and read back with O_DIRECT.
    pub direct_blocks: u64,
    /// CPUs the kernel brought up.
    #[serde(default)]
    pub cpus: u64,
    /// Blocks written with O_DIRECT from every CPU at once (one each, when there are
    /// several), and read back.
    #[serde(default)]
    pub cpu_blocks: u64,
    /// The disk's request queues its driver uses (blk-mq hardware queues).
    #[serde(default)]
    pub queues: u64,
    /// Disk size in 512-byte sectors, as the kernel saw it.
    pub sectors: u64,
    /// Logical block size.
    pub block_size: u64,
    /// The kernel's cache mode ("write back" when FLUSH is offered).
    pub write_cache: String,
    /// Largest discard the kernel will send (0: none offered).
    pub discard_max_bytes: u64,
    /// Largest write-zeroes the kernel will send (0: none offered).
    pub write_zeroes_max_bytes: u64,
    /// The disk's serial (GET_ID).
    pub serial: String,
    /// Timed I/O (`ddvm.bench=M` on its command line), if it ran.
    #[serde(default)]
    pub bench: Option<LinuxBench>,
    /// The first failed check.
    pub first_error: Option<String>,
}

/// A Linux client's timed I/O: `dd` with O_DIRECT on its disk.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct LinuxBench {
    /// MiB written, then read, in 1 MiB requests.
    pub mib: u64,
    /// Sequential 1 MiB writes.
    pub write_mib_s: f64,
    /// Sequential 1 MiB reads.
    pub read_mib_s: f64,
    /// 4 KiB reads, one at a time (latency-bound).
    pub read_4k_iops: f64,
}

impl LinuxReport {
    /// Finds and parses the report line in console text.
    pub fn find(console: &str) -> Option<LinuxReport> {
        serde_json::from_str(last_json(console, LINUX_PREFIX)?).ok()
    }

    /// Whether checks ran and none failed.
    pub fn clean(&self) -> bool {
        self.checks > 0 && self.failed == 0
    }
}

impl WorkloadReport {
    /// Finds and parses the report line in console text.
    pub fn find(console: &str) -> Option<WorkloadReport> {
        serde_json::from_str(last_json(console, REPORT_PREFIX)?).ok()
    }

    /// Whether every request succeeded and every read verified.
    pub fn clean(&self) -> bool {
        self.errors == 0 && self.mismatches == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_json_line_after_the_prefix_is_taken() {
        let console = "boot\n[c0] ddvm-hostile: desc-loop reacted in 23 us\n[c0] ddvm-hostile: {\"case\":\"desc-loop\"}\nbye\n";
        assert_eq!(
            last_json(console, HOSTILE_PREFIX),
            Some("{\"case\":\"desc-loop\"}")
        );
        assert_eq!(last_json("ddvm-hostile: text only\n", HOSTILE_PREFIX), None);
        let report = format!("{REPORT_PREFIX}{{\"id\":3,\"errors\":1}}\n");
        let r = WorkloadReport::find(&report);
        assert!(r.is_none(), "a report missing keys does not parse");
        let net = format!(
            "{REPORT_PREFIX}{{\"id\":1,\"workload\":\"net-echo\",\"role\":\"send\",\"mac\":\"52:54:00:00:00:0a\",\"peer\":\"52:54:00:00:00:0b\",\"count\":5,\"window\":2,\"frames\":5,\"sent\":6,\"received\":6,\"corrupt\":0,\"duplicates\":1,\"retries\":1,\"dropped\":0,\"link_down\":0,\"link_samples\":9,\"elapsed_us\":100,\"frames_s\":50000,\"rtt_us\":{{\"p50\":10,\"p99\":20,\"max\":30}},\"errors\":0,\"first_error\":null}}\n"
        );
        let r = NetEchoReport::find(&net).expect("a net-echo report parses");
        assert!(r.clean() && r.duplicates == 1 && r.rtt_us.p99 == 20);
        assert!(WorkloadReport::find(&net).is_none());
        let short = NetEchoReport {
            role: "send".into(),
            count: 5,
            frames: 4,
            ..r
        };
        assert!(!short.clean(), "a sender missing frames is not clean");
        assert!(
            NetTcpReport::find(&net).is_none(),
            "net-echo is not net-tcp"
        );
    }

    fn tcp_line(extra: &str) -> String {
        format!(
            "[c] {REPORT_PREFIX}{{\"id\":2,\"workload\":\"net-tcp\",\"role\":\"client\",\"mode\":\"bulk\",\"mac\":\"52:54:00:00:00:0a\",\"ip\":\"10.0.0.1\",\"peer\":\"10.0.0.2\",\"port\":5001,\"window\":16384,\"bytes\":4096,\"sent\":4096,\"received\":4096,\"verified\":4096,\"corrupt\":0,\"first_corrupt\":null,\"elapsed_us\":100,\"tx_mb_s\":40.96,\"rx_mb_s\":40.96,\"count\":0,\"size\":0,\"rounds\":0,\"rtt_us\":{{\"p50\":0,\"p99\":0,\"max\":0}},\"segments\":4,\"retransmits\":1,\"resets\":0,\"refused\":1,\"timeout\":false,\"closed\":true,\"link_down\":0,\"link_samples\":3,\"errors\":0,\"first_error\":null{extra}}}\n"
        )
    }

    #[test]
    fn a_net_tcp_report_parses_and_is_clean_only_when_every_byte_went_both_ways() {
        let r = NetTcpReport::find(&tcp_line("")).expect("a net-tcp report parses");
        assert!(r.clean(), "{r:?}");
        assert_eq!((r.retransmits, r.refused, r.tx_mb_s), (1, 1, 40.96));
        assert!(NetEchoReport::find(&tcp_line("")).is_none());
        assert!(WorkloadReport::find(&tcp_line("")).is_none());
        let dirty = [
            NetTcpReport {
                corrupt: 1,
                first_corrupt: Some(7),
                verified: 4095,
                ..r.clone()
            },
            NetTcpReport {
                resets: 1,
                ..r.clone()
            },
            NetTcpReport {
                timeout: true,
                ..r.clone()
            },
            NetTcpReport {
                errors: 1,
                ..r.clone()
            },
            NetTcpReport {
                received: 4000,
                verified: 4000,
                ..r.clone()
            },
            NetTcpReport {
                sent: 4000,
                ..r.clone()
            },
            NetTcpReport {
                verified: 4000,
                ..r.clone()
            },
            NetTcpReport {
                bytes: 0,
                sent: 0,
                received: 0,
                verified: 0,
                ..r.clone()
            },
        ];
        for d in &dirty {
            assert!(!d.clean(), "{d:?}");
        }
    }

    #[test]
    fn hostile_net_tcp_lines_do_not_parse_or_panic() {
        for line in [
            tcp_line(",\"extra\":1"),
            format!("{REPORT_PREFIX}{{\"workload\":\"net-tcp\"}}\n"),
            format!("{REPORT_PREFIX}{{\"workload\":\"net-tcp\",\"bytes\":-1}}\n"),
            format!("{REPORT_PREFIX}{{{{{{\n"),
            format!("{REPORT_PREFIX}{{\"workload\":\"net-tcp\",\"bytes\":1e999}}\n"),
            tcp_line("").replace("4096,\"sent\"", "18446744073709551616,\"sent\""),
            tcp_line("").replace("\"timeout\":false", "\"timeout\":0"),
        ] {
            let r = NetTcpReport::find(&line);
            // An unknown key is ignored (a newer guest may say more); anything malformed or
            // out of range is no report at all.
            if line.contains("\"extra\"") {
                assert!(r.is_some_and(|r| r.clean()), "{line}");
            } else {
                assert!(r.is_none(), "{line}");
            }
        }
    }
}
