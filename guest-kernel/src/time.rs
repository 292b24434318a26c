//! A monotonic clock from the TSC.

use core::sync::atomic::{AtomicU64, Ordering};

use ddvm_abi::boot::BootInfo;

use crate::arch::cpu;

/// Frequency assumed when neither the VMM nor CPUID knows it (1 GHz).
const ASSUMED_TSC_KHZ: u64 = 1_000_000;

static TSC_KHZ: AtomicU64 = AtomicU64::new(ASSUMED_TSC_KHZ);
static SOURCE: AtomicU64 = AtomicU64::new(TscSource::Assumed as u64);

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum TscSource {
    /// The VMM's boot info.
    BootInfo,
    /// CPUID (leaf 0x15, 0x16 or the hypervisor timing leaf 0x4000_0010).
    Cpuid,
    /// Unknown: 1 GHz assumed.
    Assumed,
}

/// Takes the TSC frequency from the boot info, else from CPUID, else assumes 1 GHz. Boot only.
pub(crate) fn init(info: &BootInfo) {
    let (khz, source) = if info.tsc_khz != 0 {
        (info.tsc_khz, TscSource::BootInfo)
    } else if let Some(khz) = cpuid_tsc_khz() {
        (khz, TscSource::Cpuid)
    } else {
        (ASSUMED_TSC_KHZ, TscSource::Assumed)
    };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    SOURCE.store(source as u64, Ordering::Relaxed);
}

/// TSC frequency from CPUID, if the CPU or the hypervisor says.
fn cpuid_tsc_khz() -> Option<u64> {
    let max = cpu::cpuid(0, 0).eax;
    if max >= 0x15 {
        let l = cpu::cpuid(0x15, 0);
        let khz = match l.eax {
            0 => 0,
            den => u64::from(l.ecx) * u64::from(l.ebx) / u64::from(den) / 1000,
        };
        if khz != 0 {
            return Some(khz);
        }
    }
    if max >= 0x16 {
        let mhz = cpu::cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1000);
        }
    }
    let hypervisor = cpu::cpuid(1, 0).ecx & (1 << 31) != 0;
    if hypervisor && cpu::cpuid(0x4000_0000, 0).eax >= 0x4000_0010 {
        let khz = cpu::cpuid(0x4000_0010, 0).eax;
        if khz != 0 {
            return Some(u64::from(khz));
        }
    }
    None
}

/// TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Where [`tsc_khz`] came from.
pub fn tsc_source() -> TscSource {
    match SOURCE.load(Ordering::Relaxed) {
        0 => TscSource::BootInfo,
        1 => TscSource::Cpuid,
        _ => TscSource::Assumed,
    }
}

/// TSC ticks (monotonic on the CPUs ddvm runs on: invariant TSC).
#[inline]
pub fn ticks() -> u64 {
    cpu::rdtsc()
}

/// Microseconds in `ticks` TSC ticks.
pub fn ticks_to_us(ticks: u64) -> u64 {
    (u128::from(ticks) * 1000 / u128::from(tsc_khz())) as u64
}

/// TSC ticks in `us` microseconds.
pub fn us_to_ticks(us: u64) -> u64 {
    (u128::from(us) * u128::from(tsc_khz()) / 1000).min(u128::from(u64::MAX)) as u64
}

/// Microseconds since the TSC's origin (reset or VM start).
pub fn now_us() -> u64 {
    ticks_to_us(ticks())
}

/// A point in time, for measuring intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instant(u64);

impl Instant {
    /// Now.
    pub fn now() -> Self {
        Instant(ticks())
    }

    /// TSC ticks since `self`.
    pub fn elapsed_ticks(&self) -> u64 {
        ticks().saturating_sub(self.0)
    }

    /// Microseconds since `self`.
    pub fn elapsed_us(&self) -> u64 {
        ticks_to_us(self.elapsed_ticks())
    }
}

/// Spins for `us` microseconds (no exits).
pub fn delay_us(us: u64) {
    let start = ticks();
    let span = us_to_ticks(us);
    while ticks().wrapping_sub(start) < span {
        core::hint::spin_loop();
    }
}
