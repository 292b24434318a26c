//! The ddvm workload client: a guest image that drives one virtio-blk device (virtio-mmio)
//! with a block workload whose every read is checked, and reports one machine-readable line
//! (or, in its network modes, a virtio-net device: raw verified frames, or verified TCP).
//! Built on guest-kernel like the driver domain; the virtio driver is the third-party
//! `virtio-drivers` crate (its MMIO transport and split virtqueue, driven directly in `blk`).
//!
//! # Booting it
//!
//! ddvm boots it like a driver domain (64-bit entry, boot info, console through the log ring);
//! QEMU boots it with `-kernel` through its PVH entry (console on COM1, `isa-debug-exit` at
//! port 0xf4 for the exit status). The device is named on the command line, Linux-style:
//!
//! - `virtio_mmio.device=SIZE@BASE[:IRQ[:ID]]`, one token per virtio-mmio device, e.g.
//!   `virtio_mmio.device=4K@0xd0000000`. SIZE takes K/M/G suffixes, BASE is hex (`0x`) or
//!   decimal; IRQ and ID are ignored (this image polls, interrupts are never used). The first
//!   window holding a device with DeviceID 2 (block) is used; windows must lie above RAM and
//!   below 4 GiB, and be at least 0x200 bytes.
//!
//! # Workload keys
//!
//! - `workload=randread|randwrite|randrw|seqread|seqwrite` (default `randrw`);
//! - `rwmix=N`: percent reads of `randrw` (default 70);
//! - `bs=BYTES`: block size, a multiple of 512 up to 1M and of the device's block size
//!   (default 4096; K/M suffixes allowed);
//! - `qd=N`: requests in flight, 1..=128 (default 32; fewer if the span has fewer blocks, or
//!   if the device offers no indirect descriptors and its queue cannot hold `qd` requests of 3
//!   descriptors);
//! - `count=N`: requests in the timed phase; `duration_ms=N`: its length. Default `count=10000`;
//!   with only `duration_ms` there is no count; with both, whichever ends first;
//! - `seed=N`: seed of the request sequence (default 1; the same seed and id give the same
//!   sequence);
//! - `id=N`: client id (default 0), stamped into every block;
//! - `span=BYTES`: use only the first BYTES of the device, rounded down to whole blocks
//!   (default: the whole device);
//! - `prefill=0|1`: write every block of the span before the timed phase, so every later read
//!   is checked (default 1 for workloads that read, 0 for the others);
//! - `flush_every=N`: FLUSH after every N acknowledged writes of the timed phase (default 0:
//!   only the one at its end);
//! - `flush=0|1`: send FLUSH at all (default 1); with 0 none is sent, not the pre-check's,
//!   not `flush_every`'s, not the one at the end: what the disk keeps of writes no client
//!   flushed is then the VMM's doing alone;
//! - `verify_pass=0|1`: after the timed phase and its flush, read back and check every block
//!   written in the run (default 1);
//! - `timeout_ms=N`: a request still in flight after N ms ends the run with an error
//!   (default 30000).
//!
//! Numbers are decimal or `0x` hex. Tokens with other keys are listed once and ignored.
//!
//! # What a run does
//!
//! 1. Negotiates VERSION_1, RING_INDIRECT_DESC, RING_EVENT_IDX, SEG_MAX, BLK_SIZE, FLUSH,
//!    TOPOLOGY, DISCARD, WRITE_ZEROES and RO (whatever is offered), queue 0 of 256 (or the
//!    largest of 128/64/16 the device allows).
//! 2. Pre-checks, each once through the queue: GET_ID (printed), WRITE_ZEROES of the span's
//!    first two blocks (written with data first, then read back and checked to be zero),
//!    DISCARD of blocks 2..4, FLUSH — each only when offered (not on a read-only device). A
//!    status other than OK is an error.
//! 3. Prefill (if enabled): every block of the span written once.
//! 4. The timed phase: `count`/`duration_ms` requests at depth `qd`, never two at once for the
//!    same block; FLUSH every `flush_every` acknowledged writes; then one FLUSH (counted in
//!    `flushes`, not in `elapsed_us`).
//! 5. The verify pass (if enabled): every block written in the run read and checked.
//!
//! Every block written carries a header (magic, run nonce, client id, generation, block
//! number, block size, checksum over the whole block) and a payload generated from them (see
//! `pattern`). Every read of a block whose last write was acknowledged is checked against it;
//! a mismatch is `lost` (an older generation, or a block of an earlier run), `misplaced`
//! (another block's or client's), `corrupt` (checksum or payload wrong, or a generation never
//! written) or unwritten (no header). Reads of blocks not written in this run (or whose last
//! write failed, or that were zeroed/discarded by the pre-checks) are `unverified`.
//!
//! # Notifications and waiting
//!
//! Requests are added in batches and QueueNotify is written once per batch, only when the
//! device asks for it (EVENT_IDX `avail_event`, else the used ring's NO_NOTIFY flag). Used-
//! buffer notifications are off while the client polls; when nothing completes for 30 µs it
//! turns them on (`used_event`, else the avail ring's NO_INTERRUPT flag), checks the used ring
//! once more, and calls `guest_kernel::vmm::wait(1000)` (the VMM ends the wait when it adds
//! used entries); after waking it turns them off again.
//!
//! # Report
//!
//! Progress lines (`ddvm-workload: ...`) are few. The last line is the report, one line of JSON
//! after the prefix `ddvm-workload: `:
//!
//! ```text
//! ddvm-workload: {"id":0,"workload":"randrw","bs":4096,"qd":32,"ops":N,"reads":N,"writes":N,
//!   "flushes":N,"bytes":N,"elapsed_us":N,"iops":N,"mib_s":F,"lat_us":{"p50":N,"p90":N,
//!   "p99":N,"max":N},"errors":N,"mismatches":N,"lost":N,"misplaced":N,"corrupt":N,
//!   "unverified":N,"verified":N,"first_error":null}
//! ```
//!
//! (one line in reality). `ops` = `reads` + `writes` of the timed phase (acknowledged OK);
//! `flushes`, `bytes`, `elapsed_us`, `iops`, `mib_s` and `lat_us` (reads and writes, µs, from
//! a log-linear histogram within 6 %) cover the timed phase only. `qd` is the depth used.
//! `errors` counts failed requests of any phase (status not OK, timeouts, device protocol
//! violations); `mismatches` = `lost` + `misplaced` + `corrupt` + unwritten; `verified` counts
//! reads whose data was checked and right (any phase); `first_error` describes the first error
//! or mismatch, or is null.
//!
//! # Network mode
//!
//! `workload=net-echo` drives the virtio-net device (the first window with DeviceID 1) through
//! virtio-drivers' `VirtIONetRaw` (see `net`): `role=send|echo`, `peer=MAC` (required to
//! send; an echo side given one checks the source), `count=N` (default 1000) or
//! `duration_ms=N` (stop starting frames then), `window=W` frames in flight (1..=32, default
//! 8), `retry_ms=N` before a frame is sent again (default 50), `seed=N`, `id=N`, `timeout_ms=N`
//! (the sender's whole run; the echo side's longest wait for a frame; default 60000). The
//! report: `{"id":N,"workload":"net-echo","role":"send","mac":"..","peer":"..","count":N,
//! "window":W,"frames":N,"sent":N,"received":N,"corrupt":N,"duplicates":N,"retries":N,
//! "dropped":N,"link_down":N,"link_samples":N,"elapsed_us":N,"frames_s":N,"rtt_us":{"p50":N,
//! "p99":N,"max":N},"errors":N,"first_error":null}` (`count` is the frames started). Exit 0
//! when nothing was corrupt, nothing failed and a sender got every frame it started back.
//!
//! # Net hostile mode
//!
//! `workload=net-hostile kind=oversized|zero-length|wrong-direction|ctrl-garbage|small-rx
//! [count=N] [timeout_ms=N]` drives the virtio-net device through its own raw queues and gets
//! one thing wrong `count` times (see `net_hostile.rs`); its line is
//! `ddvm-hostile: {"net_kind":..,"count":N,"answered":N,"expected":N,"needs_reset":false,"after_ok":true}`.
//!
//! # TCP mode
//!
//! `workload=net-tcp` runs one TCP connection to another workload client through the
//! third-party `smoltcp` stack (Ethernet, ARP, IPv4, TCP with Reno) on the same virtio-net
//! device (see `tcp`): `role=server|client`, `ip=A.B.C.D/LEN` (static; no DHCP, no gateway),
//! `peer=A.B.C.D` (required of a client; a server given one takes a connection only from it),
//! `port=N` (default 5001), `mode=bulk|rr` (default bulk), `bytes=N` (bulk: bytes each way,
//! K/M/G suffixes, default 1M), `count=N` and `size=N` (rr: round trips, default 1000, and
//! bytes of each request and answer, default 64), `window=N` (bytes of each socket buffer, 2K
//! to 1M, default 16K: see `config::TCP_WINDOW`), `seed=N`, `id=N`, `timeout_ms=N` (the whole
//! run, connecting included; default 60000). Both ends must be given the same mode, sizes and
//! seed. Bulk sends both directions at once; rr sends one request at a time and times each
//! round trip. Every byte received is checked against the sender's seeded stream. The report:
//! `{"id":N,"workload":"net-tcp","role":"client","mode":"bulk","mac":"..","ip":"..",
//! "peer":"..","port":N,"window":N,"bytes":N,"sent":N,"received":N,"verified":N,"corrupt":N,
//! "first_corrupt":null,"elapsed_us":N,"tx_mb_s":F,"rx_mb_s":F,"count":N,"size":N,
//! "rounds":N,"rtt_us":{"p50":N,"p99":N,"max":N},"segments":N,"retransmits":N,"resets":N,
//! "refused":N,"timeout":false,"closed":true,"link_down":N,"link_samples":N,"errors":N,
//! "first_error":null}` (`bytes` is each way's total, `count` × `size` in rr; what
//! `retransmits`, `resets` and `refused` count is in `tcp`'s docs). Exit 0 when every byte
//! went both ways and checked out, with no reset, timeout or error.
//!
//! # Hostile mode
//!
//! `hostile=CASE` submits one malformed request through the image's own 16-entry split
//! virtqueue on the raw registers (no virtio-drivers, no event index, no indirect
//! descriptors): `desc-loop`, `addr-outside`, `write-only-header`, `read-only-status`,
//! `zero-length`, `chain-too-long`, `sector-out-of-range` or `avail-jump`. It polls up to 2 s
//! for a used element or DEVICE_NEEDS_RESET and prints
//! `ddvm-hostile: {"case":"desc-loop","outcome":"needs-reset"|"status"|"nothing","status":N|null,"after_reset_ok":true|false|null}`;
//! after a reaction it resets the device, brings it up again and writes and reads back block 0
//! (`after_reset_ok`; null when there was no reaction and so no reset).
//!
//! # Exit status
//!
//! 0: no errors and no mismatches (hostile mode: the case ran); 2: any error or mismatch (or
//! no usable device: the report says why); 1: a bad command line (the message names the key
//! and what was expected).

#![no_std]
#![no_main]
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

mod blk;
mod device;
mod hal;
mod hostile;
mod net;
mod net_hostile;
mod pattern;
mod stats;
mod tcp;
mod workload;

use ddvm_cmdline::workload as config;
use guest_kernel::{boot, println, time, vmm};

use crate::config::{BadArg, Mode};
use crate::workload::Outcome;

guest_kernel::entry_point!(main);

/// Exit status: clean run.
const EXIT_OK: u32 = 0;
/// Exit status: bad command line.
const EXIT_BAD_ARG: u32 = 1;
/// Exit status: errors or mismatches.
const EXIT_FAILED: u32 = 2;

fn bad_arg(e: &BadArg) -> ! {
    println!("ddvm-workload: bad command line: {e}");
    vmm::exit(EXIT_BAD_ARG)
}

fn main() -> ! {
    let cmdline = guest_kernel::cmdline::get();
    println!(
        "ddvm-workload: booted on {} mem={} MiB tsc={} kHz ({:?}), heap {} KiB",
        boot::platform().name(),
        boot::info().mem_size >> 20,
        time::tsc_khz(),
        time::tsc_source(),
        guest_kernel::heap::free() >> 10
    );
    if cmdline.value("workload") == Some(net_hostile::WORKLOAD) {
        let found = device::windows(cmdline)
            .map_err(|e| alloc::format!("{e}"))
            .and_then(|w| device::find_net(&w));
        net_hostile::main(cmdline, found)
    }
    let (mode, unknown) = config::parse(cmdline).unwrap_or_else(|e| bad_arg(&e));
    if !unknown.is_empty() {
        println!(
            "ddvm-workload: ignoring unknown tokens: {}",
            unknown.join(" ")
        );
    }
    let windows = device::windows(cmdline).unwrap_or_else(|e| bad_arg(&e));
    if let Mode::NetEcho(cfg) = &mode {
        let ran = match device::find_net(&windows) {
            Ok(found) => net::run(cfg, &found),
            Err(e) => {
                println!("ddvm-workload: {e}");
                false
            }
        };
        vmm::exit(if ran { EXIT_OK } else { EXIT_FAILED })
    }
    if let Mode::NetTcp(cfg) = &mode {
        let ran = match device::find_net(&windows) {
            Ok(found) => tcp::run(cfg, &found),
            Err(e) => {
                println!("ddvm-workload: {e}");
                false
            }
        };
        vmm::exit(if ran { EXIT_OK } else { EXIT_FAILED })
    }
    let found = device::find_block(&windows);
    match mode {
        Mode::NetEcho(_) | Mode::NetTcp(_) => unreachable!("handled above"),
        Mode::Hostile(case) => {
            let ran = match found {
                Ok(found) => hostile::run(case, &found),
                Err(e) => {
                    println!("ddvm-hostile: {e}");
                    false
                }
            };
            vmm::exit(if ran { EXIT_OK } else { EXIT_FAILED })
        }
        Mode::Workload(cfg) => {
            let found = match found {
                Ok(f) => f,
                Err(e) => {
                    workload::report_failure(&cfg, e);
                    vmm::exit(EXIT_FAILED)
                }
            };
            match workload::run(&cfg, &found) {
                Outcome::BadArg(e) => bad_arg(&e),
                Outcome::Ran { clean: true } => vmm::exit(EXIT_OK),
                Outcome::Ran { clean: false } => vmm::exit(EXIT_FAILED),
            }
        }
    }
}
