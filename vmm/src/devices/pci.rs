//! PCI devices of a driver domain on the machine's buses: configuration mechanism #1 on ports
//! 0xCF8..0xCFF and the ECAM window of bus 0 on the MMIO bus (both reach the same
//! configuration spaces), and each device's BARs on the MMIO bus.

use crate::sync::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ddvm_passthrough::{PciBus, PciDevice};

use super::BusDevice;

/// Ports 0xCF8..0xCFF: the address register and the data window.
pub struct PciConfigPorts(pub Arc<Mutex<PciBus>>);

impl BusDevice for PciConfigPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bus = lock(&self.0);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&bus.read_address().to_le_bytes()),
            4..=7 => bus.read_data((offset - 4) as u8, data),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bus = lock(&self.0);
        match offset {
            0 if data.len() == 4 => {
                bus.write_address(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
            }
            4..=7 => bus.write_data((offset - 4) as u8, data),
            _ => {}
        }
    }
}

/// The ECAM window of bus 0 on the MMIO bus: one exit per configuration access where the
/// ports take two.
pub struct PciEcam(pub Arc<Mutex<PciBus>>);

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).ecam_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).ecam_write(offset, data);
    }
}

/// One BAR of a device on the MMIO bus.
pub struct BarWindow {
    /// Guest-physical base of the BAR.
    pub base: u64,
    /// The device.
    pub device: Arc<Mutex<PciDevice>>,
    /// Whether the device is this guest's yet: a warm standby's BAR windows read as all ones
    /// and drop writes until it is handed the device.
    pub present: Arc<AtomicBool>,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if self.present.load(Ordering::Acquire) {
            lock(&self.device).mmio_read(self.base + offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.present.load(Ordering::Acquire) {
            lock(&self.device).mmio_write(self.base + offset, data);
        }
    }
}
