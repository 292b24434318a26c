//! PCI bus 0 behind configuration mechanism #1 (ports 0xCF8 address, 0xCFC..0xCFF data) and
//! behind a memory-mapped (ECAM) window.
//!
//! The two reach the same configuration spaces. Mechanism #1 costs two exits per access (the
//! address, then the data); ECAM costs one (the address is part of the access), so a domain
//! that is given an ECAM window uses it. The window covers bus 0 only: function `f` of device
//! `d` at `d << 15 | f << 12`, 4 KiB each, [`ECAM_BUS_SIZE`] in all.

use std::sync::{Arc, Mutex};

use super::{PciDevice, PciError};
use crate::sync::lock;

/// Devices per bus.
const DEVICES: usize = 32;
/// CONFIG_ADDRESS: enable bit.
const ENABLE: u32 = 1 << 31;
/// CONFIG_ADDRESS bits that are stored: enable, bus, device, function, register (dword).
const ADDRESS_MASK: u32 = ENABLE | 0x00ff_fffc;

/// Bytes of an ECAM window for one bus: 32 devices × 8 functions × 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 32 * 8 * 4096;

/// Bus 0 with up to 32 single-function devices.
pub struct PciBus {
    address: u32,
    slots: [Option<Arc<Mutex<PciDevice>>>; DEVICES],
}

impl Default for PciBus {
    fn default() -> Self {
        PciBus {
            address: 0,
            slots: std::array::from_fn(|_| None),
        }
    }
}

impl PciBus {
    /// An empty bus.
    pub fn new() -> Self {
        PciBus::default()
    }

    /// Puts `device` at device number `device_number` (function 0).
    pub fn insert(
        &mut self,
        device_number: u8,
        device: Arc<Mutex<PciDevice>>,
    ) -> Result<(), PciError> {
        let slot = self
            .slots
            .get_mut(device_number as usize)
            .ok_or(PciError::BadDeviceNumber {
                device: device_number,
            })?;
        if slot.is_some() {
            return Err(PciError::SlotInUse {
                device: device_number,
            });
        }
        *slot = Some(device);
        Ok(())
    }

    /// The device at `device_number`, if any.
    pub fn device(&self, device_number: u8) -> Option<&Arc<Mutex<PciDevice>>> {
        self.slots.get(device_number as usize)?.as_ref()
    }

    /// A 32-bit write to CONFIG_ADDRESS (port 0xCF8). Reserved bits are dropped.
    pub fn write_address(&mut self, value: u32) {
        self.address = value & ADDRESS_MASK;
    }

    /// A 32-bit read of CONFIG_ADDRESS (port 0xCF8).
    pub fn read_address(&self) -> u32 {
        self.address
    }

    /// The addressed device and register offset, if the address selects a present function.
    fn target(&self, offset_in_window: u8, len: usize) -> Option<(&Arc<Mutex<PciDevice>>, u16)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        let device = (a >> 11) & 0x1f;
        let function = (a >> 8) & 0x7;
        if a & ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        if len == 0 || offset_in_window as usize + len > 4 {
            return None;
        }
        let register = (a & 0xfc) as u16 + offset_in_window as u16;
        Some((self.device(device as u8)?, register))
    }

    /// A read of CONFIG_DATA at `0xCFC + offset_in_window`; absent functions read all ones.
    pub fn read_data(&self, offset_in_window: u8, data: &mut [u8]) {
        config_read(self.target(offset_in_window, data.len()), data);
    }

    /// A write of CONFIG_DATA at `0xCFC + offset_in_window`; dropped for absent functions.
    pub fn write_data(&self, offset_in_window: u8, data: &[u8]) {
        config_write(self.target(offset_in_window, data.len()), data);
    }

    /// The device and register an ECAM access at `offset` reaches, if it is 1 to 4 bytes
    /// inside one dword of a present function 0.
    fn ecam_target(&self, offset: u64, len: usize) -> Option<(&Arc<Mutex<PciDevice>>, u16)> {
        if offset >= ECAM_BUS_SIZE || len == 0 || (offset & 3) as usize + len > 4 {
            return None;
        }
        let device = (offset >> 15) as u8;
        let function = (offset >> 12) & 0x7;
        if function != 0 {
            return None;
        }
        Some((self.device(device)?, (offset & 0xfff) as u16))
    }

    /// A read at `offset` in the ECAM window of bus 0. Absent functions, and accesses wider
    /// than 4 bytes or crossing a dword, read all ones.
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        config_read(self.ecam_target(offset, data.len()), data);
    }

    /// A write at `offset` in the ECAM window of bus 0; dropped for absent functions and for
    /// accesses wider than 4 bytes or crossing a dword.
    pub fn ecam_write(&self, offset: u64, data: &[u8]) {
        config_write(self.ecam_target(offset, data.len()), data);
    }
}

/// A configuration read of `target` (device and register); nothing there reads all ones.
fn config_read(target: Option<(&Arc<Mutex<PciDevice>>, u16)>, data: &mut [u8]) {
    match target {
        Some((d, register)) => lock(d).config_read(register, data),
        None => data.fill(0xff),
    }
}

/// A configuration write to `target`; dropped when nothing is there.
fn config_write(target: Option<(&Arc<Mutex<PciDevice>>, u16)>, data: &[u8]) {
    if let Some((d, register)) = target {
        lock(d).config_write(register, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::device::tests::Probe;

    fn cfg_addr(device: u32, register: u32) -> u32 {
        ENABLE | (device << 11) | register
    }

    fn bus_with_probe() -> PciBus {
        let d = PciDevice::new(Box::new(Probe::default()), &[(0, 0xc000_0000)]).unwrap();
        let mut bus = PciBus::new();
        bus.insert(3, Arc::new(Mutex::new(d))).unwrap();
        bus
    }

    #[test]
    fn vendor_and_class_through_cf8_cfc() {
        let mut bus = bus_with_probe();
        bus.write_address(cfg_addr(3, 0));
        assert_eq!(bus.read_address(), cfg_addr(3, 0));
        let mut d = [0u8; 4];
        bus.read_data(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
        bus.write_address(cfg_addr(3, 8));
        let mut c = [0u8; 2];
        bus.read_data(2, &mut c);
        assert_eq!(u16::from_le_bytes(c), 0x0200);
    }

    #[test]
    fn absent_disabled_and_other_bus_read_all_ones() {
        let mut bus = bus_with_probe();
        let mut d = [0u8; 4];
        for a in [
            cfg_addr(4, 0),
            cfg_addr(3, 0) & !ENABLE,
            cfg_addr(3, 0) | (1 << 16),
            cfg_addr(3, 0) | (1 << 8),
        ] {
            bus.write_address(a);
            bus.read_data(0, &mut d);
            assert_eq!(d, [0xff; 4], "address {a:#x}");
            bus.write_data(0, &d);
        }
        bus.write_address(cfg_addr(3, 0));
        let mut e = [0u8; 2];
        bus.read_data(3, &mut e);
        assert_eq!(e, [0xff; 2]);
    }

    fn ecam(device: u64, function: u64, register: u64) -> u64 {
        device << 15 | function << 12 | register
    }

    fn ecam_read(bus: &PciBus, offset: u64, len: usize) -> u32 {
        let mut d = [0u8; 4];
        bus.ecam_read(offset, &mut d[..len]);
        u32::from_le_bytes(d)
    }

    #[test]
    fn ecam_reads_what_cf8_cfc_reads() {
        let mut bus = bus_with_probe();
        assert_eq!(ecam_read(&bus, ecam(3, 0, 0), 4), 0x5678_1234);
        assert_eq!(ecam_read(&bus, ecam(3, 0, 2), 2), 0x5678);
        assert_eq!(ecam_read(&bus, ecam(3, 0, 0xb), 1), 0x02);
        for register in (0..0x100).step_by(4) {
            bus.write_address(cfg_addr(3, register));
            let mut d = [0u8; 4];
            bus.read_data(0, &mut d);
            let through_ecam = ecam_read(&bus, ecam(3, 0, u64::from(register)), 4);
            assert_eq!(
                through_ecam,
                u32::from_le_bytes(d),
                "register {register:#x}"
            );
        }
        // Past the 256-byte space, inside the function's 4 KiB: all ones.
        assert_eq!(ecam_read(&bus, ecam(3, 0, 0x100), 4), u32::MAX);
        assert_eq!(ecam_read(&bus, ecam(3, 0, 0xffc), 4), u32::MAX);
    }

    #[test]
    fn ecam_absent_functions_and_bad_accesses_read_all_ones_and_drop_writes() {
        let bus = bus_with_probe();
        let command = ecam(3, 0, 4);
        for (offset, len) in [
            (ecam(4, 0, 0), 4), // absent device
            (ecam(3, 1, 0), 4), // function 1
            (ecam(3, 7, 4), 2), // function 7
            (ECAM_BUS_SIZE, 4), // past the window (bus 1)
            (u64::MAX - 1, 2),  // far past it
            (command + 2, 4),   // crosses a dword
            (command + 3, 2),   // crosses a dword
            (command, 8),       // wider than a dword
            (command, 0),       // empty
        ] {
            let mut d = [0u8; 8];
            bus.ecam_read(offset, &mut d[..len]);
            assert!(d[..len].iter().all(|&b| b == 0xff), "{offset:#x}+{len}");
            bus.ecam_write(offset, &[0x06; 8][..len]);
        }
        let dev = bus.device(3).unwrap().clone();
        assert_eq!(
            lock(&dev).config.command(),
            0,
            "a refused write changed COMMAND"
        );
    }

    #[test]
    fn bar_sizing_and_command_through_ecam() {
        let bus = bus_with_probe();
        let bar0 = ecam(3, 0, 0x10);
        bus.ecam_write(bar0, &u32::MAX.to_le_bytes());
        assert_eq!(ecam_read(&bus, bar0, 4), 0xffff_c004);
        bus.ecam_write(bar0, &0xc000_0004u32.to_le_bytes());
        assert_eq!(ecam_read(&bus, bar0, 4), 0xc000_0004);
        bus.ecam_write(ecam(3, 0, 4), &[0x06, 0]);
        let dev = bus.device(3).unwrap().clone();
        assert!(lock(&dev).config.memory_enabled());
        assert!(lock(&dev).config.bus_master_enabled());
        // Port I/O sees what ECAM wrote.
        let mut bus = bus;
        bus.write_address(cfg_addr(3, 4));
        let mut c = [0u8; 2];
        bus.read_data(0, &mut c);
        assert_eq!(u16::from_le_bytes(c), 0x0006);
    }

    #[test]
    fn bar_sizing_and_command_through_the_bus() {
        let mut bus = bus_with_probe();
        bus.write_address(cfg_addr(3, 0x10));
        bus.write_data(0, &u32::MAX.to_le_bytes());
        let mut d = [0u8; 4];
        bus.read_data(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_c004);
        bus.write_data(0, &0xc000_0004u32.to_le_bytes());
        bus.read_data(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xc000_0004);
        bus.write_address(cfg_addr(3, 4));
        bus.write_data(0, &[0x02, 0]);
        let dev = bus.device(3).unwrap().clone();
        assert!(lock(&dev).config.memory_enabled());
        assert_eq!(
            bus.insert(3, dev.clone()).err(),
            Some(PciError::SlotInUse { device: 3 })
        );
        assert_eq!(
            bus.insert(32, dev.clone()).err(),
            Some(PciError::BadDeviceNumber { device: 32 })
        );
    }
}
