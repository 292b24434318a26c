//! Bring-up helpers: the admin queue (synchronous batches of independent commands, one tail
//! doorbell write per batch, head doorbell writes only when needed), controller
//! disable/enable handshakes within CAP.TO, and Identify.

use alloc::vec;
use alloc::vec::Vec;

use guest_kernel::dma::{DmaBuffer, PAGE_SIZE};
use guest_kernel::time::{self, Instant};

use super::cmd::{Command, CompletionEntry, Status};
use super::error::NvmeError;
use super::identify::IDENTIFY_SIZE;
use super::queue::{CompletionQueue, SubmissionQueue};
use super::regs::{cc, csts, Registers};

/// The admin queue pair; one command at a time.
pub(super) struct AdminQueue {
    /// Submission queue.
    pub(super) sq: SubmissionQueue,
    /// Completion queue.
    pub(super) cq: CompletionQueue,
    /// Next command identifier.
    pub(super) next_cid: u16,
}

impl AdminQueue {
    /// Runs `cmd` and waits for its completion.
    pub(super) fn run(
        &mut self,
        regs: &Registers,
        cmd: Command,
        timeout_ms: u64,
    ) -> Result<CompletionEntry, NvmeError> {
        let mut done = self.run_all(regs, &[cmd], timeout_ms)?;
        Ok(done.remove(0))
    }

    /// Runs `cmds`, which must not depend on each other (the controller may run them in any
    /// order), and waits for all their completions; returns them in the order of `cmds`.
    ///
    /// Up to half the queue goes to the controller with one tail doorbell write; the head
    /// doorbell is written only when half the completion queue has been consumed (never with
    /// fewer than half the entries in flight, so the controller never sees it full). Call
    /// [`AdminQueue::finish`] once bring-up is done.
    pub(super) fn run_all(
        &mut self,
        regs: &Registers,
        cmds: &[Command],
        timeout_ms: u64,
    ) -> Result<Vec<CompletionEntry>, NvmeError> {
        let batch = usize::from(self.sq.entries() / 2).max(1);
        let mut done = Vec::with_capacity(cmds.len());
        for chunk in cmds.chunks(batch) {
            let first = self.next_cid;
            for cmd in chunk {
                let cid = self.next_cid;
                self.next_cid = self.next_cid.wrapping_add(1);
                self.sq.push(&Command { cid, ..*cmd });
            }
            self.sq.ring();
            let mut entries: Vec<Option<CompletionEntry>> = vec![None; chunk.len()];
            let mut left = chunk.len();
            let start = Instant::now();
            while left > 0 {
                if let Some(e) = self.cq.peek() {
                    self.cq.advance();
                    self.cq.ring_if_half_consumed();
                    let slot = entries
                        .get_mut(usize::from(e.cid.wrapping_sub(first)))
                        .filter(|s| e.sq_id == 0 && s.is_none());
                    let Some(slot) = slot else {
                        return Err(NvmeError::BadCompletion {
                            qid: 0,
                            sq_id: e.sq_id,
                            cid: e.cid,
                        });
                    };
                    *slot = Some(e);
                    left -= 1;
                    continue;
                }
                let waited = start.elapsed_us() / 1000;
                if waited >= timeout_ms {
                    let i = entries.iter().position(Option::is_none).unwrap_or(0);
                    return Err(stalled(regs).unwrap_or(NvmeError::CommandTimeout {
                        cid: first.wrapping_add(i as u16),
                        opcode: chunk[i].opcode,
                        qid: 0,
                        ms: waited,
                    }));
                }
                core::hint::spin_loop();
            }
            done.extend(entries.into_iter().flatten());
        }
        Ok(done)
    }

    /// Gives every consumed completion entry back to the controller (the end of bring-up).
    pub(super) fn finish(&mut self) {
        self.cq.ring();
    }

    /// Runs `cmd`; a non-success status is an error.
    pub(super) fn run_ok(
        &mut self,
        regs: &Registers,
        cmd: Command,
        timeout_ms: u64,
    ) -> Result<CompletionEntry, NvmeError> {
        let e = self.run(regs, cmd, timeout_ms)?;
        if !e.status.is_success() {
            return Err(NvmeError::AdminFailed {
                opcode: cmd.opcode,
                status: e.status,
            });
        }
        Ok(e)
    }
}

/// Why the controller stopped answering, if CSTS says (checked only once something timed out:
/// a register read is an exit under emulation).
pub(super) fn stalled(regs: &Registers) -> Option<NvmeError> {
    let s = regs.csts();
    if s == u32::MAX {
        Some(NvmeError::NotResponding)
    } else if s & csts::CFS != 0 {
        Some(NvmeError::ControllerFatal)
    } else {
        None
    }
}

/// Waits until CSTS.RDY is `ready`.
pub(super) fn wait_ready(regs: &Registers, ready: bool, timeout_ms: u64) -> Result<(), NvmeError> {
    let start = Instant::now();
    loop {
        let s = regs.csts();
        if s == u32::MAX {
            return Err(NvmeError::NotResponding);
        }
        if ready && s & csts::CFS != 0 {
            return Err(NvmeError::ControllerFatal);
        }
        if (s & csts::RDY != 0) == ready {
            return Ok(());
        }
        let waited = start.elapsed_us() / 1000;
        if waited >= timeout_ms {
            return Err(NvmeError::ReadyTimeout { ready, ms: waited });
        }
        time::delay_us(50);
    }
}

/// Disables the controller (a controller reset) and waits for CSTS.RDY = 0.
pub(super) fn disable(regs: &Registers, timeout_ms: u64) -> Result<(), NvmeError> {
    let cc = regs.cc();
    if cc & cc::EN != 0 {
        // An enable in progress must finish before EN may be cleared (section 3.1.5); a
        // controller that never gets ready is reset anyway.
        if regs.csts() & csts::RDY == 0 {
            let _ = wait_ready(regs, true, timeout_ms);
        }
        regs.set_cc(cc & !cc::EN);
    }
    wait_ready(regs, false, timeout_ms)
}

/// An Identify command returning its data into `page` (cleared first).
pub(super) fn identify_command(page: &DmaBuffer, cns: u32, nsid: u32) -> Command {
    page.fill(0, PAGE_SIZE, 0);
    Command::identify(cns, nsid, page.addr())
}

/// The data of an Identify command that completed with `e` (see [`identify_command`]).
pub(super) fn identify_data(
    page: &DmaBuffer,
    e: &CompletionEntry,
) -> Result<[u8; IDENTIFY_SIZE], Status> {
    if !e.status.is_success() {
        return Err(e.status);
    }
    let mut data = [0u8; IDENTIFY_SIZE];
    page.read_bytes(0, &mut data);
    Ok(data)
}
