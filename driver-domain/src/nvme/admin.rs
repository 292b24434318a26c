//! Bring-up helpers: the admin queue (one synchronous command at a time), controller
//! disable/enable handshakes within CAP.TO, and Identify.

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
        mut cmd: Command,
        timeout_ms: u64,
    ) -> Result<CompletionEntry, NvmeError> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        cmd.cid = cid;
        self.sq.push(&cmd);
        self.sq.ring();
        let start = Instant::now();
        loop {
            if let Some(e) = self.cq.peek() {
                self.cq.advance();
                self.cq.ring();
                if e.sq_id != 0 || e.cid != cid {
                    return Err(NvmeError::BadCompletion {
                        qid: 0,
                        sq_id: e.sq_id,
                        cid: e.cid,
                    });
                }
                return Ok(e);
            }
            let waited = start.elapsed_us() / 1000;
            if waited >= timeout_ms {
                return Err(stalled(regs).unwrap_or(NvmeError::CommandTimeout {
                    cid,
                    opcode: cmd.opcode,
                    qid: 0,
                    ms: waited,
                }));
            }
            core::hint::spin_loop();
        }
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

/// Runs Identify and copies the page out.
pub(super) fn identify(
    admin: &mut AdminQueue,
    regs: &Registers,
    page: &DmaBuffer,
    cns: u32,
    nsid: u32,
    timeout_ms: u64,
) -> Result<Result<[u8; IDENTIFY_SIZE], Status>, NvmeError> {
    page.fill(0, PAGE_SIZE, 0);
    let e = admin.run(regs, Command::identify(cns, nsid, page.addr()), timeout_ms)?;
    if !e.status.is_success() {
        return Ok(Err(e.status));
    }
    let mut data = [0u8; IDENTIFY_SIZE];
    page.read_bytes(0, &mut data);
    Ok(Ok(data))
}
