//! The receive path: frames from the wire through the packet buffer and the receive filter
//! into the ring.
//!
//! A legacy receive descriptor is 16 bytes: buffer address (8), then what the NIC writes back:
//! length (2), checksum (2), status (1), errors (1), special (2). The driver owns the
//! descriptors from RDT to RDH (exclusive); the NIC fills those from RDH up to RDT. A frame
//! takes as many buffers of RCTL.BSIZE as it needs (DD on each, EOP on the last); a frame
//! shorter than 60 bytes is padded to 60 with zeros, as a frame on a real wire is.
//!
//! # The packet buffer
//!
//! As the part's 48 KiB receive packet buffer, a frame that cannot go into the ring now waits
//! in the model's ([`RX_FIFO_BYTES`]), in order, until descriptors are given back (an RDT
//! write), the receiver is enabled, or the next receive pass. Unlike the part's, it also takes
//! frames while the receiver is disabled and keeps them across a reset: a NIC domain that
//! restarts (the VMM's reset at the hand-over, the new driver's CTRL.RST, its rings set up
//! again) then finds the frames that arrived meanwhile, where a network would have lost them.
//! The receive filter is applied as a frame leaves the buffer (the filters of the driver that
//! receives it), and a frame that waited longer than [`RX_FIFO_AGE`] is dropped then, so a
//! NIC left without a driver for long does not deliver stale traffic later.
//!
//! What is dropped, and where it is counted:
//! - not for us (see [`Nic::accepts`]): the model's `rx_filtered`;
//! - shorter than an Ethernet header (RUC) or longer than 1522 bytes (ROC), on arrival;
//! - the packet buffer full, a frame older than [`RX_FIFO_AGE`] when it could go, or a ring
//!   the driver left unusable (no descriptors, RDH or RDT beyond it, stopped): missed (MPC
//!   and RNBC, the RXO cause, and the model's `rx_missed`; while the receiver is off,
//!   `rx_disabled` instead). The wire and transmission never wait for the driver.
//!
//! A refused DMA (descriptor or buffer outside the domain's memory) stops the ring
//! ([`Nic::halt`]); the frame being written is lost.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::nic::{ring_size, Nic};
use super::regs::*;
use super::MIN_RX_FRAME;
use crate::net::{MAX_FRAME, MIN_FRAME};

/// Bytes of frames the packet buffer holds at most (the 82540EM's receive share of its
/// packet buffer, PBA's power-on value).
pub const RX_FIFO_BYTES: usize = 48 << 10;
/// A frame that waited longer than this in the packet buffer is dropped when it could go.
pub const RX_FIFO_AGE: Duration = Duration::from_secs(1);

/// Multicast Offset (RCTL.MO) 0 to 3: which 12 bits of the address index the MTA.
const MTA_SHIFT: [u32; 4] = [4, 3, 2, 0];

impl Nic {
    /// Takes up to `budget` frames from the wire into the packet buffer and from there into
    /// the ring; returns how many were taken off the wire. Raises the causes of what
    /// happened.
    pub fn rx_pass(&mut self, budget: usize) -> usize {
        let mut causes = self.drain_fifo();
        if self.wire_closed {
            self.raise(causes);
            return 0;
        }
        self.wire_backoff = false;
        let mut taken = 0;
        while taken < budget {
            let mut buf = std::mem::take(&mut self.rx_buf);
            let r = self.wire.recv(&mut buf);
            let len = match r {
                Ok(Some(len)) => len,
                Ok(None) => {
                    self.rx_buf = buf;
                    break;
                }
                Err(e) => {
                    self.rx_buf = buf;
                    self.wire_error(&e);
                    break;
                }
            };
            taken += 1;
            causes |= self.arrive(&mut buf, len);
            self.rx_buf = buf;
        }
        self.raise(causes);
        taken
    }

    /// The frame in `buf[..len]` off the wire: checked for size, then straight into the ring
    /// when nothing waits before it, else (or when the ring has no room) into the packet
    /// buffer, or dropped when that is full. `buf` holds at least [`MIN_RX_FRAME`] bytes.
    /// Returns the interrupt causes.
    fn arrive(&mut self, buf: &mut [u8], len: usize) -> u32 {
        if len < MIN_FRAME {
            self.count(stat::RUC, 1);
            return 0;
        }
        if len > MAX_FRAME || len > buf.len() {
            self.count(stat::ROC, 1);
            return 0;
        }
        if self.rx_fifo.is_empty() && self.reg(RCTL) & RCTL_EN != 0 {
            match self.receive(buf, len) {
                Delivery::Done(causes) => return causes,
                Delivery::Held => {}
            }
        }
        if self.rx_fifo_bytes + len > RX_FIFO_BYTES {
            return self.missed();
        }
        self.rx_fifo_bytes += len;
        self.rx_fifo
            .push_back((Instant::now(), buf[..len].to_vec()));
        0
    }

    /// A frame lost for want of room (or of a receiver); returns the interrupt causes.
    fn missed(&mut self) -> u32 {
        if self.reg(RCTL) & RCTL_EN == 0 {
            self.counters.rx_disabled += 1;
            return 0;
        }
        self.counters.rx_missed += 1;
        self.count(stat::MPC, 1);
        self.count(stat::RNBC, 1);
        ICR_RXO
    }

    /// Moves frames from the packet buffer into the ring while the receiver is on and the ring
    /// has room, oldest first; returns the interrupt causes.
    pub(super) fn drain_fifo(&mut self) -> u32 {
        let mut causes = 0;
        while self.reg(RCTL) & RCTL_EN != 0 {
            let Some((arrived, mut frame)) = self.rx_fifo.pop_front() else {
                break;
            };
            if arrived.elapsed() > RX_FIFO_AGE {
                self.rx_fifo_bytes -= frame.len();
                causes |= self.missed();
                continue;
            }
            let len = frame.len();
            frame.resize(len.max(MIN_RX_FRAME), 0);
            let delivery = self.receive(&mut frame, len);
            frame.truncate(len);
            match delivery {
                Delivery::Held => {
                    self.rx_fifo.push_front((arrived, frame));
                    break;
                }
                Delivery::Done(c) => {
                    self.rx_fifo_bytes -= len;
                    causes |= c;
                }
            }
        }
        causes
    }

    /// Delivers the frame `buf[..len]` (the receiver on), padded with zeros to
    /// [`MIN_RX_FRAME`] in `buf` (which is at least that long), or says it must keep waiting.
    fn receive(&mut self, buf: &mut [u8], len: usize) -> Delivery {
        let plen = len.max(MIN_RX_FRAME);
        let (Some(frame), true) = (buf.get(..len), plen <= buf.len()) else {
            return Delivery::Done(0);
        };
        if !self.accepts(frame) {
            self.counters.rx_filtered += 1;
            return Delivery::Done(0);
        }
        let is_group = frame[0] & 1 != 0;
        let broadcast = frame[..6] == [0xFF; 6];
        buf[len..plen].fill(0);
        match self.fill_ring(&buf[..plen]) {
            Ok(causes) => {
                self.count(stat::TPR, 1);
                self.count64(stat::TORL, plen as u64 + 4);
                self.counters.frames_received += 1;
                self.count(stat::GPRC, 1);
                self.count64(stat::GORCL, plen as u64 + 4);
                self.count_size(stat::PRC64, plen);
                if is_group {
                    let s = if broadcast { stat::BPRC } else { stat::MPRC };
                    self.count(s, 1);
                }
                Delivery::Done(causes)
            }
            Err(NoRoom) => Delivery::Held,
            // A ring the driver left unusable (no descriptors, indexes beyond it, stopped on
            // a refused DMA): the frame is lost at once, as before the buffer.
            Err(Missed) => Delivery::Done(self.missed()),
            Err(Stopped) => Delivery::Done(0),
        }
    }

    /// Whether the receive filter takes a frame with this destination (RCTL, RAR, MTA).
    /// Broadcast is accepted with BAM, any multicast (broadcast included) with MPE, any
    /// unicast with UPE; otherwise an exact match of a receive address with AV (and address
    /// select 0, the destination), or for a multicast address its bit in the MTA.
    pub fn accepts(&self, frame: &[u8]) -> bool {
        let rctl = self.reg(RCTL);
        let dst: [u8; 6] = frame[..6].try_into().unwrap_or_default();
        let multicast = dst[0] & 1 != 0;
        if dst == [0xFF; 6] && rctl & RCTL_BAM != 0 {
            return true;
        }
        if multicast && rctl & RCTL_MPE != 0 || !multicast && rctl & RCTL_UPE != 0 {
            return true;
        }
        for n in 0..16 {
            let low = self.reg(RA + 8 * n);
            let high = self.reg(RA + 8 * n + 4);
            if high & RAH_AV == 0 || high & RAH_ASEL_MASK != 0 {
                continue;
            }
            let [a, b, c, d] = low.to_le_bytes();
            let [e, f, ..] = high.to_le_bytes();
            if dst == [a, b, c, d, e, f] {
                return true;
            }
        }
        if !multicast {
            return false;
        }
        let mo = ((rctl >> RCTL_MO_SHIFT) & 3) as usize;
        let hash = mta_hash(&dst, mo);
        self.reg(MTA + 4 * u64::from(hash >> 5)) & (1 << (hash & 31)) != 0
    }

    /// Writes a frame (already padded) into the ring's free descriptors.
    fn fill_ring(&mut self, frame: &[u8]) -> Result<u32, RingError> {
        if self.rx_halted {
            return Err(Missed);
        }
        // Detached from a domain or bus mastering off (a hand-over): the frame waits.
        if !self.dma.attached() || !self.dma.bus_master() {
            return Err(NoRoom);
        }
        let size = ring_size(self.reg(RDLEN));
        let (mut head, tail) = (u64::from(self.reg(RDH)), u64::from(self.reg(RDT)));
        if size == 0 || head >= size || tail >= size {
            return Err(Missed);
        }
        let free = (tail + size - head) % size;
        let bsize = buffer_size(self.reg(RCTL));
        let need = frame.len().div_ceil(bsize) as u64;
        if need > free {
            return Err(NoRoom);
        }
        let base = (u64::from(self.reg(RDBAH)) << 32) | u64::from(self.reg(RDBAL));
        let chunks = frame.chunks(bsize);
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.enumerate() {
            let Some(addr) = base.checked_add(head * DESC_SIZE) else {
                self.halt(true, "a receive descriptor address");
                return Err(Stopped);
            };
            let mut d = [0u8; 8];
            if self.dma.read(addr, &mut d).is_err() {
                self.halt(true, "a receive descriptor read");
                return Err(Stopped);
            }
            if self.dma.write(u64::from_le_bytes(d), chunk).is_err() {
                self.halt(true, "a receive buffer write");
                return Err(Stopped);
            }
            // Length and checksum, then status, errors and special in one aligned store, so
            // the driver never sees DD before the length.
            let length = (chunk.len() as u32).to_le_bytes();
            let status = DESC_STA_DD | if i == last { RXD_STA_EOP } else { 0 };
            if self.dma.write(addr + 8, &length).is_err()
                || self
                    .dma
                    .store_u32(addr + 12, u32::from(status), Ordering::Release)
                    .is_err()
            {
                self.halt(true, "a receive descriptor write-back");
                return Err(Stopped);
            }
            head = (head + 1) % size;
        }
        self.set_reg(RDH, head as u32);
        let left = free - need;
        let rdmts = (self.reg(RCTL) >> RCTL_RDMTS_SHIFT) & 3;
        let mut causes = ICR_RXT0;
        // Free descriptors at or below 1/2, 1/4 or 1/8 of the ring.
        if left <= size >> (1 + rdmts.min(2)) {
            causes |= ICR_RXDMT0;
        }
        Ok(causes)
    }
}

/// What became of a frame leaving the packet buffer.
enum Delivery {
    /// Delivered, filtered out or lost to a stopped ring: it leaves the buffer (the causes).
    Done(u32),
    /// No room in the ring now: it stays first in the buffer.
    Held,
}

/// Why a frame did not reach the ring.
enum RingError {
    /// No free descriptors for it now, or no domain to write to: the frame waits.
    NoRoom,
    /// No usable ring: counted as missed.
    Missed,
    /// The ring stopped on a refused DMA (already reported).
    Stopped,
}
use RingError::{Missed, NoRoom, Stopped};

/// The 12-bit MTA index of a multicast address for Multicast Offset `mo`.
pub(super) fn mta_hash(dst: &[u8; 6], mo: usize) -> u32 {
    let bits = (u32::from(dst[5]) << 8) | u32::from(dst[4]);
    (bits >> MTA_SHIFT[mo]) & 0xFFF
}

/// Receive buffer size from RCTL (BSIZE, BSEX). The reserved BSEX with BSIZE 00 reads as
/// 2048.
pub(super) fn buffer_size(rctl: u32) -> usize {
    let bsize = (rctl >> RCTL_BSIZE_SHIFT) & 3;
    match (rctl & RCTL_BSEX != 0, bsize) {
        (false, 0) | (true, 0) => 2048,
        (false, 1) => 1024,
        (false, 2) => 512,
        (false, _) => 256,
        (true, 1) => 16384,
        (true, 2) => 8192,
        (true, _) => 4096,
    }
}
