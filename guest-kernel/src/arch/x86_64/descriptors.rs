//! The guest's own GDT and IDT, and the stubs of exception vectors 0–31.
//!
//! The GDT has the same selectors as the VMM's entry GDT (`SEL_CODE64` = 0x10, `SEL_DATA` =
//! 0x18), so loading it changes nothing the CPU has cached and no segment register needs a
//! reload on the ddvm path. The IDT's 32 interrupt gates (selector 0x10, DPL 0, present) point
//! at stubs that push the vector (and a zero error code where the CPU pushes none) and call
//! [`crate::panic::exception`] with an [`ExceptionFrame`]. Nothing returns: every exception is
//! fatal. Exceptions run on the stack in use (no TSS, no IST): a stack overflow cannot be
//! reported and ends in a triple fault, which the VMM sees as a shutdown exit.

use core::arch::{asm, global_asm};
use core::mem::size_of;

use ddvm_abi::layout::{GDT_ENTRIES, SEL_CODE64};

use crate::sync::InitCell;

/// Vectors with a CPU exception.
const VECTORS: usize = 32;

/// The guest's GDT (same layout as the VMM's entry GDT). Referenced by the PVH trampoline.
/// Both descriptors have their accessed bit set, so the CPU never writes to it.
pub(crate) static GDT: [u64; 4] = GDT_ENTRIES;

/// The IDT, filled once at boot.
static IDT: InitCell<[IdtEntry; VECTORS]> = InitCell::new();

/// What the stubs leave on the stack for the Rust handler: the vector and the error code they
/// pushed, then the CPU's 64-bit interrupt frame.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExceptionFrame {
    /// Exception vector.
    pub vector: u64,
    /// Error code pushed by the CPU, 0 for vectors without one.
    pub error_code: u64,
    /// Faulting (or next, for traps) instruction.
    pub rip: u64,
    /// Code segment.
    pub cs: u64,
    /// Flags.
    pub rflags: u64,
    /// Stack pointer before the exception.
    pub rsp: u64,
    /// Stack segment.
    pub ss: u64,
}

/// A 64-bit interrupt gate.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl IdtEntry {
    /// Present, DPL 0, 64-bit interrupt gate.
    const INTERRUPT_GATE: u8 = 0x8e;

    fn interrupt_gate(handler: u64) -> Self {
        IdtEntry {
            offset_low: handler as u16,
            selector: SEL_CODE64,
            ist: 0,
            type_attr: Self::INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// Operand of `lgdt`/`lidt`.
#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

// The exception stubs. Vectors 8, 10–14, 17, 21, 29 and 30 get an error code from the CPU; the
// others push a zero in its place so that every handler sees the same frame.
global_asm!(
    r#"
    .pushsection .text.ddvm_exceptions, "ax"
    .irp vec, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    .balign 16
ddvm_exception_\vec:
    push 0
    push \vec
    jmp ddvm_exception_common
    .endr

    .irp vec, 8,10,11,12,13,14,17,21,29,30
    .balign 16
ddvm_exception_\vec:
    push \vec
    jmp ddvm_exception_common
    .endr

ddvm_exception_common:
    cld
    mov rdi, rsp
    and rsp, -16
    call {handler}
    ud2

    .section .rodata.ddvm_exceptions, "a"
    .balign 8
ddvm_exception_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad ddvm_exception_\vec
    .endr
    .popsection
    "#,
    handler = sym exception_entry,
);

extern "C" {
    /// Stub addresses, by vector (defined above).
    static ddvm_exception_stubs: [u64; VECTORS];
}

/// Called by the stubs with a pointer to the frame they built.
extern "sysv64" fn exception_entry(frame: *const ExceptionFrame) -> ! {
    // SAFETY: the stub passes the stack pointer right after pushing the vector and the error
    // code, so `frame` points at an `ExceptionFrame` on the current stack.
    let frame = unsafe { frame.read() };
    crate::panic::exception(&frame)
}

/// Loads the guest's GDT and IDT (two exits on PVM). Boot only.
pub(crate) fn load() {
    // SAFETY: reading an immutable array of addresses defined by the assembly above.
    let stubs = unsafe { ddvm_exception_stubs };
    let idt = IDT
        .set(core::array::from_fn(|v| IdtEntry::interrupt_gate(stubs[v])))
        .unwrap_or_else(|_| unreachable!("descriptors are loaded once"));
    let gdt_ptr = TablePointer {
        limit: (size_of::<[u64; 4]>() - 1) as u16,
        base: GDT.as_ptr() as u64,
    };
    let idt_ptr = TablePointer {
        limit: (size_of::<[IdtEntry; VECTORS]>() - 1) as u16,
        base: idt.as_ptr() as u64,
    };
    // SAFETY: the GDT holds the descriptors the CPU already uses under the same selectors, so
    // no cached segment changes meaning; the IDT's gates point at the stubs above. Both tables
    // are statics that live forever.
    unsafe {
        asm!(
            "lgdt [{gdt}]",
            "lidt [{idt}]",
            gdt = in(reg) &gdt_ptr,
            idt = in(reg) &idt_ptr,
            options(readonly, nostack, preserves_flags),
        )
    };
}

/// Loads an empty IDT and raises #UD: the CPU cannot deliver it, nor the #DF after it, and
/// shuts down (a triple fault, a shutdown exit for the VMM). Fault injection only.
pub(crate) fn triple_fault() -> ! {
    let empty = TablePointer { limit: 0, base: 0 };
    // SAFETY: deliberately ends the VM; nothing after it runs.
    unsafe {
        asm!(
            "lidt [{idt}]",
            "ud2",
            idt = in(reg) &empty,
            options(noreturn, nostack),
        )
    }
}
