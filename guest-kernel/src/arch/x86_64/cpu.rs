//! Unprivileged and boot-time CPU instructions.
//!
//! On PVM, `cpuid`, `hlt` and control-register reads are exits (~23 µs); `rdtsc`, `pause` and
//! plain arithmetic run natively.

use core::arch::asm;
use core::arch::x86_64::CpuidResult;

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` only writes edx:eax; CR4.TSD is clear on every platform ddvm supports.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Executes CPUID for `leaf`/`subleaf` (an exit on PVM: boot-time only).
// `__cpuid_count` is a safe function in newer toolchains.
#[allow(unused_unsafe)]
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    // SAFETY: CPUID exists on every x86-64 CPU and has no side effects.
    unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) }
}

/// Halts until the next interrupt or spurious wake. Always call it in a loop: on PVM the first
/// `hlt` after the VMM set the VIF page returns at once.
#[inline]
pub fn halt() {
    // SAFETY: `hlt` touches no memory; with interrupts off it waits for an NMI, a wake-up
    // from the VMM, or forever, all of which the callers expect.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}

/// Reads CR2, the address of the last page fault (an exit on PVM: fault reporting only).
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects; the guest runs at (virtual) CPL 0.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Runs a tight loop of exactly `iterations` `dec`/`jnz` pairs (about two instructions per
/// iteration, no memory accesses): a CPU-bound workload whose length does not depend on the
/// optimiser. Zero iterations do nothing.
pub fn spin_iterations(iterations: u64) {
    if iterations == 0 {
        return;
    }
    // SAFETY: the loop only decrements a register it owns.
    unsafe {
        asm!(
            "2:",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iterations => _,
            options(nomem, nostack),
        )
    };
}
