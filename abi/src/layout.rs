//! Guest-physical layout of a ddvm guest's low memory.
//!
//! ```text
//! 0x0000_0000  unused (null page)
//! 0x0000_1000  boot info (VMM writes, guest reads); command line at +CMDLINE_OFFSET
//! 0x0000_2000  PVM VIF page (registered by the VMM on PVM hosts)
//! 0x0000_3000  panic record (guest writes, VMM reads after a panic exit)
//! 0x0000_4000  GDT used at entry
//! 0x0000_5000  PML4, 0x6000 PDPT, 0x7000..0xb000 four page directories (identity map of 4 GiB
//!              with 2 MiB pages, U/S set at every level as PVM requires)
//! 0x0001_0000  log ring (header + data), LOG_RING_SIZE bytes
//! 0x0010_0000  image (ELF segments are loaded at their physical addresses, at or above here)
//! ...          heap, from the image's end to the channel
//! top of RAM   channel (header, rings, bounce slots), CHANNEL size given in the boot info
//! ```

/// Boot info page.
pub const BOOT_INFO: u64 = 0x1000;
/// Offset of the NUL-free command line inside the boot info page.
pub const CMDLINE_OFFSET: u64 = 0x800;
/// Longest command line.
pub const CMDLINE_MAX: usize = 0x800;
/// PVM virtual-interrupt-flag page.
pub const VIF_PAGE: u64 = 0x2000;
/// Panic record page.
pub const PANIC_RECORD: u64 = 0x3000;
/// GDT installed by the VMM for the 64-bit entry.
pub const GDT: u64 = 0x4000;
/// Top-level page table installed by the VMM.
pub const PML4: u64 = 0x5000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0x6000;
/// First of the four page directories.
pub const PD: u64 = 0x7000;
/// Bytes identity-mapped by the entry page tables.
pub const IDENTITY_MAPPED: u64 = 4 << 30;
/// Log ring.
pub const LOG_RING: u64 = 0x1_0000;
/// Size of the log ring, header included.
pub const LOG_RING_SIZE: u64 = 0x1_0000;
/// Lowest address an image may load to.
pub const IMAGE_BASE: u64 = 0x10_0000;

/// Selector of the 64-bit code segment in the entry GDT (and in guest-kernel's own GDT).
pub const SEL_CODE64: u16 = 0x10;
/// Selector of the data segment.
pub const SEL_DATA: u16 = 0x18;

/// Page size.
pub const PAGE_SIZE: u64 = 0x1000;
/// Large page size used by the identity map.
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;

/// Page-table entry bits.
pub mod pte {
    /// Present.
    pub const PRESENT: u64 = 1 << 0;
    /// Writable.
    pub const WRITABLE: u64 = 1 << 1;
    /// User/supervisor: must be set at every level on PVM, harmless elsewhere.
    pub const USER: u64 = 1 << 2;
    /// Page size (2 MiB leaf in a page directory).
    pub const HUGE: u64 = 1 << 7;
    /// Flags of a non-leaf entry.
    pub const TABLE: u64 = PRESENT | WRITABLE | USER;
    /// Flags of a 2 MiB leaf.
    pub const LEAF_2M: u64 = PRESENT | WRITABLE | USER | HUGE;
}

/// Entry GDT: null, unused, 64-bit code (DPL 0), data.
pub const GDT_ENTRIES: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
