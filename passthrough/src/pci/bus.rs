//! PCI bus 0 behind configuration mechanism #1 (ports 0xCF8 address, 0xCFC..0xCFF data).

use std::sync::{Arc, Mutex, MutexGuard};

use super::{PciDevice, PciError};

/// Devices per bus.
const DEVICES: usize = 32;
/// CONFIG_ADDRESS: enable bit.
const ENABLE: u32 = 1 << 31;
/// CONFIG_ADDRESS bits that are stored: enable, bus, device, function, register (dword).
const ADDRESS_MASK: u32 = ENABLE | 0x00ff_fffc;

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
        match self.target(offset_in_window, data.len()) {
            Some((d, register)) => lock(d).config_read(register, data),
            None => data.fill(0xff),
        }
    }

    /// A write of CONFIG_DATA at `0xCFC + offset_in_window`; dropped for absent functions.
    pub fn write_data(&self, offset_in_window: u8, data: &[u8]) {
        if let Some((d, register)) = self.target(offset_in_window, data.len()) {
            lock(d).config_write(register, data);
        }
    }
}

/// Locks a device even if a previous holder panicked, so teardown and reset still work.
fn lock(d: &Mutex<PciDevice>) -> MutexGuard<'_, PciDevice> {
    d.lock().unwrap_or_else(|p| p.into_inner())
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
