//! The ddvm driver-domain image (this stage: boot, channel handshake, heartbeat, fault
//! injection; the device drivers come next).
//!
//! Command-line modes, for tests:
//! - `spin=N`: before marking ready, run N iterations of a tight loop and report its cycles;
//! - `panic` / `ud2`: die right after boot through the panic / exception path;
//! - `fault=N`: act on fault-injection request N (`ddvm_abi::channel::fault`) right after
//!   marking ready, as if the VMM had written it (proves each fault path without a VMM);
//! - `exit=N`: exit with status N right after marking ready;
//! - `idle`: without a channel, stay in the main loop instead of exiting with status 0.

#![no_std]
#![no_main]
#![deny(unsafe_code)]

mod channel;

use ddvm_abi::channel::fault;
use guest_kernel::cmdline::Cmdline;
use guest_kernel::time::{self, Instant};
use guest_kernel::{arch, boot, println, vmm};

use crate::channel::Channel;

guest_kernel::entry_point!(main);

/// How long the main loop polls the channel before it asks the VMM to wait.
const POLL_US: u64 = 20;
/// How long a wait lasts when nothing kicks the domain.
const WAIT_US: u32 = 10_000;
/// Time between heartbeat lines on the console (one a minute).
const HEARTBEAT_LOG_PERIOD_US: u64 = 60_000_000;

/// What the command line asks for.
struct Modes {
    spin: Option<u64>,
    panic: bool,
    ud2: bool,
    fault: Option<u32>,
    exit: Option<u32>,
    idle: bool,
}

impl Modes {
    fn parse(cmdline: Cmdline<'_>) -> Self {
        Modes {
            spin: number(cmdline, "spin"),
            panic: cmdline.flag("panic"),
            ud2: cmdline.flag("ud2"),
            fault: number(cmdline, "fault"),
            exit: number(cmdline, "exit"),
            idle: cmdline.flag("idle"),
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
    let cmdline = Cmdline::get();
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

    let mut channel = boot::channel().map(|region| {
        Channel::open(region).unwrap_or_else(|e| panic!("cannot use the channel: {e}"))
    });
    if let Some(ch) = &channel {
        ch.mark_ready();
        println!("ready epoch={}", ch.epoch());
    }
    if let Some(request) = modes.fault {
        inject(request);
    }
    if let Some(status) = modes.exit {
        vmm::exit(status);
    }
    if channel.is_none() && !modes.idle {
        println!("no channel: exiting");
        vmm::exit(vmm::STATUS_SUCCESS);
    }
    serve(channel.as_mut())
}

/// The main loop: heartbeat, fault injection, poll a little, then wait.
fn serve(mut channel: Option<&mut Channel>) -> ! {
    let mut last_log = Instant::now();
    loop {
        if let Some(ch) = channel.as_deref_mut() {
            let beat = ch.beat();
            if let Some(f) = ch.take_fault() {
                inject(f);
            }
            if last_log.elapsed_us() >= HEARTBEAT_LOG_PERIOD_US {
                println!("heartbeat {beat}");
                last_log = Instant::now();
            }
        }
        let polling = Instant::now();
        while polling.elapsed_us() < POLL_US {
            if channel.as_deref().is_some_and(Channel::fault_pending) {
                break;
            }
            core::hint::spin_loop();
        }
        if !channel.as_deref().is_some_and(Channel::fault_pending) {
            vmm::wait(WAIT_US);
        }
    }
}

/// Acts on a fault-injection request from the VMM.
fn inject(request: u32) {
    println!("fault injected: {request}");
    match request {
        fault::PANIC => panic!("fault injected: panic"),
        fault::INVALID_OPCODE => guest_kernel::fault::invalid_opcode(),
        fault::PAGE_FAULT => guest_kernel::fault::page_fault(),
        fault::HANG => guest_kernel::fault::hang(),
        fault::TRIPLE_FAULT => guest_kernel::fault::triple_fault(),
        other => println!("ignoring unknown fault request {other}"),
    }
}
