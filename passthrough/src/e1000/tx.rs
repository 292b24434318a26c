//! The transmit pass: legacy descriptors from TDH up to TDT, frames to the wire.
//!
//! A descriptor is 16 bytes: buffer address (8), length (2), checksum offset (1), command (1),
//! status (1), checksum start (1), special (2). Descriptors are gathered into a frame until
//! one has EOP; the frame then goes to the wire (padded to 60 bytes with TCTL.PSP; the wire
//! carries no CRC, so IFCS changes nothing). A descriptor with RS gets DD in its status once
//! its data was taken and, for EOP, once the frame was handed to the wire.
//!
//! Hostile input gets defined behaviour:
//! - a pass takes at most one ring's worth of descriptors;
//! - a ring with no descriptors, or with TDH or TDT beyond it, is not processed;
//! - a chain that outgrows the largest frame is dropped whole at its EOP (its descriptors are
//!   completed), as is a chain under an Ethernet header or one holding an extended
//!   descriptor (DEXT: context and data descriptors are not modelled);
//! - zero-length descriptors add nothing;
//! - a refused DMA (descriptor, buffer or write-back outside the domain's memory) stops the
//!   ring where it is ([`super::nic::Nic::halt`]).

use std::sync::atomic::Ordering;

use super::nic::{ring_size, Nic, TxChain};
use super::regs::*;
use super::MIN_RX_FRAME;
use crate::net::MIN_FRAME;

/// Frames shorter than this are padded when TCTL.PSP is set.
const PAD_TO: usize = MIN_RX_FRAME;

impl Nic {
    /// Processes the transmit ring; returns the descriptors taken.
    pub fn tx_pass(&mut self) -> usize {
        if self.reg(TCTL) & TCTL_EN == 0 || self.tx_halted {
            return 0;
        }
        // With DMA impossible now, leave the descriptors for when it is (nothing is counted:
        // the driver has not enabled bus mastering yet, or the domain is going).
        if !self.dma.attached() || !self.dma.bus_master() {
            return 0;
        }
        let size = ring_size(self.reg(TDLEN));
        let (mut head, tail) = (u64::from(self.reg(TDH)), u64::from(self.reg(TDT)));
        if size == 0 || head >= size || tail >= size {
            return 0;
        }
        let base = (u64::from(self.reg(TDBAH)) << 32) | u64::from(self.reg(TDBAL));
        let mut causes = 0;
        let mut taken = 0;
        while head != tail && (taken as u64) < size {
            let Some(addr) = base.checked_add(head * DESC_SIZE) else {
                self.halt(false, "a transmit descriptor address");
                break;
            };
            if !self.tx_descriptor(addr, &mut causes) {
                break;
            }
            head = (head + 1) % size;
            taken += 1;
        }
        self.set_reg(TDH, head as u32);
        if taken > 0 && head == tail {
            causes |= ICR_TXQE;
        }
        self.raise(causes);
        taken
    }

    /// One descriptor at `addr`; false when the ring stopped on it.
    fn tx_descriptor(&mut self, addr: u64, causes: &mut u32) -> bool {
        let mut d = [0u8; 16];
        if self.dma.read(addr, &mut d).is_err() {
            self.halt(false, "a transmit descriptor read");
            return false;
        }
        let buf = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
        let len = usize::from(u16::from_le_bytes([d[8], d[9]]));
        let cmd = d[11];
        if cmd & TXD_CMD_DEXT != 0 {
            self.counters.tx_unsupported += 1;
            self.tx.unsupported = true;
        } else if len > 0 && !self.tx.oversize {
            let max = self.wire.max_frame().min(crate::net::MAX_FRAME);
            if self.tx.frame.len() + len > max {
                self.tx.oversize = true;
                self.tx.frame = Vec::new();
            } else {
                let at = self.tx.frame.len();
                self.tx.frame.resize(at + len, 0);
                if self.dma.read(buf, &mut self.tx.frame[at..]).is_err() {
                    self.halt(false, "a transmit buffer read");
                    return false;
                }
            }
        }
        if cmd & TXD_CMD_EOP != 0 {
            let chain = std::mem::take(&mut self.tx);
            self.transmit(chain);
        }
        if cmd & TXD_CMD_RS != 0 {
            // Status, checksum start and special, with DD: one aligned store, so the driver
            // never sees DD before the rest.
            let dw3 = u32::from_le_bytes([d[12] | DESC_STA_DD, d[13], d[14], d[15]]);
            if self
                .dma
                .store_u32(addr + 12, dw3, Ordering::Release)
                .is_err()
            {
                self.halt(false, "a transmit descriptor write-back");
                return false;
            }
            *causes |= ICR_TXDW;
        }
        true
    }

    /// Sends a finished chain, or drops it (counted).
    fn transmit(&mut self, chain: TxChain) {
        let TxChain {
            mut frame,
            oversize,
            unsupported,
        } = chain;
        if oversize || unsupported || frame.len() < MIN_FRAME {
            self.counters.tx_dropped += 1;
            return;
        }
        if self.reg(TCTL) & TCTL_PSP != 0 && frame.len() < PAD_TO {
            frame.resize(PAD_TO, 0);
        }
        if self.wire_closed {
            self.counters.tx_dropped += 1;
            return;
        }
        if let Err(e) = self.wire.send(&frame) {
            self.wire_error(&e);
            self.counters.tx_dropped += 1;
            return;
        }
        self.counters.frames_sent += 1;
        let len = frame.len();
        self.count(stat::GPTC, 1);
        self.count(stat::TPT, 1);
        self.count64(stat::GOTCL, len as u64 + 4);
        self.count64(stat::TOTL, len as u64 + 4);
        self.count_size(stat::PTC64, len);
        if frame[0] & 1 != 0 {
            let stat = if frame[..6] == [0xFF; 6] {
                stat::BPTC
            } else {
                stat::MPTC
            };
            self.count(stat, 1);
        }
    }
}
