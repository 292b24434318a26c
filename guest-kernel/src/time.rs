//! A monotonic clock from the TSC.

use core::sync::atomic::{AtomicU64, Ordering};

use ddvm_abi::boot::{BootInfo, Platform};

use crate::arch::cpu;
use crate::arch::io::Port;

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
    /// Measured against the PIT (QEMU only: its TCG CPUs report no TSC frequency).
    Pit,
}

/// Takes the TSC frequency from the boot info, else from CPUID, else (under QEMU) measures it
/// against the PIT, else assumes 1 GHz. Boot only.
pub(crate) fn init(info: &BootInfo) {
    let (khz, source) = if info.tsc_khz != 0 {
        (info.tsc_khz, TscSource::BootInfo)
    } else if let Some(khz) = cpuid_tsc_khz() {
        (khz, TscSource::Cpuid)
    } else if let Some(khz) = pit_tsc_khz(info) {
        (khz, TscSource::Pit)
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

/// The PIT's input clock.
const PIT_HZ: u64 = 1_193_182;
/// PIT ticks measured: 10 ms.
const PIT_CALIBRATION_TICKS: u64 = PIT_HZ / 100;

/// Under QEMU only (never under ddvm, where every port is an exit and the VMM knows the
/// frequency): counts TSC ticks over 10 ms of PIT channel 0, programmed as a free-running
/// rate generator and read through counter latches. `None` when there is no PIT (the count
/// does not move).
fn pit_tsc_khz(info: &BootInfo) -> Option<u64> {
    if info.platform() != Platform::QemuPvh {
        return None;
    }
    // SAFETY: the i8254's ports under QEMU; programming and latching channel 0 touches no
    // memory. Nothing else in the guest uses the PIT, and its interrupt is never unmasked.
    let (data, command) = unsafe { (Port::<u8>::new(0x40), Port::<u8>::new(0x43)) };
    // Channel 0, low then high byte, mode 2 (rate generator), binary; reload 0 = 65536.
    command.write(0x34);
    data.write(0);
    data.write(0);
    let read = || {
        command.write(0x00); // latch channel 0
        let low = u64::from(data.read());
        low | (u64::from(data.read()) << 8)
    };
    let mut last = read();
    let (mut elapsed, start, mut moved) = (0, cpu::rdtsc(), 0u32);
    while elapsed < PIT_CALIBRATION_TICKS {
        let now = read();
        // The count runs down and reloads at 65536: elapsed ticks modulo 65536 (each read is
        // far less than 55 ms after the last).
        let delta = (last + 0x1_0000 - now) & 0xffff;
        if delta != 0 {
            moved += 1;
        } else if moved == 0 && cpu::rdtsc().wrapping_sub(start) > 1 << 26 {
            return None;
        }
        elapsed += delta;
        last = now;
    }
    let ticks = cpu::rdtsc().wrapping_sub(start);
    let khz = u128::from(ticks) * u128::from(PIT_HZ) / (u128::from(elapsed) * 1000);
    u64::try_from(khz).ok().filter(|&k| k > 0)
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
        3 => TscSource::Pit,
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
