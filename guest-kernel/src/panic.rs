//! Reporting a guest's death: the panic handler and the exception handler fill the panic
//! record, print the message, write the panic port, and stop.

use core::fmt::{self, Write};
use core::mem::{offset_of, size_of};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use ddvm_abi::boot::Platform;
use ddvm_abi::layout::{PANIC_RECORD, VIF_PAGE};
use ddvm_abi::panic::{vector_name, PanicKind, PanicRecord, PANIC_MAGIC, PANIC_MSG_MAX};

use crate::arch::cpu;
use crate::arch::descriptors::ExceptionFrame;
use crate::shared::{publish_fence, SharedRegion};
use crate::{boot, console, vmm};

/// Set by the first panic or exception: a second one (the report itself failed) skips the
/// report and stops at once.
static DYING: AtomicBool = AtomicBool::new(false);

/// Exception vector of a page fault, and offset of the CR2 cell in PVM's VIF page.
const VECTOR_PAGE_FAULT: u64 = 14;
const VIF_CR2_OFFSET: u64 = 8;

/// What the record says besides the message.
#[derive(Clone, Copy, Default)]
struct Details {
    vector: u32,
    error_code: u64,
    rip: u64,
    cr2: u64,
    rsp: u64,
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if DYING.swap(true, Ordering::SeqCst) {
        vmm::exit(vmm::STATUS_PANIC);
    }
    let mut msg = Message::new();
    let _ = write!(msg, "panic: {}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(msg, " at {}:{}", loc.file(), loc.line());
    }
    die(PanicKind::Panic, Details::default(), &msg)
}

/// Reports an exception delivered through the guest's IDT. Called by the exception stubs.
pub(crate) fn exception(frame: &ExceptionFrame) -> ! {
    if DYING.swap(true, Ordering::SeqCst) {
        vmm::exit(vmm::STATUS_EXCEPTION);
    }
    let cr2 = if frame.vector == VECTOR_PAGE_FAULT {
        fault_address()
    } else {
        0
    };
    let details = Details {
        vector: frame.vector as u32,
        error_code: frame.error_code,
        rip: frame.rip,
        cr2,
        rsp: frame.rsp,
    };
    let mut msg = Message::new();
    let _ = write!(
        msg,
        "exception #{} {} at rip={:#x} err={:#x} rsp={:#x}",
        frame.vector,
        vector_name(frame.vector as u32),
        frame.rip,
        frame.error_code,
        frame.rsp
    );
    if frame.vector == VECTOR_PAGE_FAULT {
        let _ = write!(msg, " cr2={cr2:#x}");
    }
    die(PanicKind::Exception, details, &msg)
}

/// CR2; on PVM, where the hypervisor also leaves it in the VIF page, that copy when CR2 reads 0.
fn fault_address() -> u64 {
    let cr2 = cpu::read_cr2();
    if cr2 != 0 || boot::platform() != Platform::Pvm {
        return cr2;
    }
    // SAFETY: on PVM the VMM registered the VIF page at `VIF_PAGE`, a page of RAM outside the
    // image that Rust never references.
    let vif = unsafe { SharedRegion::new(VIF_PAGE, 16) };
    vif.read(VIF_CR2_OFFSET)
}

fn die(kind: PanicKind, details: Details, msg: &Message) -> ! {
    console::write_bytes(msg.as_bytes());
    console::write_bytes(b"\n");
    write_record(kind, details, msg);
    vmm::report_panic(kind);
    // Nobody listens on the panic port (QEMU): stop through the exit port.
    vmm::exit(match kind {
        PanicKind::Panic => vmm::STATUS_PANIC,
        PanicKind::Exception => vmm::STATUS_EXCEPTION,
    })
}

/// Fills the panic record, magic last.
fn write_record(kind: PanicKind, d: Details, msg: &Message) {
    let info = boot::info();
    let addr = if info.panic_record != 0 {
        info.panic_record
    } else {
        PANIC_RECORD
    };
    // SAFETY: the boot info's panic record was validated as RAM outside the image; the default
    // (before boot info was taken) is the ABI's fixed page below the image, which Rust never
    // references.
    let rec = unsafe { SharedRegion::new(addr, size_of::<PanicRecord>() as u64) };
    rec.write(offset_of!(PanicRecord, kind) as u64, kind as u32);
    rec.write(offset_of!(PanicRecord, vector) as u64, d.vector);
    rec.write(offset_of!(PanicRecord, error_code) as u64, d.error_code);
    rec.write(offset_of!(PanicRecord, rip) as u64, d.rip);
    rec.write(offset_of!(PanicRecord, cr2) as u64, d.cr2);
    rec.write(offset_of!(PanicRecord, rsp) as u64, d.rsp);
    rec.write(offset_of!(PanicRecord, reserved) as u64, 0u64);
    rec.write(offset_of!(PanicRecord, reserved) as u64 + 8, 0u64);
    rec.write_bytes(offset_of!(PanicRecord, msg) as u64, msg.as_bytes());
    rec.write(offset_of!(PanicRecord, msg_len) as u64, msg.len as u32);
    publish_fence();
    rec.write(offset_of!(PanicRecord, magic) as u64, PANIC_MAGIC);
    publish_fence();
}

/// A message formatted on the stack, truncated (on a character boundary) to what the record
/// holds.
struct Message {
    buf: [u8; PANIC_MSG_MAX],
    len: usize,
}

impl Message {
    fn new() -> Self {
        Message {
            buf: [0; PANIC_MSG_MAX],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = PANIC_MSG_MAX - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
