//! Deliberate CPU faults, for fault injection (the channel's `fault` word) and tests. Each one
//! ends the guest through the path a real bug would take.

use ddvm_abi::layout::IDENTITY_MAPPED;

use crate::arch::descriptors;

/// An address no guest maps: past the 4 GiB identity map (PML4 slot 0, PDPT entry 64).
pub const UNMAPPED_ADDRESS: u64 = 0x10_0000_0000;
const _: () = assert!(UNMAPPED_ADDRESS >= IDENTITY_MAPPED);

/// Executes `ud2`: #UD (vector 6) through the IDT.
pub fn invalid_opcode() -> ! {
    // SAFETY: raises #UD, whose handler reports and stops the guest; nothing after it runs.
    unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
}

/// Reads [`UNMAPPED_ADDRESS`]: #PF (vector 14) through the IDT.
pub fn page_fault() -> ! {
    // SAFETY: the address is not mapped, so the load faults and the #PF handler stops the
    // guest; nothing after it runs.
    unsafe {
        core::arch::asm!(
            "mov {addr}, qword ptr [{addr}]",
            "ud2",
            addr = in(reg) UNMAPPED_ADDRESS,
            options(noreturn, nostack),
        )
    }
}

/// Loads an empty IDT and raises #UD: a triple fault (the VMM sees a shutdown exit).
pub fn triple_fault() -> ! {
    descriptors::triple_fault()
}

/// Spins for ever without doing anything else (a hung domain).
pub fn hang() -> ! {
    loop {
        core::hint::spin_loop();
    }
}
