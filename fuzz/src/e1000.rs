//! The emulated e1000 driven through `PciBackend`, as a NIC domain's driver drives it:
//! registers (every offset and width), descriptor rings and buffers in the domain's memory
//! (1 MiB behind the NIC's DMA window), frames arriving from the wire, passes, resets and
//! bus mastering.
//!
//! Input: the permanent MAC's last byte, then ops. `op % 8`: 0 writes any register (offset,
//! width, value), 1 reads one, 2 writes a register a driver uses (picked from a list), 3
//! writes the domain's memory, 4 a frame arrives on the wire, 5 a transmit and a receive
//! pass, 6 a function reset, 7 turns bus mastering on or off.
//!
//! Checked: the link never goes down (STATUS.LU, across resets); every frame the NIC counts
//! as sent reached the wire, and the wire got no other; it never counts more frames received
//! than arrived; a reset leaves the rings disabled.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use ddvm_passthrough::e1000::{E1000Config, EmulatedE1000};
use ddvm_passthrough::net::{Wire, WireError, WireStats, MAX_FRAME, MIN_FRAME};
use ddvm_passthrough::pci::PciBackend;
use ddvm_passthrough::DmaWindow;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{guest_memory, Input, Seed};

const MEM: u64 = 1 << 20;
const BAR0: u64 = 128 << 10;

/// Registers a driver writes, for op 2 (their offsets in BAR0).
const REGS: [u64; 20] = [
    0x0000, // CTRL
    0x00C8, // ICS
    0x00D0, // IMS
    0x00D8, // IMC
    0x0100, // RCTL
    0x0400, // TCTL
    0x2800, // RDBAL
    0x2804, // RDBAH
    0x2808, // RDLEN
    0x2810, // RDH
    0x2818, // RDT
    0x3800, // TDBAL
    0x3804, // TDBAH
    0x3808, // TDLEN
    0x3810, // TDH
    0x3818, // TDT
    0x5400, // RAL0
    0x5404, // RAH0
    0x5200, // MTA
    0x0014, // EERD
];

#[derive(Default)]
struct Frames {
    inbound: VecDeque<Vec<u8>>,
    sent: u64,
}

/// A wire the harness plays: frames arrive from the input, frames sent are counted.
struct FuzzWire {
    frames: Arc<Mutex<Frames>>,
    fd: EventFd,
    stats: WireStats,
}

impl Wire for FuzzWire {
    fn max_frame(&self) -> usize {
        MAX_FRAME
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        if !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
            return Err(WireError::FrameSize {
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        self.frames.lock().expect("frames").sent += 1;
        self.stats.sent += 1;
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        let Some(frame) = self.frames.lock().expect("frames").inbound.pop_front() else {
            return Ok(None);
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        self.stats.received += 1;
        Ok(Some(n))
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn stats(&self) -> WireStats {
        self.stats
    }
}

fn read32(nic: &mut EmulatedE1000, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    nic.bar_read(0, offset, &mut b);
    u32::from_le_bytes(b)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mac = [0x52, 0x54, 0, 0, 0, input.u8() | 1];
    let frames = Arc::new(Mutex::new(Frames::default()));
    let wire = FuzzWire {
        frames: frames.clone(),
        fd: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        stats: WireStats::default(),
    };
    let mem = guest_memory(MEM);
    let cfg = E1000Config {
        mac,
        wire: Box::new(wire),
    };
    let mut nic = EmulatedE1000::new(cfg, DmaWindow::new(mem.clone())).expect("nic");
    let poller = nic.poller();
    nic.set_bus_master(true);
    let mut arrived = 0u64;
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 8 {
            op @ (0 | 2) => {
                let offset = if op == 0 {
                    u64::from(input.u32()) % BAR0
                } else {
                    REGS[usize::from(input.u8()) % REGS.len()]
                };
                let width = [1usize, 2, 4, 8][usize::from(input.u8() % 4)];
                let value = input.u64().to_le_bytes();
                let width = width.min((BAR0 - offset) as usize);
                nic.bar_write(0, offset, &value[..width]);
            }
            1 => {
                let offset = u64::from(input.u32()) % BAR0;
                let width = [1usize, 2, 4, 8][usize::from(input.u8() % 4)];
                let width = width.min((BAR0 - offset) as usize);
                let mut b = [0u8; 8];
                nic.bar_read(0, offset, &mut b[..width]);
            }
            3 => {
                let at = u64::from(input.u32()) % MEM;
                let bytes = input.blob();
                let _ = mem.write_slice(bytes, GuestAddress(at));
            }
            4 => {
                let frame = input.blob().to_vec();
                frames.lock().expect("frames").inbound.push_back(frame);
                arrived += 1;
            }
            5 => {
                poller.poll();
            }
            6 => {
                nic.reset();
                assert_eq!(read32(&mut nic, 0x0100) & 2, 0, "RCTL.EN after a reset");
                assert_eq!(read32(&mut nic, 0x0400) & 2, 0, "TCTL.EN after a reset");
            }
            _ => {
                nic.set_bus_master(input.u8() & 1 == 1);
            }
        }
        assert_ne!(
            read32(&mut nic, 0x0008) & 2,
            0,
            "STATUS.LU: the link went down"
        );
        let stats = nic.stats();
        let sent = frames.lock().expect("frames").sent;
        assert_eq!(
            stats.frames_sent, sent,
            "frames counted sent vs. on the wire"
        );
        assert!(stats.frames_received <= arrived);
    }
}

fn reg(s: &mut Seed, offset: u64, value: u32) {
    let i = REGS.iter().position(|&r| r == offset).unwrap_or(0) as u8;
    s.u8(2).u8(i).u8(2).u64(u64::from(value));
}

/// Seeds: a driver's bring-up of both rings (as the domain's driver does it), a frame sent,
/// a frame received, and a reset in the middle of traffic.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let (rx_ring, tx_ring, rx_buf, tx_buf) = (0x10000u64, 0x11000u64, 0x20000u64, 0x30000u64);
    let mut s = Seed::new();
    s.u8(0x02);
    // Receive descriptors: 8, each a 2 KiB buffer.
    let mut rx = Vec::new();
    for i in 0..8u64 {
        rx.extend_from_slice(&(rx_buf + i * 0x800).to_le_bytes());
        rx.extend_from_slice(&[0; 8]);
    }
    s.u8(3).u32(rx_ring as u32).blob(&rx);
    reg(&mut s, 0x2800, rx_ring as u32);
    reg(&mut s, 0x2808, 8 * 16);
    reg(&mut s, 0x2810, 0);
    reg(&mut s, 0x2818, 7);
    reg(&mut s, 0x00D0, 0x9d);
    // RCTL: EN, BAM, 2 KiB buffers.
    reg(&mut s, 0x0100, 2 | 1 << 15);
    // Transmit ring of 8, one frame in descriptor 0 (EOP, IFCS, RS).
    let mut frame = vec![0u8; 60];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 3]);
    s.u8(3).u32(tx_buf as u32).blob(&frame);
    let mut td = Vec::new();
    td.extend_from_slice(&tx_buf.to_le_bytes());
    td.extend_from_slice(&(frame.len() as u16).to_le_bytes());
    td.extend_from_slice(&[0, 0x0b, 0, 0, 0, 0]);
    s.u8(3).u32(tx_ring as u32).blob(&td);
    reg(&mut s, 0x3800, tx_ring as u32);
    reg(&mut s, 0x3808, 8 * 16);
    reg(&mut s, 0x0400, 2 | 1 << 3);
    reg(&mut s, 0x3818, 1);
    // A frame for us, one broadcast, then a pass.
    let mut to_us = frame.clone();
    to_us[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 3]);
    s.u8(4).blob(&to_us);
    s.u8(4).blob(&frame);
    s.u8(5);
    let traffic = s.finish();
    let mut reset = traffic.clone();
    reset.extend(Seed::new().u8(6).u8(4).blob(&frame).u8(5).finish());
    vec![("traffic".into(), traffic), ("reset".into(), reset)]
}
