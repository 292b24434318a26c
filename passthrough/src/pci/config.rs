//! A type-0 configuration space with BAR sizing, a PCI Express capability advertising FLR, and
//! an MSI-X capability for a function that has MSI-X.
//!
//! Writable bits are described by a per-byte write mask (as QEMU does), so a write can never
//! set a read-only bit. BAR registers are computed: they return the address the VMM assigned,
//! or the size mask right after the domain wrote all ones (the sizing protocol). Any other BAR
//! write (the domain trying to move a BAR) is ignored and counted.

use super::{BarInfo, BarKind, MsixLayout, PciError, PciIds, MIN_BAR_SIZE, NUM_BARS};

/// Bytes of configuration space reachable through configuration mechanism #1.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Offset of the PCI Express capability.
pub const PCIE_CAP_OFFSET: usize = 0x40;

/// Command register offset.
pub(super) const COMMAND: usize = 0x04;
/// Command: Memory Space Enable.
pub(super) const CMD_MEMORY: u16 = 1 << 1;
/// Command: Bus Master Enable.
pub(super) const CMD_BUS_MASTER: u16 = 1 << 2;
/// Writable command bits: memory, bus master, parity error response, SERR#, interrupt disable.
const CMD_WRITABLE: u16 = CMD_MEMORY | CMD_BUS_MASTER | (1 << 6) | (1 << 8) | (1 << 10);
const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;
const REVISION: usize = 0x08;
const CACHE_LINE: usize = 0x0c;
const HEADER_TYPE: usize = 0x0e;
const BAR0: usize = 0x10;
const BAR_END: usize = BAR0 + 4 * NUM_BARS as usize;
const SUBSYSTEM_VENDOR: usize = 0x2c;
const CAP_PTR: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
/// Command: Interrupt Disable (INTx).
pub(super) const CMD_INTX_DISABLE: u16 = 1 << 10;

const PCIE_CAP_ID: u8 = 0x10;
/// PCI Express capability register: version 2, Root Complex Integrated Endpoint (we sit on
/// bus 0 with no root port).
const PCIE_CAPS: u16 = 0x2 | (0x9 << 4);
const PCIE_DEVCAP: usize = PCIE_CAP_OFFSET + 0x04;
const DEVCAP_FLR: u32 = 1 << 28;
/// Device Control register offset.
const PCIE_DEVCTL: usize = PCIE_CAP_OFFSET + 0x08;
/// Device Control: Initiate Function Level Reset (write-only, reads 0).
pub(super) const DEVCTL_INITIATE_FLR: u16 = 1 << 15;
/// Device Control power-on value: relaxed ordering and no-snoop enabled, 128-byte payload,
/// 512-byte read requests.
const DEVCTL_DEFAULT: u16 = (1 << 4) | (1 << 11) | (0b010 << 12);
/// Length of a version 2 PCI Express capability.
const PCIE_CAP_LEN: usize = 0x3c;

/// Offset of the MSI-X capability (after the PCI Express capability), when there is one.
pub const MSIX_CAP_OFFSET: usize = 0x80;
const MSIX_CAP_ID: u8 = 0x11;
/// Message Control register offset.
const MSIX_CONTROL: usize = MSIX_CAP_OFFSET + 2;
/// Message Control: MSI-X Enable.
pub(super) const MSIX_ENABLE: u16 = 1 << 15;
/// Message Control: Function Mask.
pub(super) const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Length of the MSI-X capability.
const MSIX_CAP_LEN: usize = 12;

/// One BAR register (a 64-bit BAR uses two).
#[derive(Clone, Copy, Debug, Default)]
enum BarSlot {
    /// Not implemented: reads 0, writes ignored.
    #[default]
    Unused,
    /// Low (or only) dword of a BAR.
    Low {
        info: BarInfo,
        addr: u64,
        sizing: bool,
    },
    /// High dword of the 64-bit BAR whose low dword is the previous slot.
    High { size: u64, addr: u64, sizing: bool },
}

/// What a configuration write changed, for the device to act on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct WriteEffects {
    /// Command register before the write.
    pub old_command: u16,
    /// Command register after the write.
    pub new_command: u16,
    /// Initiate Function Level Reset was written.
    pub flr: bool,
    /// MSI-X Message Control before the write (0 without MSI-X).
    pub old_msix_control: u16,
    /// MSI-X Message Control after the write.
    pub new_msix_control: u16,
}

/// A 256-byte type-0 configuration space.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    defaults: [u8; CONFIG_SPACE_SIZE],
    bars: [BarSlot; NUM_BARS as usize],
    msix: bool,
    ignored_writes: u64,
}

impl ConfigSpace {
    /// Builds the header for `ids` with the BARs in `bars` placed at the given addresses, and
    /// an MSI-X capability when `msix` is given.
    ///
    /// Each BAR must be a power of two of at least 4 KiB, naturally aligned, below 4 GiB when
    /// 32-bit, and not overlap another BAR register or BAR range. The MSI-X table and PBA must
    /// be 8-byte aligned inside BARs of `bars` and not overlap each other.
    pub fn new(
        ids: &PciIds,
        bars: &[(BarInfo, u64)],
        msix: Option<MsixLayout>,
    ) -> Result<ConfigSpace, PciError> {
        let mut slots = [BarSlot::Unused; NUM_BARS as usize];
        for &(info, addr) in bars {
            let bad = PciError::BadBar {
                index: info.index,
                size: info.size,
                kind: info.kind,
            };
            let regs = if info.kind == BarKind::Mmio64 { 2 } else { 1 };
            let i = info.index as usize;
            if !info.size.is_power_of_two()
                || info.size < MIN_BAR_SIZE
                || (info.kind == BarKind::Mmio32 && info.size > 1 << 31)
                || i + regs > NUM_BARS as usize
                || slots[i..i + regs]
                    .iter()
                    .any(|s| !matches!(s, BarSlot::Unused))
            {
                return Err(bad);
            }
            let end = addr.checked_add(info.size);
            if addr % info.size != 0
                || end.is_none()
                || (info.kind == BarKind::Mmio32 && end.is_some_and(|e| e > 1 << 32))
            {
                return Err(PciError::BadBarAddress {
                    index: info.index,
                    addr,
                    size: info.size,
                });
            }
            slots[i] = BarSlot::Low {
                info,
                addr,
                sizing: false,
            };
            if regs == 2 {
                slots[i + 1] = BarSlot::High {
                    size: info.size,
                    addr,
                    sizing: false,
                };
            }
        }
        // Ranges were checked not to wrap above.
        for (n, &(a, a_addr)) in bars.iter().enumerate() {
            if bars[..n]
                .iter()
                .any(|&(b, b_addr)| a_addr < b_addr + b.size && b_addr < a_addr + a.size)
            {
                return Err(PciError::BarOverlap {
                    index: a.index,
                    addr: a_addr,
                });
            }
        }

        if let Some(layout) = msix {
            check_msix(&layout, bars)?;
        }

        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            defaults: [0; CONFIG_SPACE_SIZE],
            bars: slots,
            msix: msix.is_some(),
            ignored_writes: 0,
        };
        c.put16(0x00, ids.vendor);
        c.put16(0x02, ids.device);
        c.put16(STATUS, STATUS_CAP_LIST);
        c.bytes[REVISION] = ids.revision;
        c.bytes[REVISION + 1..REVISION + 4].copy_from_slice(&ids.class_code.to_le_bytes()[..3]);
        c.bytes[HEADER_TYPE] = 0;
        c.put16(SUBSYSTEM_VENDOR, ids.subsystem_vendor);
        c.put16(SUBSYSTEM_VENDOR + 2, ids.subsystem);
        c.bytes[CAP_PTR] = PCIE_CAP_OFFSET as u8;
        // Interrupt pin 0 (no INTx) unless the device routes INTx ([`Self::set_interrupt_pin`]).
        c.bytes[PCIE_CAP_OFFSET] = PCIE_CAP_ID;
        c.bytes[PCIE_CAP_OFFSET + 1] = 0;
        c.put16(PCIE_CAP_OFFSET + 2, PCIE_CAPS);
        c.bytes[PCIE_DEVCAP..PCIE_DEVCAP + 4].copy_from_slice(&DEVCAP_FLR.to_le_bytes());
        c.put16(PCIE_DEVCTL, DEVCTL_DEFAULT);

        c.wmask[COMMAND..COMMAND + 2].copy_from_slice(&CMD_WRITABLE.to_le_bytes());
        c.wmask[CACHE_LINE] = 0xff;
        c.wmask[INTERRUPT_LINE] = 0xff;
        c.wmask[PCIE_DEVCTL..PCIE_DEVCTL + 2].copy_from_slice(&0x7fffu16.to_le_bytes());
        if let Some(m) = msix {
            c.bytes[PCIE_CAP_OFFSET + 1] = MSIX_CAP_OFFSET as u8;
            c.bytes[MSIX_CAP_OFFSET] = MSIX_CAP_ID;
            c.bytes[MSIX_CAP_OFFSET + 1] = 0;
            // Table Size is 0's based; Enable and Function Mask start clear.
            c.put16(MSIX_CONTROL, m.vectors - 1);
            let table = m.table_offset as u32 | u32::from(m.table_bar);
            let pba = m.pba_offset as u32 | u32::from(m.pba_bar);
            c.bytes[MSIX_CAP_OFFSET + 4..MSIX_CAP_OFFSET + 8].copy_from_slice(&table.to_le_bytes());
            c.bytes[MSIX_CAP_OFFSET + 8..MSIX_CAP_OFFSET + 12].copy_from_slice(&pba.to_le_bytes());
            c.wmask[MSIX_CONTROL + 1] = ((MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8) as u8;
        }
        const { assert!(PCIE_CAP_OFFSET + PCIE_CAP_LEN <= MSIX_CAP_OFFSET) };
        const { assert!(MSIX_CAP_OFFSET + MSIX_CAP_LEN <= CONFIG_SPACE_SIZE) };
        c.defaults = c.bytes;
        Ok(c)
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn get16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// Gives the function an INTx line (`pin` 1 = INTA#) from power-on: its interrupt wakes
    /// the domain as an MSI-X message would, while the Command register's Interrupt Disable
    /// is clear.
    pub(super) fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
        self.defaults[INTERRUPT_PIN] = pin;
    }

    /// The Interrupt Pin register: 0 when the function has no INTx line.
    pub fn interrupt_pin(&self) -> u8 {
        self.bytes[INTERRUPT_PIN]
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    /// Memory Space Enable: MMIO to the BARs reaches the device.
    pub fn memory_enabled(&self) -> bool {
        self.command() & CMD_MEMORY != 0
    }

    /// MSI-X Message Control (0 without MSI-X).
    pub fn msix_control(&self) -> u16 {
        if self.msix {
            self.get16(MSIX_CONTROL)
        } else {
            0
        }
    }

    /// Bus Master Enable: the device may DMA.
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & CMD_BUS_MASTER != 0
    }

    /// The BARs with their assigned addresses.
    pub fn bars(&self) -> Vec<(BarInfo, u64)> {
        self.bars
            .iter()
            .filter_map(|s| match *s {
                BarSlot::Low { info, addr, .. } => Some((info, addr)),
                _ => None,
            })
            .collect()
    }

    /// Writes that were ignored: attempts to move a BAR, partial BAR writes, out-of-range or
    /// oversized accesses.
    pub fn ignored_writes(&self) -> u64 {
        self.ignored_writes
    }

    /// Back to power-on values (Function Level Reset): command register cleared (MMIO and DMA
    /// off), Device Control and the other writable registers at their defaults, BAR sizing
    /// state cleared. BAR addresses stay: the VMM fixed them.
    pub fn reset(&mut self) {
        self.bytes = self.defaults;
        for s in &mut self.bars {
            match s {
                BarSlot::Low { sizing, .. } | BarSlot::High { sizing, .. } => *sizing = false,
                BarSlot::Unused => {}
            }
        }
    }

    fn bar_dword(&self, slot: usize) -> u32 {
        match self.bars[slot] {
            BarSlot::Unused => 0,
            BarSlot::Low { info, addr, sizing } => {
                let mut flags = 0u32;
                if info.kind == BarKind::Mmio64 {
                    flags |= 0b10 << 1;
                }
                if info.prefetchable {
                    flags |= 1 << 3;
                }
                let base = if sizing { !(info.size - 1) } else { addr };
                (base as u32 & !0xf) | flags
            }
            BarSlot::High { size, addr, sizing } => {
                let base = if sizing { !(size - 1) } else { addr };
                (base >> 32) as u32
            }
        }
    }

    fn bar_write(&mut self, slot: usize, v: u32) {
        match &mut self.bars[slot] {
            BarSlot::Unused => {}
            BarSlot::Low { addr, sizing, .. } => {
                if v == u32::MAX {
                    *sizing = true;
                } else if v & !0xf == *addr as u32 & !0xf {
                    *sizing = false;
                } else {
                    self.ignored_writes += 1;
                }
            }
            BarSlot::High { addr, sizing, .. } => {
                if v == u32::MAX {
                    *sizing = true;
                } else if v == (*addr >> 32) as u32 {
                    *sizing = false;
                } else {
                    self.ignored_writes += 1;
                }
            }
        }
    }

    /// Reads `data.len()` bytes at `offset`; bytes beyond the space read as all ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = if at >= CONFIG_SPACE_SIZE {
                0xff
            } else if (BAR0..BAR_END).contains(&at) {
                let slot = (at - BAR0) / 4;
                self.bar_dword(slot).to_le_bytes()[(at - BAR0) % 4]
            } else if (PCIE_DEVCTL..PCIE_DEVCTL + 2).contains(&at) {
                // Initiate FLR always reads 0.
                let v = self.get16(PCIE_DEVCTL) & !DEVCTL_INITIATE_FLR;
                v.to_le_bytes()[at - PCIE_DEVCTL]
            } else {
                self.bytes[at]
            };
        }
    }

    /// Writes `data` (1 to 4 bytes) at `offset`, honouring the write mask; returns what
    /// changed for the device to act on.
    pub(super) fn write(&mut self, offset: u16, data: &[u8]) -> WriteEffects {
        let old_command = self.command();
        let old_msix_control = self.msix_control();
        let mut fx = WriteEffects {
            old_command,
            new_command: old_command,
            flr: false,
            old_msix_control,
            new_msix_control: old_msix_control,
        };
        let start = offset as usize;
        let end = start + data.len();
        if data.is_empty() || data.len() > 4 || end > CONFIG_SPACE_SIZE {
            self.ignored_writes += 1;
            return fx;
        }
        if start < BAR_END && BAR0 < end {
            if start.is_multiple_of(4) && data.len() == 4 {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.bar_write((start - BAR0) / 4, v);
            } else {
                self.ignored_writes += 1;
            }
            return fx;
        }
        for (i, &d) in data.iter().enumerate() {
            let at = start + i;
            let m = self.wmask[at];
            self.bytes[at] = (self.bytes[at] & !m) | (d & m);
            if at == PCIE_DEVCTL + 1 && d & (DEVCTL_INITIATE_FLR >> 8) as u8 != 0 {
                fx.flr = true;
            }
        }
        fx.new_command = self.command();
        fx.new_msix_control = self.msix_control();
        fx
    }
}

/// Checks an MSI-X layout against the function's BARs.
fn check_msix(m: &MsixLayout, bars: &[(BarInfo, u64)]) -> Result<(), PciError> {
    let bad = PciError::BadMsix { layout: *m };
    let inside = |bar: u8, offset: u64, len: u64| {
        offset.is_multiple_of(8)
            && bars.iter().any(|(info, _)| {
                info.index == bar && offset.checked_add(len).is_some_and(|e| e <= info.size)
            })
    };
    let (table, pba) = (m.table_size(), m.pba_size());
    let overlap = m.table_bar == m.pba_bar
        && m.table_offset < m.pba_offset.saturating_add(pba)
        && m.pba_offset < m.table_offset.saturating_add(table);
    // Offsets share their dword with the BIR (3 bits) in the capability.
    let fits = m.table_offset <= u64::from(u32::MAX) && m.pba_offset <= u64::from(u32::MAX);
    if m.vectors == 0
        || m.vectors > super::MSIX_MAX_VECTORS
        || !inside(m.table_bar, m.table_offset, table)
        || !inside(m.pba_bar, m.pba_offset, pba)
        || overlap
        || !fits
    {
        return Err(bad);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1b36,
            device: 0x00dd,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
            class_code: 0x010802,
            revision: 2,
        }
    }

    fn bar(index: u8, size: u64, kind: BarKind) -> BarInfo {
        BarInfo {
            index,
            size,
            kind,
            prefetchable: false,
        }
    }

    fn read32(c: &ConfigSpace, off: u16) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_fields() {
        let c = ConfigSpace::new(&ids(), &[], None).unwrap();
        assert_eq!(read32(&c, 0), 0x00dd_1b36);
        assert_eq!(read32(&c, 8), 0x0108_0202);
        assert_eq!(read32(&c, 0x2c), 0x1100_1af4);
        assert_eq!(read32(&c, 0x34) & 0xff, 0x40);
        assert_eq!(read32(&c, 0x40) & 0xff, 0x10);
        assert_ne!(read32(&c, 0x44) & DEVCAP_FLR, 0);
        let mut b = [0u8; 2];
        c.read(0xff, &mut b);
        assert_eq!(b, [0, 0xff]);
    }

    #[test]
    fn bar_sizing_protocol_for_64_and_32_bit_bars() {
        let mut c = ConfigSpace::new(
            &ids(),
            &[
                (bar(0, 0x4000, BarKind::Mmio64), 0x1_2340_0000),
                (bar(2, 0x1000, BarKind::Mmio32), 0xfebf_f000),
            ],
            None,
        )
        .unwrap();
        assert_eq!(read32(&c, 0x10), 0x2340_0004);
        assert_eq!(read32(&c, 0x14), 0x1);
        assert_eq!(read32(&c, 0x18), 0xfebf_f000);
        c.write(0x10, &u32::MAX.to_le_bytes());
        c.write(0x14, &u32::MAX.to_le_bytes());
        c.write(0x18, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, 0x10), 0xffff_c004);
        assert_eq!(read32(&c, 0x14), 0xffff_ffff);
        assert_eq!(read32(&c, 0x18), 0xffff_f000);
        // Unused BARs stay 0 through sizing.
        c.write(0x20, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, 0x20), 0);
        // Restoring the assigned value ends sizing.
        c.write(0x10, &0x2340_0004u32.to_le_bytes());
        c.write(0x14, &1u32.to_le_bytes());
        c.write(0x18, &0xfebf_f000u32.to_le_bytes());
        assert_eq!(read32(&c, 0x10), 0x2340_0004);
        assert_eq!(read32(&c, 0x18), 0xfebf_f000);
        assert_eq!(c.ignored_writes(), 0);
        // Moving a BAR is ignored and counted.
        c.write(0x10, &0x8000_0000u32.to_le_bytes());
        c.write(0x12, &[0, 0]);
        assert_eq!(read32(&c, 0x10), 0x2340_0004);
        assert_eq!(c.ignored_writes(), 2);
    }

    #[test]
    fn read_only_bits_stay_and_flr_is_reported() {
        let mut c = ConfigSpace::new(&ids(), &[], None).unwrap();
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(read32(&c, 0), 0x00dd_1b36);
        let fx = c.write(4, &[0xff, 0xff]);
        assert_eq!(fx.new_command, CMD_WRITABLE);
        assert!(c.memory_enabled() && c.bus_master_enabled());
        let fx = c.write(
            PCIE_DEVCTL as u16,
            &(DEVCTL_DEFAULT | DEVCTL_INITIATE_FLR).to_le_bytes(),
        );
        assert!(fx.flr);
        let mut b = [0u8; 2];
        c.read(PCIE_DEVCTL as u16, &mut b);
        assert_eq!(u16::from_le_bytes(b), DEVCTL_DEFAULT);
        c.reset();
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn bad_bar_layouts_are_refused() {
        let e = ConfigSpace::new(&ids(), &[(bar(5, 0x4000, BarKind::Mmio64), 0)], None);
        assert!(matches!(e, Err(PciError::BadBar { index: 5, .. })));
        let e = ConfigSpace::new(&ids(), &[(bar(0, 0x3000, BarKind::Mmio32), 0)], None);
        assert!(matches!(e, Err(PciError::BadBar { .. })));
        let e = ConfigSpace::new(&ids(), &[(bar(0, 0x4000, BarKind::Mmio32), 0x1000)], None);
        assert!(matches!(e, Err(PciError::BadBarAddress { .. })));
        let e = ConfigSpace::new(&ids(), &[(bar(0, 0x1000, BarKind::Mmio32), 1 << 32)], None);
        assert!(matches!(e, Err(PciError::BadBarAddress { .. })));
        let e = ConfigSpace::new(
            &ids(),
            &[
                (bar(0, 0x4000, BarKind::Mmio64), 0x10000),
                (bar(1, 0x1000, BarKind::Mmio32), 0x20000),
            ],
            None,
        );
        assert!(matches!(e, Err(PciError::BadBar { index: 1, .. })));
        let e = ConfigSpace::new(
            &ids(),
            &[
                (bar(0, 0x4000, BarKind::Mmio32), 0x10000),
                (bar(1, 0x1000, BarKind::Mmio32), 0x11000),
            ],
            None,
        );
        assert!(matches!(e, Err(PciError::BarOverlap { index: 1, .. })));
    }
    fn nvme_msix() -> MsixLayout {
        MsixLayout {
            vectors: 5,
            table_bar: 0,
            table_offset: 0x2000,
            pba_bar: 0,
            pba_offset: 0x3000,
        }
    }

    #[test]
    fn the_msix_capability_follows_pcie_and_only_enable_and_function_mask_are_writable() {
        let bars = [(bar(0, 0x4000, BarKind::Mmio64), 0xe000_0000)];
        let mut c = ConfigSpace::new(&ids(), &bars, Some(nvme_msix())).unwrap();
        assert_eq!((read32(&c, 0x40) >> 8) & 0xff, MSIX_CAP_OFFSET as u32);
        let cap = read32(&c, MSIX_CAP_OFFSET as u16);
        assert_eq!(cap & 0xff, 0x11);
        assert_eq!((cap >> 8) & 0xff, 0, "last capability");
        assert_eq!(cap >> 16, 4, "Table Size is 0's based");
        assert_eq!(read32(&c, MSIX_CAP_OFFSET as u16 + 4), 0x2000);
        assert_eq!(read32(&c, MSIX_CAP_OFFSET as u16 + 8), 0x3000);
        let fx = c.write(MSIX_CAP_OFFSET as u16 + 2, &0xffffu16.to_le_bytes());
        assert_eq!(fx.old_msix_control, 4);
        assert_eq!(fx.new_msix_control, 4 | MSIX_ENABLE | MSIX_FUNCTION_MASK);
        c.write(MSIX_CAP_OFFSET as u16 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, MSIX_CAP_OFFSET as u16 + 4), 0x2000, "read-only");
        c.reset();
        assert_eq!(c.msix_control(), 4, "reset clears Enable and Function Mask");
        // Without MSI-X the PCI Express capability is the last one.
        let c = ConfigSpace::new(&ids(), &bars, None).unwrap();
        assert_eq!((read32(&c, 0x40) >> 8) & 0xff, 0);
        assert_eq!(read32(&c, MSIX_CAP_OFFSET as u16), 0);
        assert_eq!(c.msix_control(), 0);
    }

    #[test]
    fn bad_msix_layouts_are_refused() {
        let bars = [(bar(0, 0x4000, BarKind::Mmio64), 0xe000_0000)];
        let bad = |m: MsixLayout| {
            assert!(
                matches!(
                    ConfigSpace::new(&ids(), &bars, Some(m)),
                    Err(PciError::BadMsix { .. })
                ),
                "{m:?}"
            )
        };
        let good = nvme_msix();
        bad(MsixLayout { vectors: 0, ..good });
        bad(MsixLayout {
            vectors: 2049,
            ..good
        });
        bad(MsixLayout {
            table_bar: 2,
            ..good
        });
        bad(MsixLayout { pba_bar: 1, ..good });
        bad(MsixLayout {
            table_offset: 0x2004,
            ..good
        });
        bad(MsixLayout {
            pba_offset: 0x3ffc,
            ..good
        });
        bad(MsixLayout {
            table_offset: 0x3ff0,
            ..good
        });
        bad(MsixLayout {
            pba_offset: 0x2040,
            ..good
        });
        bad(MsixLayout {
            vectors: 1024,
            ..good
        });
        assert!(ConfigSpace::new(&ids(), &bars, Some(good)).is_ok());
    }
}
