//! The DMA window: the only path from a device to its domain's memory.
//!
//! A driver domain may program its device to DMA anywhere. The window plays the IOMMU: an access
//! is allowed only if it lies entirely inside the domain's guest memory and bus mastering is
//! enabled in the device's command register; anything else is refused with a [`DmaError`] and
//! counted. Accesses go through vm-memory's checked `Bytes` API, never through a Rust reference
//! into guest memory.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A refused DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// The access is not entirely inside the domain's memory.
    #[error("DMA of {len} bytes at {addr:#x} is outside the domain's memory")]
    OutOfWindow {
        /// Device address (a guest-physical address of the domain).
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Bus mastering is disabled: the device may not DMA at all.
    #[error("DMA of {len} bytes at {addr:#x} refused: bus mastering is disabled")]
    BusMasterDisabled {
        /// Device address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A device's view of its domain's memory.
///
/// Clones share the memory, the bus-master switch and the refusal counter, so the PCI layer can
/// switch bus mastering off for a device model that holds its own clone. A new window has bus
/// mastering enabled; [`crate::pci::PciDevice::new`] switches it off to match the command
/// register's power-on value until the domain's driver sets Bus Master Enable.
#[derive(Clone)]
pub struct DmaWindow {
    mem: GuestMemoryMmap<()>,
    bus_master: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
}

impl fmt::Debug for DmaWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaWindow")
            .field("bus_master", &self.bus_master())
            .field("refused", &self.refused())
            .finish_non_exhaustive()
    }
}

impl DmaWindow {
    /// A window over all of `mem` (the domain's memory), with bus mastering enabled.
    pub fn new(mem: GuestMemoryMmap<()>) -> Self {
        DmaWindow {
            mem,
            bus_master: Arc::new(AtomicBool::new(true)),
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Allows (`true`) or refuses (`false`) every DMA from now on.
    pub fn set_bus_master(&self, enabled: bool) {
        self.bus_master.store(enabled, Ordering::SeqCst);
    }

    /// Whether DMA is currently allowed at all.
    pub fn bus_master(&self) -> bool {
        self.bus_master.load(Ordering::SeqCst)
    }

    /// How many accesses were refused since the window was created.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether `[addr, addr + len)` lies entirely inside the domain's memory (regardless of
    /// bus mastering; nothing is counted). For validating configuration, not for DMA.
    pub fn contains(&self, addr: u64, len: usize) -> bool {
        addr.checked_add(len as u64).is_some()
            && (len == 0 || self.mem.check_range(GuestAddress(addr), len))
    }

    /// Checks that `[addr, addr + len)` may be accessed now; counts a refusal.
    pub fn check(&self, addr: u64, len: usize) -> Result<(), DmaError> {
        let len64 = len as u64;
        if !self.bus_master() {
            return Err(self.refuse(DmaError::BusMasterDisabled { addr, len: len64 }));
        }
        if !self.contains(addr, len) {
            return Err(self.refuse(DmaError::OutOfWindow { addr, len: len64 }));
        }
        Ok(())
    }

    /// Copies `data.len()` bytes at device address `addr` into `data`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), DmaError> {
        self.check(addr, data.len())?;
        let len = data.len() as u64;
        self.mem
            .read_slice(data, GuestAddress(addr))
            .map_err(|_| self.refuse(DmaError::OutOfWindow { addr, len }))
    }

    /// Copies `data` to device address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.check(addr, data.len())?;
        let len = data.len() as u64;
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| self.refuse(DmaError::OutOfWindow { addr, len }))
    }

    /// Reads an aligned little-endian `u32` atomically with `order` (shadow doorbells).
    pub fn load_u32(&self, addr: u64, order: Ordering) -> Result<u32, DmaError> {
        self.check(addr, 4)?;
        self.mem
            .load::<u32>(GuestAddress(addr), order)
            .map(u32::from_le)
            .map_err(|_| self.refuse(DmaError::OutOfWindow { addr, len: 4 }))
    }

    /// Writes an aligned little-endian `u32` atomically with `order` (completion status words,
    /// event indexes), so the driver never sees it half written.
    pub fn store_u32(&self, addr: u64, value: u32, order: Ordering) -> Result<(), DmaError> {
        self.check(addr, 4)?;
        self.mem
            .store(value.to_le(), GuestAddress(addr), order)
            .map_err(|_| self.refuse(DmaError::OutOfWindow { addr, len: 4 }))
    }

    fn refuse(&self, e: DmaError) -> DmaError {
        self.refused.fetch_add(1, Ordering::Relaxed);
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(size: usize) -> (GuestMemoryMmap<()>, DmaWindow) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        (mem.clone(), DmaWindow::new(mem))
    }

    #[test]
    fn reads_and_writes_inside_the_window() {
        let (mem, dma) = window(0x10000);
        dma.write(0x1000, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        let mut c = [0u8; 4];
        dma.read(0x1000, &mut c).unwrap();
        assert_eq!(c, b);
        dma.store_u32(0x2000, 0xdead_beef, Ordering::Release)
            .unwrap();
        assert_eq!(
            dma.load_u32(0x2000, Ordering::Acquire).unwrap(),
            0xdead_beef
        );
        assert_eq!(dma.refused(), 0);
    }

    #[test]
    fn accesses_leaving_the_window_are_refused_and_counted() {
        let (_mem, dma) = window(0x10000);
        let mut b = [0u8; 8];
        assert_eq!(
            dma.read(0xfffc, &mut b),
            Err(DmaError::OutOfWindow {
                addr: 0xfffc,
                len: 8
            })
        );
        assert_eq!(
            dma.write(u64::MAX - 2, &b),
            Err(DmaError::OutOfWindow {
                addr: u64::MAX - 2,
                len: 8
            })
        );
        assert!(dma.load_u32(0x10000, Ordering::Acquire).is_err());
        assert_eq!(dma.refused(), 3);
    }

    #[test]
    fn bus_master_off_refuses_everything() {
        let (_mem, dma) = window(0x10000);
        let other = dma.clone();
        other.set_bus_master(false);
        let mut b = [0u8; 4];
        assert_eq!(
            dma.read(0, &mut b),
            Err(DmaError::BusMasterDisabled { addr: 0, len: 4 })
        );
        assert_eq!(dma.refused(), 1);
        other.set_bus_master(true);
        dma.read(0, &mut b).unwrap();
    }
}
