//! Finding the virtio-blk device: the `virtio_mmio.device=SIZE@BASE[:IRQ[:ID]]` tokens of the
//! command line (Linux's syntax; the IRQ and id are ignored: this image polls), probed in order
//! for the virtio-mmio magic and device id 2.

#![allow(unsafe_code)]

use alloc::format;
use alloc::vec::Vec;

use guest_kernel::abi::layout::IDENTITY_MAPPED;
use guest_kernel::boot;
use guest_kernel::cmdline::Cmdline;
use guest_kernel::mmio::MmioRegion;

use crate::config::{parse_size, parse_u64, BadArg, DEVICE_KEY};

/// "virt" in little-endian: the first register of every virtio-mmio device.
pub const MAGIC: u32 = 0x7472_6976;
/// Device id of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Device id of a network device.
pub const DEVICE_ID_NET: u32 = 1;
/// Smallest window accepted: the registers (0x100 bytes) and the block config space we read.
pub const MIN_WINDOW: u64 = 0x200;

/// Register offsets of the virtio-mmio transport (virtio 1.x, 4.2.2).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG: u64 = 0x100;
}

/// A device window named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Guest-physical base.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

/// A virtio-blk device found in a window.
#[derive(Clone, Copy, Debug)]
pub struct Found {
    /// Where.
    pub window: Window,
    /// virtio-mmio version (1 legacy, 2 modern).
    pub version: u32,
    /// Its registers.
    pub regs: MmioRegion,
}

/// Parses `SIZE@BASE[:IRQ[:ID]]`.
pub fn parse_window(value: &str) -> Option<Window> {
    let (size, rest) = value.split_once('@')?;
    let base = rest.split(':').next()?;
    Some(Window {
        base: parse_u64(base)?,
        size: parse_size(size)?,
    })
}

/// Every `virtio_mmio.device` window on the command line, in order; at least one, each inside
/// the identity map and above RAM.
pub fn windows(cmdline: Cmdline<'_>) -> Result<Vec<Window>, BadArg> {
    let ram_end = boot::info().mem_size;
    let mut found = Vec::new();
    for value in cmdline
        .tokens()
        .filter_map(|t| t.split_once('='))
        .filter(|(k, _)| *k == DEVICE_KEY)
        .map(|(_, v)| v)
    {
        let w = parse_window(value).ok_or_else(|| {
            BadArg::new(
                DEVICE_KEY,
                value,
                "SIZE@BASE (e.g. 4K@0xd0000000, optionally :IRQ after it)",
            )
        })?;
        let end = w.base.saturating_add(w.size);
        if w.size < MIN_WINDOW
            || !w.base.is_multiple_of(4)
            || w.base < ram_end
            || end > IDENTITY_MAPPED
        {
            return Err(BadArg::new(
                DEVICE_KEY,
                value,
                format!(
                    "a window of at least {MIN_WINDOW:#x} bytes, 4-byte aligned, above RAM \
                     ({ram_end:#x}) and below {IDENTITY_MAPPED:#x}"
                ),
            ));
        }
        found.push(w);
    }
    if found.is_empty() {
        return Err(BadArg::new(
            DEVICE_KEY,
            "",
            "at least one SIZE@BASE token naming a virtio-mmio device",
        ));
    }
    Ok(found)
}

/// Registers of `window`.
fn registers(window: Window) -> MmioRegion {
    // SAFETY: `windows` checked the window lies above RAM and inside the identity map, so no
    // Rust memory is there; the command line vouches that it is a virtio-mmio device (or
    // nothing: then reads return whatever the VMM returns for unclaimed MMIO, and the magic
    // check below rejects it before anything is written).
    unsafe { MmioRegion::new(window.base, window.size) }
}

/// The first window holding a virtio-mmio device with device id 2 (block). `Err` lists what
/// each window held.
pub fn find_block(windows: &[Window]) -> Result<Found, alloc::string::String> {
    find(windows, DEVICE_ID_BLOCK, "virtio-blk")
}

/// The first window holding a virtio-mmio device with device id 1 (network).
pub fn find_net(windows: &[Window]) -> Result<Found, alloc::string::String> {
    find(windows, DEVICE_ID_NET, "virtio-net")
}

/// The first window holding a virtio-mmio device with device id `want` (`what`). `Err` lists
/// what each window held.
fn find(windows: &[Window], want: u32, what: &str) -> Result<Found, alloc::string::String> {
    let mut seen = Vec::new();
    for &window in windows {
        let regs = registers(window);
        let magic = regs.read_only::<u32>(reg::MAGIC).read();
        if magic != MAGIC {
            seen.push(format!("{:#x}: magic {magic:#x}", window.base));
            continue;
        }
        let version = regs.read_only::<u32>(reg::VERSION).read();
        let id = regs.read_only::<u32>(reg::DEVICE_ID).read();
        if id == want && (version == 1 || version == 2) {
            return Ok(Found {
                window,
                version,
                regs,
            });
        }
        seen.push(format!("{:#x}: version {version} device {id}", window.base));
    }
    Err(format!(
        "no {what} device in the {} virtio_mmio.device window(s) ({})",
        windows.len(),
        seen.join(", ")
    ))
}
