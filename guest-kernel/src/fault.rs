//! Deliberate CPU faults, for fault injection (the channel's `fault` word) and tests. Each one
//! ends the guest through the path a real bug would take.

use core::ops::Range;
use core::ptr;

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

/// The loaded image: code, read-only data, data and `.bss` (`__image_start..__bss_end` of the
/// linker script), the target of [`flip_image_bit`].
pub fn image() -> Range<u64> {
    extern "C" {
        static __image_start: u8;
        static __bss_end: u8;
    }
    // Only the addresses of the linker-defined symbols are taken, never their values.
    ptr::addr_of!(__image_start) as u64..ptr::addr_of!(__bss_end) as u64
}

/// Flips bit `bit % 8` of the byte at `addr` in the guest's own [`image`]: a deliberate
/// corruption of its code or data, as software-implemented fault injection (SWIFI) does.
/// What follows is whatever the flipped bit makes of the guest. Panics, touching nothing,
/// when `addr` is outside the image.
pub fn flip_image_bit(addr: u64, bit: u32) {
    assert!(
        image().contains(&addr),
        "bit flip at {addr:#x} outside the image {:#x?}",
        image()
    );
    let p = addr as *mut u8;
    // SAFETY: `addr` is inside the loaded image, which the identity map (the VMM's, or the PVH
    // entry's) maps present and writable, so the accesses cannot fault. Changing code or data
    // that Rust assumes immutable is the point: this is the injected fault, the caller asked
    // for it, and nothing here relies on the old value afterwards.
    unsafe { ptr::write_volatile(p, ptr::read_volatile(p) ^ (1 << (bit % 8))) }
}
