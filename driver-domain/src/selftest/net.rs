//! The network half of `selftest`: two 8254x NICs on one segment (under QEMU, two e1000
//! models on one hub) send each other a known pattern of frames and check every byte.
//!
//! Each NIC is brought up, its MAC address read from the EEPROM and required to agree with
//! RAR0, its link required up. Its receive filters take its own address, one multicast group
//! and broadcast. Each side then sends [`FRAMES`] frames to the other (lengths from 60 to 1514
//! bytes, ethertype 0x88B5, a header with the direction and sequence number, then a PRNG
//! payload; every eighth to the peer's multicast group), and between them decoys that the
//! peer's filters must drop (another unicast address, a multicast group it did not join).
//! Sending is paced: a side never has more frames on the wire than the peer has receive
//! buffers posted, so nothing may be lost; every frame must arrive, in order, intact.
//! Then both drivers are restarted on the live devices (as a domain restart would: the
//! devices keep their state, the link must stay up) and a second, shorter round runs. The
//! device's statistics must agree with what was sent and received, with no misses or errors.
//!
//! One line reports it: `net selftest: PASS mac0=.. mac1=.. frames=N` (frames received and
//! checked, both directions, both rounds) or `net selftest: FAIL <what>`.

#![forbid(unsafe_code)]

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use guest_kernel::dma::DmaBuffer;
use guest_kernel::println;
use guest_kernel::time::Instant;

use crate::driver::{Direction, MacAddress, NetCompleted, NetDriver, RxFilters};
use crate::e1000::probe::{self, Found};
use crate::e1000::{Nic, Options};

/// Frames each way in the first round (not a multiple of the ring sizes, so the restart finds
/// the devices' ring heads away from 0).
pub const FRAMES: u32 = 100;
/// Frames each way after the drivers' restart.
pub const FRAMES_AFTER_RESTART: u32 = 16;
/// Experimental ethertype (IEEE 802 local experimental 1).
const ETHERTYPE: u16 = 0x88b5;
/// Shortest and longest frame sent (without FCS).
const MIN_LEN: u32 = 60;
const MAX_LEN: u32 = 1514;
/// Bytes per buffer slot.
const SLOT: u64 = 2048;
/// Receive buffers each NIC keeps posted (also the pacing window).
const RX_BUFFERS: usize = 32;
/// How long a round may take (QEMU's model holds received frames for a second after each
/// RCTL write).
const ROUND_TIMEOUT_US: u64 = 20_000_000;
/// How long the link may take to come up.
const LINK_TIMEOUT_US: u64 = 5_000_000;
/// Header byte that marks a decoy.
const DECOY: u8 = 0xdd;
/// An individual address neither NIC has.
const STRANGER: MacAddress = MacAddress([0x52, 0x54, 0x00, 0xfe, 0xed, 0x01]);
/// A group neither NIC joined (its hash bit differs from both joined groups').
const OTHER_GROUP: MacAddress = MacAddress([0x01, 0x00, 0x5e, 0x10, 0x20, 0x30]);

/// The multicast group NIC `side` joins.
fn group(side: usize) -> MacAddress {
    MacAddress([0x01, 0x00, 0x5e, 0x7f, 0x00, 0x01 + side as u8])
}

/// Runs the test; prints its line; returns whether it passed.
pub fn run() -> bool {
    let start = Instant::now();
    match test() {
        Ok((macs, frames)) => {
            println!("net selftest: done in {} ms", start.elapsed_us() / 1000);
            println!(
                "net selftest: PASS mac0={} mac1={} frames={frames}",
                macs[0], macs[1]
            );
            true
        }
        Err(what) => {
            println!("net selftest: FAIL {what}");
            false
        }
    }
}

/// Whether bus 0 has an 8254x function.
pub fn present() -> bool {
    guest_kernel::pci::enumerate_bus0()
        .iter()
        .any(|f| probe::model(f).is_some())
}

fn test() -> Result<([MacAddress; 2], u32), String> {
    let found = probe::find_all().map_err(|e| format!("{e}"))?;
    if found.len() < 2 {
        return Err(format!(
            "found {} 8254x NICs, the test needs two",
            found.len()
        ));
    }
    let found = [found[0], found[1]];
    let mut nics = [bring_up(&found[0], 0)?, bring_up(&found[1], 1)?];
    let macs = [nics[0].properties().mac, nics[1].properties().mac];
    if macs[0] == macs[1] {
        return Err(format!("both NICs have the address {}", macs[0]));
    }
    let (mut frames, sent) = round(&mut nics, macs, FRAMES, 0)?;
    check_stats(&mut nics, FRAMES, sent)?;
    shutdown(&mut nics)?;

    // A restart: fresh drivers on devices that keep whatever the last ones left.
    drop(nics);
    let restart = Instant::now();
    let mut nics = [bring_up(&found[0], 0)?, bring_up(&found[1], 1)?];
    println!(
        "e1000: both drivers restarted in {} us",
        restart.elapsed_us()
    );
    for (i, nic) in nics.iter().enumerate() {
        if nic.properties().mac != macs[i] {
            return Err(format!(
                "NIC {i} reads {} after the restart, {} before",
                nic.properties().mac,
                macs[i]
            ));
        }
    }
    let (received, sent) = round(&mut nics, macs, FRAMES_AFTER_RESTART, 1)?;
    frames += received;
    check_stats(&mut nics, FRAMES_AFTER_RESTART, sent)?;
    shutdown(&mut nics)?;
    Ok((macs, frames))
}

/// Brings up `found` as NIC `side`, checks its address and link, sets its filters.
fn bring_up(found: &Found, side: usize) -> Result<Box<dyn NetDriver>, String> {
    let f = &found.function;
    let start = Instant::now();
    let nic = Nic::init(found, Options::default())
        .map_err(|e| format!("{} at {}: {e}", found.model, f.bdf))?;
    let us = start.elapsed_us();
    let origin = nic.mac_origin();
    let (Some(eeprom), Some(rar0)) = (origin.eeprom, origin.rar0) else {
        return Err(format!(
            "{} at {}: MAC address from EEPROM {:?}, RAR0 {:?}: both wanted",
            found.model, f.bdf, origin.eeprom, origin.rar0
        ));
    };
    if eeprom != rar0 {
        return Err(format!(
            "{} at {}: EEPROM says {eeprom}, RAR0 says {rar0}",
            found.model, f.bdf
        ));
    }
    let mac = nic.mac();
    let mut nic: Box<dyn NetDriver> = Box::new(nic);
    // The link must be up at once or soon: the driver never restarts autonegotiation.
    let wait = Instant::now();
    let link = loop {
        let link = nic.link();
        if link.up {
            break link;
        }
        if wait.elapsed_us() > LINK_TIMEOUT_US {
            return Err(format!("{} at {}: link down", found.model, f.bdf));
        }
        core::hint::spin_loop();
    };
    println!(
        "e1000: {} {:04x}:{:04x} at {}, BAR0 {:#x}: mac {} (EEPROM = RAR0), link up {} Mb/s {} \
         (after {} us), ready in {us} us, interrupts {}",
        found.model,
        f.vendor,
        f.device,
        f.bdf,
        found.bar.base,
        mac,
        link.speed_mbps,
        if link.full_duplex {
            "full duplex"
        } else {
            "half duplex"
        },
        wait.elapsed_us(),
        if nic.interrupts() {
            "wake the domain"
        } else {
            "masked, polled"
        },
    );
    nic.set_filters(&RxFilters {
        mac,
        unicast: &[],
        multicast: &[group(side)],
        broadcast: true,
        all_unicast: false,
        all_multicast: false,
    })
    .map_err(|e| format!("setting filters: {e}"))?;
    Ok(nic)
}

/// Length of frame `seq` of a round.
fn frame_len(seq: u32) -> u32 {
    match seq {
        0 => MIN_LEN,
        1 => MAX_LEN,
        _ => MIN_LEN + (seq * 733 + 17) % (MAX_LEN - MIN_LEN + 1),
    }
}

/// Destination of frame `seq` sent to `peer`.
fn destination(seq: u32, peer: usize, macs: [MacAddress; 2]) -> MacAddress {
    if seq % 8 == 7 {
        group(peer)
    } else {
        macs[peer]
    }
}

/// Byte `i` of the payload of frame `seq` from `side` in `round` (a xorshift stream).
fn payload(side: usize, round: u32, seq: u32, out: &mut [u8]) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64
        ^ (side as u64) << 56
        ^ u64::from(round) << 48
        ^ u64::from(seq).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// Frame `seq` from `side` (or a decoy with `dst`).
fn frame(
    side: usize,
    round: u32,
    seq: u32,
    src: MacAddress,
    dst: MacAddress,
    decoy: bool,
) -> Vec<u8> {
    let len = if decoy { 64 } else { frame_len(seq) } as usize;
    let mut f = alloc::vec![0u8; len];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14] = if decoy { DECOY } else { side as u8 };
    f[15] = round as u8;
    f[16..20].copy_from_slice(&seq.to_be_bytes());
    payload(side, round, seq, &mut f[20..]);
    f
}

/// One side's progress in a round.
struct Side {
    /// Transmit slots (one per frame and decoy, in sending order).
    tx: DmaBuffer,
    /// What goes out, in order: (sequence number, decoy).
    plan: Vec<(u32, bool)>,
    sent: usize,
    tx_done: usize,
    /// Frames of the peer's received and checked so far.
    received: u32,
    rx: DmaBuffer,
}

/// Sends `count` frames each way and checks them; returns frames received (both ways) and
/// frames each side sent (decoys included).
fn round(
    nics: &mut [Box<dyn NetDriver>; 2],
    macs: [MacAddress; 2],
    count: u32,
    round: u32,
) -> Result<(u32, u64), String> {
    let mut sides = Vec::new();
    for side in 0..2 {
        let mut plan = Vec::new();
        for seq in 0..count {
            if seq % 16 == 8 {
                plan.push((seq, true));
            }
            plan.push((seq, false));
        }
        let pages = (plan.len() as u64 * SLOT).div_ceil(4096) as usize;
        let tx = DmaBuffer::new(pages).ok_or("out of memory for transmit buffers")?;
        for (i, (seq, decoy)) in plan.iter().enumerate() {
            let dst = if !*decoy {
                destination(*seq, 1 - side, macs)
            } else if seq % 32 == 8 {
                STRANGER
            } else {
                OTHER_GROUP
            };
            tx.write_bytes(
                i as u64 * SLOT,
                &frame(side, round, *seq, macs[side], dst, *decoy),
            );
        }
        let rx = DmaBuffer::new(RX_BUFFERS * SLOT as usize / 4096)
            .ok_or("out of memory for receive buffers")?;
        for slot in 0..RX_BUFFERS {
            rx.fill(slot as u64 * SLOT, SLOT, 0xa5);
            nics[side]
                .post_receive(rx.addr() + slot as u64 * SLOT, SLOT as u32, slot as u64)
                .map_err(|e| format!("NIC {side}: posting receive buffer {slot}: {e}"))?;
        }
        nics[side].ring();
        sides.push(Side {
            tx,
            plan,
            sent: 0,
            tx_done: 0,
            received: 0,
            rx,
        });
    }

    let start = Instant::now();
    let mut scratch = alloc::vec![0u8; SLOT as usize];
    loop {
        let finished = sides
            .iter()
            .all(|s| s.received == count && s.tx_done == s.plan.len());
        if finished {
            break;
        }
        if start.elapsed_us() > ROUND_TIMEOUT_US {
            let s: Vec<String> = (0..2)
                .map(|i| {
                    format!(
                        "NIC {i} sent {}/{} (completed {}), received {}/{count}",
                        sides[i].sent,
                        sides[i].plan.len(),
                        sides[i].tx_done,
                        sides[i].received
                    )
                })
                .collect();
            return Err(format!("round {round} timed out: {}; {}", s[0], s[1]));
        }
        // Send, paced by what the peer has received.
        for side in 0..2 {
            let peer_received = sides[1 - side].received;
            let s = &mut sides[side];
            while s.sent < s.plan.len()
                && nics[side].in_flight(Direction::Transmit)
                    < nics[side].capacity(Direction::Transmit)
            {
                let (seq, decoy) = s.plan[s.sent];
                if !decoy && seq >= peer_received + RX_BUFFERS as u32 {
                    break;
                }
                let len = if decoy { 64 } else { frame_len(seq) };
                nics[side]
                    .transmit(s.tx.addr() + s.sent as u64 * SLOT, len, s.sent as u64)
                    .map_err(|e| format!("NIC {side}: transmit {seq}: {e}"))?;
                s.sent += 1;
            }
            nics[side].ring();
        }
        // Completions.
        for side in 0..2 {
            let mut done: Vec<NetCompleted> = Vec::new();
            nics[side]
                .poll(&mut |c| done.push(c))
                .map_err(|e| format!("NIC {side}: {e}"))?;
            for c in done {
                if !c.status.is_success() {
                    return Err(format!(
                        "NIC {side}: {:?} token {} completed with {}",
                        c.direction, c.token, c.status
                    ));
                }
                match c.direction {
                    Direction::Transmit => {
                        let s = &mut sides[side];
                        if c.token != s.tx_done as u64 {
                            return Err(format!(
                                "NIC {side}: transmit {} completed, expected {}",
                                c.token, s.tx_done
                            ));
                        }
                        s.tx_done += 1;
                    }
                    Direction::Receive => {
                        let slot = c.token;
                        if slot >= RX_BUFFERS as u64 {
                            return Err(format!(
                                "NIC {side}: receive token {slot} was never posted"
                            ));
                        }
                        let len = c.len as usize;
                        if len > SLOT as usize {
                            return Err(format!(
                                "NIC {side}: received {len} bytes into a {SLOT}-byte buffer"
                            ));
                        }
                        sides[side].rx.read_bytes(slot * SLOT, &mut scratch[..len]);
                        let expect = sides[side].received;
                        check_received(&scratch[..len], 1 - side, round, expect, macs, side)
                            .map_err(|e| format!("NIC {side} round {round}: {e}"))?;
                        sides[side].received += 1;
                        sides[side].rx.fill(slot * SLOT, SLOT, 0xa5);
                        nics[side]
                            .post_receive(sides[side].rx.addr() + slot * SLOT, SLOT as u32, slot)
                            .map_err(|e| format!("NIC {side}: reposting buffer {slot}: {e}"))?;
                    }
                }
            }
            nics[side].ring();
        }
    }
    for (side, nic) in nics.iter_mut().enumerate() {
        if nic.completion_pending() {
            return Err(format!("NIC {side}: a completion appeared after the round"));
        }
        let events = nic.acknowledge();
        if !(events.received && events.transmitted) {
            return Err(format!(
                "NIC {side}: interrupt causes after the round: {events:?}, expected received and \
                 transmitted"
            ));
        }
    }
    println!(
        "net selftest: round {round}: {count} frames each way in {} ms",
        start.elapsed_us() / 1000
    );
    Ok((2 * count, sides[0].plan.len() as u64))
}

/// Checks a received frame: from `from`, sequence `seq`, every byte as sent.
fn check_received(
    got: &[u8],
    from: usize,
    round: u32,
    seq: u32,
    macs: [MacAddress; 2],
    to: usize,
) -> Result<(), String> {
    if got.len() >= 15 && got[14] == DECOY {
        return Err(String::from(
            "received a decoy its filters should have dropped",
        ));
    }
    if got.len() >= 20 {
        let got_seq = u32::from_be_bytes([got[16], got[17], got[18], got[19]]);
        if got_seq != seq || got[14] != from as u8 || got[15] != round as u8 {
            return Err(format!(
                "expected frame {seq} from NIC {from}, got frame {got_seq} (side byte {}, round {})",
                got[14], got[15]
            ));
        }
    }
    let want = frame(
        from,
        round,
        seq,
        macs[from],
        destination(seq, to, macs),
        false,
    );
    if got.len() != want.len() {
        return Err(format!(
            "frame {seq}: {} bytes, sent {}",
            got.len(),
            want.len()
        ));
    }
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        return Err(format!(
            "frame {seq} byte {i}: {:#04x}, sent {:#04x}",
            got[i], want[i]
        ));
    }
    Ok(())
}

/// The counters must match a round of `count` frames received and `sent` frames sent by each.
fn check_stats(nics: &mut [Box<dyn NetDriver>; 2], count: u32, sent: u64) -> Result<(), String> {
    for (i, nic) in nics.iter_mut().enumerate() {
        let s = nic.stats();
        println!(
            "e1000: NIC {i} good_rx={} good_tx={} missed={} rx_errors={} tx_errors={}",
            s.good_rx, s.good_tx, s.missed, s.rx_errors, s.tx_errors
        );
        if s.missed != 0 || s.rx_errors != 0 || s.tx_errors != 0 {
            return Err(format!("NIC {i}: counters report loss or errors: {s:?}"));
        }
        if s.good_rx != u64::from(count) || s.good_tx != sent {
            return Err(format!(
                "NIC {i}: device counted {} received, {} sent; the test received {count}, sent \
                 {sent}",
                s.good_rx, s.good_tx
            ));
        }
    }
    Ok(())
}

/// Shuts both NICs down (bounded).
fn shutdown(nics: &mut [Box<dyn NetDriver>; 2]) -> Result<(), String> {
    for nic in nics.iter_mut() {
        nic.begin_shutdown();
    }
    let start = Instant::now();
    for (i, nic) in nics.iter().enumerate() {
        loop {
            if nic.shutdown_done().map_err(|e| format!("NIC {i}: {e}"))? {
                break;
            }
            if start.elapsed_us() > 1_000_000 {
                return Err(format!("NIC {i}: shutdown did not complete"));
            }
            core::hint::spin_loop();
        }
    }
    Ok(())
}
