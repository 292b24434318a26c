//! The ddvm driver-domain image: boots, finds the device the VMM gave it on PCI bus 0, picks
//! the driver its PCI class calls for (`driver::pick`: NVMe, class 01/08/02; the 8254x NIC,
//! class 02/00/00) and serves it to the VMM over the channel with the service of the
//! channel's class: block (`service`, through `driver::BlockDriver`) or network
//! (`net_service`, through `driver::NetDriver`). A device whose driver serves another class
//! than the channel's is refused before it is brought up (the channel marked failed, a panic
//! naming both). Heartbeats and takes fault-injection requests.
//!
//! Command-line modes and settings, for tests:
//! - `selftest`: drive the devices found without a channel, the NVMe controller and two 8254x
//!   NICs, and report one `nvme selftest: PASS|FAIL` or `net selftest: PASS|FAIL` line per
//!   test, then exit (status 0 when all passed); `selftest=nvme` / `selftest=net`: only one;
//! - `nvme=BB:DD.F` / `nvme=none`: where the controller is (default: scan bus 0);
//! - `nvme_bar0=0xBASE/0xSIZE`: where the VMM placed its BAR0 (the probe then does not size it);
//! - `nic=BB:DD.F` / `nic=none`, `nic_bar0=0xBASE/0xSIZE`: the same for a NIC; with `nic=` the
//!   `nvme=` keys are not looked at;
//! - `nic_intx`: the NIC's INTx line wakes the domain (a VFIO NIC without MSI-X): INTx stays
//!   enabled and the causes are acknowledged before each wait;
//! - `nic_clean`: the VMM hands the NIC over at its power-on state (its own model, reset
//!   completely at every hand-over): the driver skips its reset and the writes of power-on
//!   values ([`e1000::Options::clean`]);
//! - `nvme_timeout_ms=N`: NVMe command timeout (default 30000);
//! - `nvme_dbbuf=0`: do not use shadow doorbells even when the controller offers them;
//! - `poll_us=N`, `poll_busy_us=N`: how long the main loop polls before it waits in the VMM,
//!   idle and with device commands in flight (defaults 20 and 50 µs). Polling costs the CPU
//!   that whoever the domain waits for may need; waiting costs an exit. The VMM sets both to 0
//!   where it has one CPU;
//! - `wait_collects`: the VMM's waits take the completions the domain published (its block
//!   service runs a pass in them); without polling, the domain then leaves the notification of
//!   its completions to the wait that follows them;
//! - `spin=N`: before marking ready, run N iterations of a tight loop and report its cycles;
//! - `panic` / `ud2`: die right after boot through the panic / exception path;
//! - `boot_fault=N` (and `boot_fault_arg=N`, default 0): act on fault-injection request N
//!   during the device's bring-up, after the device is attached and before the domain marks
//!   itself ready: one that ends the domain makes a restart fail before ready; one that works
//!   through the channel applies to the first requests served. The VMM's chaos runs use it on
//!   domains they boot cold, and the channel's fault word (written before promotion, and read
//!   at the same point) on warm standbys;
//! - `fault=N` (and `fault_arg=N`, default 0): act on fault-injection request N
//!   (`ddvm_abi::channel::fault`) with that argument right after marking ready, as if the VMM
//!   had written them (proves each fault path without a VMM; see `faults`);
//! - `exit=N`: exit with status N right after marking ready;
//! - `idle`: without a channel, stay in the main loop instead of exiting with status 0;
//! - `standby`: a warm standby: boot, open the channel, then wait in the VMM (one exit) until
//!   it hands over the device; only then probe and bring up the controller.

#![no_std]
#![no_main]
#![deny(unsafe_code)]

extern crate alloc;

mod driver;
mod e1000;
mod faults;
mod net_service;
mod nvme;
mod selftest;
mod service;
mod vmm_channel;

use ddvm_abi::channel::{blk, class, net};
use guest_kernel::cmdline::Cmdline;
use guest_kernel::time::{self, Instant};
use guest_kernel::{arch, boot, println, vmm};

use alloc::boxed::Box;

use crate::driver::{BlockDriver, Driver, NetDriver};
use crate::faults::Injection;
use crate::net_service::NetService;
use crate::nvme::probe::{self, BarHint, Location};
use crate::nvme::{Controller, Options};
use crate::service::{ChannelService, Service};
use crate::vmm_channel::Channel;

guest_kernel::entry_point!(main);

/// How long the main loop polls the channel before it asks the VMM to wait.
const POLL_US: u64 = 20;
/// As `POLL_US`, while device commands are in flight.
const POLL_BUSY_US: u64 = 50;
/// How long a wait lasts when nothing kicks the domain.
const WAIT_US: u32 = 10_000;
/// As `WAIT_US`, while device commands are in flight and the device does not interrupt: the
/// completions are only seen by polling.
const WAIT_BUSY_US: u32 = 1_000;
/// Heap a standby touches before it waits: more than the controller's bring-up and the
/// service allocate.
const STANDBY_PREFAULT: usize = 512 << 10;
/// Time between heartbeat lines on the console (one a minute).
const HEARTBEAT_LOG_PERIOD_US: u64 = 60_000_000;

/// What the command line asks for.
struct Modes {
    spin: Option<u64>,
    panic: bool,
    ud2: bool,
    fault: Option<u32>,
    fault_arg: u32,
    boot_fault: Option<u32>,
    boot_fault_arg: u32,
    exit: Option<u32>,
    idle: bool,
    standby: bool,
    selftest: Option<selftest::Which>,
    nvme: Location,
    nvme_bar0: Option<BarHint>,
    nic: Option<Location>,
    nic_bar0: Option<BarHint>,
    nic_intx: bool,
    nic_clean: bool,
    nvme_options: Options,
    poll: Poll,
    /// The VMM's waits take the completions the domain published (`wait_collects`).
    wait_collects: bool,
}

/// How long the main loop polls before it waits, in µs.
#[derive(Clone, Copy)]
struct Poll {
    idle_us: u64,
    busy_us: u64,
}

impl Modes {
    fn parse(cmdline: Cmdline<'_>) -> Self {
        Modes {
            spin: number(cmdline, "spin"),
            panic: cmdline.flag("panic"),
            ud2: cmdline.flag("ud2"),
            fault: number(cmdline, "fault"),
            fault_arg: number(cmdline, "fault_arg").unwrap_or(0),
            boot_fault: number(cmdline, "boot_fault"),
            boot_fault_arg: number(cmdline, "boot_fault_arg").unwrap_or(0),
            exit: number(cmdline, "exit"),
            idle: cmdline.flag("idle"),
            standby: cmdline.flag("standby"),
            selftest: if cmdline.flag("selftest") {
                Some(selftest::Which::Found)
            } else {
                cmdline.value("selftest").and_then(|v| {
                    let which = selftest::Which::parse(v);
                    if which.is_none() {
                        println!(
                            "ddvm driver-domain: ignoring selftest={v:?}: not nvme, net or all"
                        );
                    }
                    which
                })
            },
            nvme: cmdline
                .value("nvme")
                .and_then(|v| {
                    let at = Location::parse(v);
                    if at.is_none() {
                        println!("ddvm driver-domain: ignoring nvme={v:?}: not BB:DD.F or none");
                    }
                    at
                })
                .unwrap_or(Location::Scan),
            nvme_bar0: cmdline.value("nvme_bar0").and_then(|v| {
                let hint = BarHint::parse(v);
                if hint.is_none() {
                    println!("ddvm driver-domain: ignoring nvme_bar0={v:?}: not 0xBASE/0xSIZE");
                }
                hint
            }),
            nic: cmdline.value("nic").and_then(|v| {
                let at = Location::parse(v);
                if at.is_none() {
                    println!("ddvm driver-domain: ignoring nic={v:?}: not BB:DD.F or none");
                }
                at
            }),
            nic_bar0: cmdline.value("nic_bar0").and_then(|v| {
                let hint = BarHint::parse(v);
                if hint.is_none() {
                    println!("ddvm driver-domain: ignoring nic_bar0={v:?}: not 0xBASE/0xSIZE");
                }
                hint
            }),
            nic_intx: cmdline.flag("nic_intx"),
            nic_clean: cmdline.flag("nic_clean"),
            nvme_options: Options {
                command_timeout_ms: number(cmdline, "nvme_timeout_ms")
                    .unwrap_or(Options::default().command_timeout_ms),
                shadow_doorbells: number::<u8>(cmdline, "nvme_dbbuf") != Some(0),
                ..Options::default()
            },
            poll: Poll {
                idle_us: number(cmdline, "poll_us").unwrap_or(POLL_US),
                busy_us: number(cmdline, "poll_busy_us").unwrap_or(POLL_BUSY_US),
            },
            wait_collects: cmdline.flag("wait_collects"),
        }
    }
}

/// A numeric `key=N`; a value that does not parse is reported and ignored.
fn number<T: core::str::FromStr>(cmdline: Cmdline<'_>, key: &str) -> Option<T> {
    match cmdline.parse(key)? {
        Ok(v) => Some(v),
        Err(text) => {
            println!("ddvm driver-domain: ignoring {key}={text:?}: not a number");
            None
        }
    }
}

fn main() -> ! {
    let info = boot::info();
    let cmdline = guest_kernel::cmdline::get();
    println!(
        "ddvm driver-domain: booted on {} mem={} MiB tsc={} kHz cmdline=\"{}\"",
        boot::platform().name(),
        info.mem_size >> 20,
        time::tsc_khz(),
        cmdline.as_str()
    );
    println!(
        "ddvm driver-domain: tsc from {:?}, heap {} KiB, console {:?}",
        time::tsc_source(),
        guest_kernel::heap::size() >> 10,
        guest_kernel::console::sink()
    );
    let modes = Modes::parse(cmdline);
    if modes.panic {
        panic!("panic requested on the command line");
    }
    if modes.ud2 {
        guest_kernel::fault::invalid_opcode();
    }
    if let Some(n) = modes.spin {
        let start = time::ticks();
        arch::cpu::spin_iterations(n);
        let cycles = time::ticks().wrapping_sub(start);
        println!("spin done iterations={n} cycles={cycles}");
    }

    if let Some(which) = modes.selftest {
        selftest::run(which, modes.nvme, modes.nvme_options);
    }

    let mut service = boot::channel().map(|region| {
        let ch = Channel::open(region).unwrap_or_else(|e| panic!("cannot use the channel: {e}"));
        if let Err(e) = ch.check_geometry() {
            service::fail(&ch, format_args!("cannot use the channel: {e}"));
        }
        // A class without a service here is refused before the device is touched.
        if let Err(e) = ch.check_class(&[class::BLK, class::NET]) {
            service::fail(&ch, format_args!("cannot use the channel: {e}"));
        }
        if modes.standby {
            // Everything up to here is the boot a restart no longer waits for; so is the
            // first touch of the heap the bring-up will use (a shadow page fault, ~25 µs, on
            // each page).
            prefault_heap(STANDBY_PREFAULT);
            vmm::standby();
        }
        let device = attach(&ch, &modes);
        // A fault asked for during bring-up (see `boot_fault`): the domain dies or hangs with
        // its device attached and live, before it is ready.
        let bring_up_fault = ch.take_fault().or(modes.boot_fault.map(|code| Injection {
            code,
            arg: modes.boot_fault_arg,
        }));
        let bring_up_fault = bring_up_fault.filter(|f| {
            if faults::needs_service(f.code) {
                return true;
            }
            println!("ddvm driver-domain: fault during bring-up");
            faults::inject(*f, None);
            false
        });
        let mut service: Box<dyn ChannelService> = if ch.header().class == class::NET {
            Box::new(net_channel(ch, device.and_then(Device::into_net)))
        } else {
            Box::new(block_channel(ch, device.and_then(Device::into_block)))
        };
        // A channel fault found during bring-up applies to the first requests served.
        if let Some(f) = bring_up_fault {
            faults::inject(f, Some(service.as_mut()));
        }
        service
    });
    if let Some(code) = modes.fault {
        let arg = modes.fault_arg;
        let s = service
            .as_mut()
            .map(|s| &mut **s as &mut dyn ChannelService);
        faults::inject(Injection { code, arg }, s);
    }
    if let Some(status) = modes.exit {
        vmm::exit(status);
    }
    if service.is_none() && !modes.idle {
        println!("no channel: exiting");
        vmm::exit(vmm::STATUS_SUCCESS);
    }
    // Without polling, a wait follows every publication at once; where the VMM's waits take
    // the completions, that wait is the notification.
    if modes.wait_collects && modes.poll.idle_us == 0 && modes.poll.busy_us == 0 {
        if let Some(s) = service.as_deref_mut() {
            s.leave_notify_to_wait();
        }
    }
    serve(service, modes.poll)
}

/// Touches `bytes` of the heap's low end, where the next allocations go, and gives them back.
fn prefault_heap(bytes: usize) {
    let mut v = alloc::vec::Vec::<u8>::new();
    if v.try_reserve_exact(bytes).is_ok() {
        v.spare_capacity_mut().fill(core::mem::MaybeUninit::new(0));
        core::hint::black_box(&v);
    }
}

/// The device a driver was brought up for.
enum Device {
    Block(Box<dyn BlockDriver>),
    Net(Box<dyn NetDriver>),
}

impl Device {
    fn into_block(self) -> Option<Box<dyn BlockDriver>> {
        match self {
            Device::Block(d) => Some(d),
            Device::Net(_) => None,
        }
    }

    fn into_net(self) -> Option<Box<dyn NetDriver>> {
        match self {
            Device::Net(d) => Some(d),
            Device::Block(_) => None,
        }
    }
}

/// Publishes the block device info, marks ready and builds the block service.
fn block_channel(ch: Channel, disk: Option<Box<dyn BlockDriver>>) -> Service {
    let info = disk.as_ref().map_or_else(blk::DeviceInfo::default, |d| {
        service::device_info(&d.properties(), ch.header().max_transfer)
    });
    if disk.is_some() && info.max_transfer == 0 {
        service::fail(
            &ch,
            format_args!(
                "channel max_transfer {} is below the device's block size",
                ch.header().max_transfer
            ),
        );
    }
    ch.write_device_info(&info);
    ch.mark_ready();
    println!("ready epoch={}", ch.epoch());
    Service::new(ch, disk, info)
}

/// Publishes the network device info, marks ready and builds the network service.
fn net_channel(ch: Channel, nic: Option<Box<dyn NetDriver>>) -> NetService {
    let info = nic.as_ref().map_or_else(net::DeviceInfo::default, |n| {
        net_service::device_info(&n.properties(), n.link(), "Intel 8254x (e1000)")
    });
    if nic.is_some() && ch.header().max_transfer < info.rx_buffer {
        service::fail(
            &ch,
            format_args!(
                "channel max_transfer {} is below the NIC's receive buffer of {}",
                ch.header().max_transfer,
                info.rx_buffer
            ),
        );
    }
    ch.write_device_info(&info);
    ch.mark_ready();
    println!("ready epoch={}", ch.epoch());
    NetService::new(ch, nic, info)
}

/// Finds the device the VMM gave the domain (`nic=` if given, else `nvme=`), picks its driver
/// from its PCI class, checks that the driver serves the channel's class, and brings it up, if
/// there is one. A device that is present but unusable, or of another class than the
/// channel's, is fatal (the channel is marked failed first).
fn attach(ch: &Channel, modes: &Modes) -> Option<Device> {
    let (wanted, location, hint, intx) = match modes.nic {
        Some(at) => (Driver::E1000, at, modes.nic_bar0, modes.nic_intx),
        None => (Driver::Nvme, modes.nvme, modes.nvme_bar0, false),
    };
    let found = match probe::find_for(wanted, location, hint, intx) {
        Ok(Some(found)) => found,
        Ok(None) => {
            println!(
                "{}: no device found: requests complete UNSUPPORTED",
                wanted.name()
            );
            return None;
        }
        Err(e) => service::fail(ch, format_args!("{e}")),
    };
    let f = &found.function;
    let Some(driver) = driver::pick(f) else {
        service::fail(
            ch,
            format_args!(
                "no driver for {:04x}:{:04x} class {:06x} at {}",
                f.vendor, f.device, f.class, f.bdf
            ),
        )
    };
    let served = ch.header().class;
    if driver.class() != served {
        service::fail(
            ch,
            format_args!(
                "the channel is of class {served} ({}) but the device at {} ({:04x}:{:04x}, \
                 PCI class {:06x}) is for the {} driver, class {} ({})",
                class::name(served),
                f.bdf,
                f.vendor,
                f.device,
                f.class,
                driver.name(),
                driver.class(),
                class::name(driver.class())
            ),
        );
    }
    match driver {
        Driver::Nvme => {
            println!(
                "nvme: controller {:04x}:{:04x} at {}, BAR0 {:#x}",
                f.vendor, f.device, f.bdf, found.bar.base
            );
            let start = Instant::now();
            let vector = nvme::irq::enable(f.bdf, &found.bar, &found.registers);
            match Controller::init(found.registers, modes.nvme_options, vector) {
                Ok(disk) => {
                    println!("{} (ready in {} us)", disk.info(), start.elapsed_us());
                    Some(Device::Block(Box::new(disk)))
                }
                Err(e) => service::fail(ch, format_args!("{e}")),
            }
        }
        Driver::E1000 => {
            let Some(model) = e1000::probe::model(f) else {
                service::fail(ch, format_args!("e1000: unknown part at {}", f.bdf))
            };
            let found = e1000::probe::Found {
                function: *f,
                model,
                bar: found.bar,
                registers: found.registers,
            };
            let start = Instant::now();
            let options = e1000::Options {
                intx,
                clean: modes.nic_clean,
                ..e1000::Options::default()
            };
            match e1000::Nic::init(&found, options) {
                Ok(nic) => {
                    println!(
                        "e1000: {:04x}:{:04x} at {}, BAR0 {:#x}, MAC {}, {}{} (ready in {} us)",
                        f.vendor,
                        f.device,
                        f.bdf,
                        found.bar.base,
                        nic.mac(),
                        if intx { "INTx" } else { "polled" },
                        if modes.nic_clean {
                            ", handed over clean"
                        } else {
                            ""
                        },
                        start.elapsed_us()
                    );
                    Some(Device::Net(Box::new(nic)))
                }
                Err(e) => service::fail(ch, format_args!("{e}")),
            }
        }
    }
}

/// The main loop: heartbeat, fault injection, serve the channel; when idle, poll a little,
/// then wait.
fn serve(mut service: Option<Box<dyn ChannelService>>, poll: Poll) -> ! {
    let mut last_log = Instant::now();
    let mut polling = Instant::now();
    loop {
        if let Some(s) = service.as_deref_mut() {
            let ch = s.channel_mut();
            let beat = ch.beat();
            if let Some(f) = ch.take_fault() {
                faults::inject(f, Some(&mut *s));
            }
            if last_log.elapsed_us() >= HEARTBEAT_LOG_PERIOD_US {
                println!("heartbeat {beat}");
                last_log = Instant::now();
            }
            if s.pass() {
                polling = Instant::now();
                continue;
            }
        }
        let in_flight = service.as_deref().map_or(0, |s| s.in_flight());
        // A device that interrupts ends the wait when it completes a command.
        let polled = service.as_deref().is_some_and(|s| s.polled_wait());
        let poll_us = if in_flight > 0 {
            poll.busy_us
        } else {
            poll.idle_us
        };
        if polling.elapsed_us() < poll_us {
            core::hint::spin_loop();
            continue;
        }
        if service
            .as_deref()
            .is_some_and(|s| s.channel().fault_pending())
        {
            continue;
        }
        if !service.as_deref_mut().is_none_or(|s| s.prepare_wait()) {
            continue;
        }
        vmm::wait(if polled { WAIT_BUSY_US } else { WAIT_US });
        if let Some(s) = service.as_deref_mut() {
            s.woke();
        }
        polling = Instant::now();
    }
}
