//! The DMA window: the only path from a device to its domain's memory.
//!
//! A driver domain may program its device to DMA anywhere. The window plays the IOMMU: an access
//! is allowed only if it lies entirely inside the domain's guest memory and bus mastering is
//! enabled in the device's command register; anything else is refused with a [`DmaError`] and
//! counted. Accesses go through vm-memory's checked `Bytes` API, never through a Rust reference
//! into guest memory.
//!
//! The device outlives its domain (recovery hands it to the next one, as a VFIO device stays
//! with the VMM), so the window can be [detached](DmaWindow::detach) from a dead domain's
//! memory and [retargeted](DmaWindow::retarget) to a new domain's. Every access holds a read
//! lock on the target for its whole duration; retarget and detach take the write lock, so once
//! they return no access into the old memory is in progress or can start.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

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
    /// The window is detached from any domain's memory (between a domain's death and the
    /// next domain's memory).
    #[error("DMA of {len} bytes at {addr:#x} refused: the device serves no domain")]
    Detached {
        /// Device address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// What the clones of a window share.
struct Inner {
    /// The domain's memory; `None` while detached.
    mem: RwLock<Option<GuestMemoryMmap<()>>>,
    bus_master: AtomicBool,
    refused: AtomicU64,
}

/// A device's view of its domain's memory.
///
/// Clones share the target memory, the bus-master switch and the refusal counter, so the PCI
/// layer can switch bus mastering off, and the VMM can detach and retarget the window, for a
/// device model that holds its own clone. A new window has bus mastering enabled;
/// [`crate::pci::PciDevice::new`] switches it off to match the command register's power-on
/// value until the domain's driver sets Bus Master Enable.
#[derive(Clone)]
pub struct DmaWindow {
    inner: Arc<Inner>,
}

impl fmt::Debug for DmaWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaWindow")
            .field("attached", &self.attached())
            .field("bus_master", &self.bus_master())
            .field("refused", &self.refused())
            .finish_non_exhaustive()
    }
}

/// The target memory (`None`: detached), locked for the duration of one access.
type Target<'a> = RwLockReadGuard<'a, Option<GuestMemoryMmap<()>>>;
/// As [`Target`], locked to replace it.
type TargetMut<'a> = RwLockWriteGuard<'a, Option<GuestMemoryMmap<()>>>;

impl DmaWindow {
    /// A window over all of `mem` (the domain's memory), with bus mastering enabled.
    pub fn new(mem: GuestMemoryMmap<()>) -> Self {
        DmaWindow {
            inner: Arc::new(Inner {
                mem: RwLock::new(Some(mem)),
                bus_master: AtomicBool::new(true),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// A window that targets no memory yet (a device created before the domain it will
    /// serve): every access is refused until [`DmaWindow::retarget`].
    pub fn detached() -> Self {
        DmaWindow {
            inner: Arc::new(Inner {
                mem: RwLock::new(None),
                bus_master: AtomicBool::new(true),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// Points the window (every clone) at `mem`, a new domain's memory, replacing whatever it
    /// targeted. Waits for accesses in progress; later ones reach `mem` only. Bus mastering
    /// and the refusal counter are left as they are.
    pub fn retarget(&self, mem: GuestMemoryMmap<()>) {
        // The old memory (maybe the last reference to it) is dropped after the lock.
        let old = self.write_target().replace(mem);
        drop(old);
    }

    /// Detaches the window (every clone) from the domain's memory: waits for accesses in
    /// progress, then refuses (and counts) every access as [`DmaError::Detached`] until
    /// [`DmaWindow::retarget`]. Drops the window's reference to the memory, so the domain's
    /// memory can be freed; once this returns, no DMA into it can happen.
    pub fn detach(&self) {
        // As in `retarget`, dropped after the lock.
        let old = self.write_target().take();
        drop(old);
    }

    /// Whether the window targets a domain's memory.
    pub fn attached(&self) -> bool {
        self.target().is_some()
    }

    /// Allows (`true`) or refuses (`false`) every DMA from now on.
    pub fn set_bus_master(&self, enabled: bool) {
        self.inner.bus_master.store(enabled, Ordering::SeqCst);
    }

    /// Whether DMA is currently allowed at all.
    pub fn bus_master(&self) -> bool {
        self.inner.bus_master.load(Ordering::SeqCst)
    }

    /// How many accesses were refused since the window was created (across retargets).
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Whether `[addr, addr + len)` lies entirely inside the domain's memory (regardless of
    /// bus mastering; nothing is counted; false while detached). For validating
    /// configuration, not for DMA.
    pub fn contains(&self, addr: u64, len: usize) -> bool {
        self.target()
            .as_ref()
            .is_some_and(|mem| inside(mem, addr, len))
    }

    /// Checks that `[addr, addr + len)` may be accessed now; counts a refusal.
    pub fn check(&self, addr: u64, len: usize) -> Result<(), DmaError> {
        self.access(addr, len, |_| Ok::<(), ()>(()))
    }

    /// Copies `data.len()` bytes at device address `addr` into `data`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), DmaError> {
        self.access(addr, data.len(), |mem| {
            mem.read_slice(data, GuestAddress(addr))
        })
    }

    /// Copies `data` to device address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.access(addr, data.len(), |mem| {
            mem.write_slice(data, GuestAddress(addr))
        })
    }

    /// Runs `f` on the memory of `segs` (device address, length), in order, as vm-memory
    /// slices: for I/O straight between a file and domain memory, as a device's DMA does.
    /// Every segment is checked first, and the read lock is held until `f` returns, so the
    /// window cannot be detached or retargeted under it.
    pub fn with_slices<R>(
        &self,
        segs: &[(u64, usize)],
        f: impl FnOnce(&[VolatileSlice<'_>]) -> R,
    ) -> Result<R, DmaError> {
        let target = self.target();
        let mut slices = Vec::with_capacity(segs.len());
        for &(addr, len) in segs {
            let mem = self.allowed(target.as_ref(), addr, len)?;
            let slice = mem.get_slice(GuestAddress(addr), len).map_err(|_| {
                self.refuse(DmaError::OutOfWindow {
                    addr,
                    len: len as u64,
                })
            })?;
            slices.push(slice);
        }
        Ok(f(&slices))
    }

    /// Reads an aligned little-endian `u32` atomically with `order` (shadow doorbells).
    pub fn load_u32(&self, addr: u64, order: Ordering) -> Result<u32, DmaError> {
        self.access(addr, 4, |mem| {
            mem.load::<u32>(GuestAddress(addr), order).map(u32::from_le)
        })
    }

    /// Writes an aligned little-endian `u32` atomically with `order` (completion status words,
    /// event indexes), so the driver never sees it half written.
    pub fn store_u32(&self, addr: u64, value: u32, order: Ordering) -> Result<(), DmaError> {
        self.access(addr, 4, |mem| {
            mem.store(value.to_le(), GuestAddress(addr), order)
        })
    }

    /// Runs `f` on the target memory if `[addr, addr + len)` may be accessed now, holding the
    /// read lock throughout (so [`DmaWindow::detach`] waits for it); every refusal, and a
    /// failure of `f`, is counted.
    fn access<R, E>(
        &self,
        addr: u64,
        len: usize,
        f: impl FnOnce(&GuestMemoryMmap<()>) -> Result<R, E>,
    ) -> Result<R, DmaError> {
        let target = self.target();
        let mem = self.allowed(target.as_ref(), addr, len)?;
        let len64 = len as u64;
        f(mem).map_err(|_| self.refuse(DmaError::OutOfWindow { addr, len: len64 }))
    }

    /// `mem` (the read-locked target; `None` while detached) if `[addr, addr + len)` may be
    /// accessed now: attached, bus mastering on, entirely inside. A refusal is counted.
    fn allowed<'m>(
        &self,
        mem: Option<&'m GuestMemoryMmap<()>>,
        addr: u64,
        len: usize,
    ) -> Result<&'m GuestMemoryMmap<()>, DmaError> {
        let len64 = len as u64;
        let Some(mem) = mem else {
            return Err(self.refuse(DmaError::Detached { addr, len: len64 }));
        };
        if !self.bus_master() {
            return Err(self.refuse(DmaError::BusMasterDisabled { addr, len: len64 }));
        }
        if !inside(mem, addr, len) {
            return Err(self.refuse(DmaError::OutOfWindow { addr, len: len64 }));
        }
        Ok(mem)
    }

    /// Read-locks the target (a poisoned lock is still usable: the target is only ever
    /// replaced whole).
    fn target(&self) -> Target<'_> {
        self.inner.mem.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_target(&self) -> TargetMut<'_> {
        self.inner.mem.write().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(&self, e: DmaError) -> DmaError {
        self.inner.refused.fetch_add(1, Ordering::Relaxed);
        e
    }
}

/// Whether `[addr, addr + len)` lies inside `mem`.
fn inside(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> bool {
    addr.checked_add(len as u64).is_some() && (len == 0 || mem.check_range(GuestAddress(addr), len))
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
    fn slices_are_given_only_when_every_segment_may_be_accessed() {
        let (mem, dma) = window(0x10000);
        mem.write_slice(&[9, 8, 7], GuestAddress(0x3000)).unwrap();
        let lens = dma
            .with_slices(&[(0x3000, 3), (0x100, 16)], |s| {
                s.iter().map(|s| s.len()).collect::<Vec<_>>()
            })
            .unwrap();
        assert_eq!(lens, [3, 16]);
        // One segment leaving the window refuses the whole access: `f` never runs.
        let mut ran = false;
        assert_eq!(
            dma.with_slices(&[(0x3000, 3), (0xfff0, 0x20)], |_| ran = true),
            Err(DmaError::OutOfWindow {
                addr: 0xfff0,
                len: 0x20
            })
        );
        dma.set_bus_master(false);
        assert_eq!(
            dma.with_slices(&[(0x3000, 3)], |_| ran = true),
            Err(DmaError::BusMasterDisabled {
                addr: 0x3000,
                len: 3
            })
        );
        dma.set_bus_master(true);
        dma.detach();
        assert_eq!(
            dma.with_slices(&[(0x3000, 3)], |_| ran = true),
            Err(DmaError::Detached {
                addr: 0x3000,
                len: 3
            })
        );
        assert!(!ran);
        assert_eq!(dma.refused(), 3);
    }

    #[test]
    fn a_window_created_detached_refuses_until_retargeted() {
        let dma = DmaWindow::detached();
        assert!(!dma.attached());
        assert_eq!(
            dma.write(0, &[1]),
            Err(DmaError::Detached { addr: 0, len: 1 })
        );
        assert_eq!(dma.refused(), 1);
        let (mem, _) = window(0x1000);
        dma.retarget(mem.clone());
        dma.write(0, &[7]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 7);
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
    fn after_retarget_every_clone_reaches_the_new_memory_only() {
        let (old, dma) = window(0x10000);
        let device = dma.clone();
        assert_eq!(
            device.read(0x20000, &mut [0u8; 4]),
            Err(DmaError::OutOfWindow {
                addr: 0x20000,
                len: 4
            })
        );
        let new = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        dma.retarget(new.clone());
        device.write(0x1000, &[5, 6, 7, 8]).unwrap();
        device.write(0x20000, &[9]).unwrap();
        let mut b = [0u8; 4];
        new.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [5, 6, 7, 8]);
        old.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [0; 4], "the old memory is not written");
        assert!(device.contains(0x3f000, 0x1000) && !device.contains(0x3f000, 0x1001));
        assert_eq!(dma.refused(), 1, "the counter carries over");
    }

    #[test]
    fn a_detached_window_refuses_everything_and_leaves_the_memory_alone() {
        let (mem, dma) = window(0x10000);
        let device = dma.clone();
        dma.detach();
        assert!(!device.attached());
        let mut b = [0u8; 4];
        assert_eq!(
            device.read(0x1000, &mut b),
            Err(DmaError::Detached {
                addr: 0x1000,
                len: 4
            })
        );
        assert!(device.write(0x1000, &[1; 4]).is_err());
        assert!(device.load_u32(0x1000, Ordering::Acquire).is_err());
        assert!(device.store_u32(0x1000, 1, Ordering::Release).is_err());
        assert!(device.check(0, 0).is_err());
        assert!(!device.contains(0x1000, 4));
        assert_eq!(device.refused(), 5);
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [0; 4]);
        dma.retarget(mem.clone());
        device.write(0x1000, &[1; 4]).unwrap();
    }

    #[test]
    fn no_access_reaches_the_old_memory_once_detach_returns() {
        let (mem, dma) = window(0x10000);
        let device = dma.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut refused = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match device.write(0x2000, &n.to_le_bytes()) {
                        Ok(()) => {}
                        Err(DmaError::Detached { .. }) => refused += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                refused
            })
        };
        while mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap() < 1000 {
            std::thread::yield_now();
        }
        dma.detach();
        let last = mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let refused = writer.join().unwrap();
        assert!(refused > 0, "the writer kept going after the detach");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), last);
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
