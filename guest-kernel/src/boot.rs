//! The boot information: the VMM's [`BootInfo`] (ddvm entry) or one synthesized from QEMU's
//! `hvm_start_info` (PVH entry), copied once into private memory and validated.

use core::fmt;
use core::mem::size_of;
use core::ptr;

use ddvm_abi::boot::{
    BootInfo, Platform, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, ENTRY_MAGIC, PCI_ECAM_SIZE,
};
use ddvm_abi::channel::ChannelHeader;
use ddvm_abi::layout::{self, CMDLINE_MAX, IDENTITY_MAPPED, IMAGE_BASE, PAGE_SIZE};
use ddvm_abi::log::LOG_HEADER_SIZE;
use ddvm_abi::panic::PanicRecord;

use crate::mmio::MmioRegion;
use crate::shared::SharedRegion;
use crate::sync::InitCell;

/// Everything the guest keeps from boot.
struct Boot {
    info: BootInfo,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
}

static BOOT: InitCell<Boot> = InitCell::new();

/// Why the boot information was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// `rsi` at the ddvm entry was not `ENTRY_MAGIC`.
    EntryMagic(u64),
    /// The boot info (or `hvm_start_info`) address is null, unaligned or not identity-mapped.
    InfoAddress(u64),
    /// Wrong `BootInfo` magic or version.
    InfoVersion {
        /// Magic found.
        magic: u64,
        /// Version found.
        version: u32,
    },
    /// RAM does not even cover the image.
    MemSize(u64),
    /// A region named in the boot info lies outside RAM or overlaps the image.
    Region {
        /// Which region.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The PCI ECAM window is misaligned, overlaps RAM or leaves the identity map.
    Ecam(u64),
    /// Wrong `hvm_start_info` magic.
    PvhMagic(u32),
    /// The `hvm_start_info` has no usable memory map (or no RAM below 4 GiB in it).
    PvhMemoryMap {
        /// `hvm_start_info` version.
        version: u32,
        /// Memory map address.
        table: u64,
        /// Memory map entries.
        entries: u32,
    },
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BootError::EntryMagic(m) => write!(f, "entry magic {m:#x} is not ddvm's"),
            BootError::InfoAddress(a) => write!(f, "boot info address {a:#x} is unusable"),
            BootError::InfoVersion { magic, version } => write!(
                f,
                "boot info magic {magic:#x} version {version} (expected {BOOT_INFO_MAGIC:#x} \
                 version {BOOT_INFO_VERSION})"
            ),
            BootError::MemSize(m) => write!(f, "mem_size {m:#x} does not cover the image"),
            BootError::Region { what, addr, len } => {
                write!(
                    f,
                    "{what} at {addr:#x} len {len:#x} is outside RAM or overlaps the image"
                )
            }
            BootError::Ecam(a) => write!(
                f,
                "PCI ECAM window at {a:#x} is misaligned, overlaps RAM or is not identity-mapped"
            ),
            BootError::PvhMagic(m) => write!(f, "hvm_start_info magic {m:#x} is wrong"),
            BootError::PvhMemoryMap {
                version,
                table,
                entries,
            } => write!(
                f,
                "hvm_start_info version {version} memory map at {table:#x} with {entries} entries \
                 has no RAM below 4 GiB"
            ),
        }
    }
}

/// The boot information (all zero before boot completes, which only the panic path can see).
pub fn info() -> &'static BootInfo {
    static NONE: BootInfo = BootInfo {
        magic: 0,
        version: 0,
        platform: 0,
        mem_size: 0,
        tsc_khz: 0,
        log_ring: 0,
        log_ring_size: 0,
        panic_record: 0,
        channel: 0,
        channel_size: 0,
        cmdline: 0,
        cmdline_len: 0,
        pci_ecam: 0,
        reserved: [0; 4],
    };
    BOOT.get().map_or(&NONE, |b| &b.info)
}

/// The platform the image runs on.
pub fn platform() -> Platform {
    info().platform()
}

/// The channel the VMM shares with this guest, if the boot info names one (validated at boot:
/// RAM outside the image; the heap stops below it).
pub fn channel() -> Option<SharedRegion> {
    let info = info();
    if info.channel == 0 {
        return None;
    }
    let len = info.channel_size.max(size_of::<ChannelHeader>() as u64);
    // SAFETY: `init_ddvm` checked `channel..channel + len` is RAM clear of the image, and the
    // heap ends below it (`heap::range`), so no Rust reference covers it.
    Some(unsafe { SharedRegion::new(info.channel, len) })
}

/// The ECAM window of PCI bus 0, if the boot info names one (validated at boot: page-aligned,
/// above RAM, identity-mapped).
pub fn pci_ecam() -> Option<MmioRegion> {
    let base = info().pci_ecam;
    if base == 0 {
        return None;
    }
    // SAFETY: `init_ddvm` checked the window is identity-mapped and above RAM, so no Rust
    // object lives there; the VMM says it is configuration space, which `pci` (the HAL for it)
    // accesses with volatile reads and writes.
    Some(unsafe { MmioRegion::new(base, PCI_ECAM_SIZE) })
}

/// The raw command line (a private copy).
pub(crate) fn cmdline_bytes() -> &'static [u8] {
    BOOT.get().map_or(&[], |b| &b.cmdline[..b.cmdline_len])
}

/// First byte after the image (page-aligned): the start of the heap.
pub fn image_end() -> u64 {
    extern "C" {
        static __image_end: u8;
    }
    // Only the address of the linker-defined symbol is taken, never its value.
    ptr::addr_of!(__image_end) as u64
}

/// Whether `addr..addr + len` lies in RAM below the identity map's end, above the null page,
/// and clear of the image.
fn region_ok(addr: u64, len: u64, mem_size: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let ram_end = mem_size.min(IDENTITY_MAPPED);
    addr >= PAGE_SIZE && end <= ram_end && (end <= IMAGE_BASE || addr >= image_end())
}

/// Whether an ECAM window at `addr` is page-aligned, above RAM and inside the identity map.
fn ecam_ok(addr: u64, mem_size: u64) -> bool {
    addr.is_multiple_of(PAGE_SIZE)
        && addr >= mem_size
        && addr
            .checked_add(PCI_ECAM_SIZE)
            .is_some_and(|end| end <= IDENTITY_MAPPED)
}

/// Takes the boot info handed over at the ddvm entry.
pub(crate) fn init_ddvm(addr: u64, magic: u64) -> Result<(), BootError> {
    if magic != ENTRY_MAGIC {
        return Err(BootError::EntryMagic(magic));
    }
    if addr < PAGE_SIZE
        || !addr.is_multiple_of(8)
        || addr + size_of::<BootInfo>() as u64 > IDENTITY_MAPPED
    {
        return Err(BootError::InfoAddress(addr));
    }
    // SAFETY: an aligned, identity-mapped address that the VMM says holds the boot info; a
    // volatile copy of plain integers (any bit pattern is a `BootInfo`), validated below.
    let info: BootInfo = unsafe { ptr::read_volatile(addr as *const BootInfo) };
    if !info.is_valid() {
        return Err(BootError::InfoVersion {
            magic: info.magic,
            version: info.version,
        });
    }
    if info.mem_size < image_end() {
        return Err(BootError::MemSize(info.mem_size));
    }
    let regions = [
        (
            "log ring",
            info.log_ring,
            info.log_ring_size.max(LOG_HEADER_SIZE),
        ),
        (
            "panic record",
            info.panic_record,
            size_of::<PanicRecord>() as u64,
        ),
        (
            "channel",
            info.channel,
            info.channel_size.max(size_of::<ChannelHeader>() as u64),
        ),
    ];
    for (what, a, len) in regions {
        if a != 0 && !region_ok(a, len, info.mem_size) {
            return Err(BootError::Region { what, addr: a, len });
        }
    }
    if info.pci_ecam != 0 && !ecam_ok(info.pci_ecam, info.mem_size) {
        return Err(BootError::Ecam(info.pci_ecam));
    }
    let mut boot = Boot {
        info,
        cmdline: [0; CMDLINE_MAX],
        cmdline_len: 0,
    };
    if info.cmdline != 0 && info.cmdline_len != 0 {
        let len = (info.cmdline_len as usize).min(CMDLINE_MAX);
        if !region_ok(info.cmdline, len as u64, info.mem_size) {
            return Err(BootError::Region {
                what: "command line",
                addr: info.cmdline,
                len: len as u64,
            });
        }
        boot.cmdline_len = copy_cmdline(info.cmdline, len, &mut boot.cmdline);
    }
    store(boot);
    Ok(())
}

/// QEMU's `struct hvm_start_info` (Xen `arch-x86/hvm/start_info.h`, version 1).
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
/// More entries than any real map has; the rest are ignored.
const MEMMAP_MAX: u32 = 128;

/// Synthesizes the boot info from QEMU's `hvm_start_info` at `addr` (PVH entry).
pub(crate) fn init_pvh(addr: u64) -> Result<(), BootError> {
    // QEMU's option ROM keeps its tables in the first page: only null is refused.
    if addr == 0
        || !addr.is_multiple_of(8)
        || addr + size_of::<HvmStartInfo>() as u64 > IDENTITY_MAPPED
    {
        return Err(BootError::InfoAddress(addr));
    }
    // SAFETY: QEMU passed this address in `ebx`; aligned and identity-mapped (checked above);
    // a volatile copy of plain integers, validated below.
    let start: HvmStartInfo = unsafe { ptr::read_volatile(addr as *const HvmStartInfo) };
    if start.magic != HVM_START_MAGIC {
        return Err(BootError::PvhMagic(start.magic));
    }
    let mem_size = pvh_ram_end(&start).ok_or(BootError::PvhMemoryMap {
        version: start.version,
        table: start.memmap_paddr,
        entries: start.memmap_entries,
    })?;
    if mem_size < image_end() {
        return Err(BootError::MemSize(mem_size));
    }
    let mut boot = Boot {
        info: BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            platform: Platform::QemuPvh as u32,
            mem_size,
            panic_record: layout::PANIC_RECORD,
            ..Default::default()
        },
        cmdline: [0; CMDLINE_MAX],
        cmdline_len: 0,
    };
    let c = start.cmdline_paddr;
    if c != 0 && c < IDENTITY_MAPPED {
        let len = CMDLINE_MAX.min((IDENTITY_MAPPED - c) as usize);
        boot.cmdline_len = copy_cmdline(c, len, &mut boot.cmdline);
    }
    boot.info.cmdline_len = boot.cmdline_len as u64;
    store(boot);
    Ok(())
}

/// End of the highest RAM range below 4 GiB in the PVH memory map.
fn pvh_ram_end(start: &HvmStartInfo) -> Option<u64> {
    let entry = size_of::<HvmMemmapEntry>() as u64;
    let n = u64::from(start.memmap_entries.min(MEMMAP_MAX));
    let table = start.memmap_paddr;
    if start.version < 1
        || table == 0
        || !table.is_multiple_of(8)
        || table + n * entry > IDENTITY_MAPPED
    {
        return None;
    }
    (0..n)
        .map(|i| {
            // SAFETY: in the identity map and aligned (checked above); a volatile copy of
            // plain integers.
            unsafe { ptr::read_volatile((table + i * entry) as *const HvmMemmapEntry) }
        })
        .filter(|e| e.kind == E820_RAM && e.addr < IDENTITY_MAPPED)
        .map(|e| e.addr.saturating_add(e.size).min(IDENTITY_MAPPED))
        .max()
}

/// Copies a command line of at most `len` bytes at `addr`, up to its first NUL, into `out`;
/// returns its length.
fn copy_cmdline(addr: u64, len: usize, out: &mut [u8; CMDLINE_MAX]) -> usize {
    for (i, slot) in out.iter_mut().enumerate().take(len) {
        // SAFETY: `addr..addr + len` is identity-mapped RAM (checked by the callers), read
        // byte by byte with volatile reads.
        let b = unsafe { ptr::read_volatile((addr + i as u64) as *const u8) };
        if b == 0 {
            return i;
        }
        *slot = b;
    }
    len
}

fn store(boot: Boot) {
    if BOOT.set(boot).is_err() {
        unreachable!("boot info is taken once");
    }
}
