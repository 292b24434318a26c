//! Devices of the ddvm machine and the buses that dispatch port and MMIO exits to them, and
//! the kinds of device a driver domain can be handed ([`DeviceSpec`]), each kind's specifics
//! in a module of its own ([`nvme`], [`e1000`]).

pub mod bus;
pub mod e1000;
pub mod nvme;
pub mod pci;
pub mod serial;
pub mod vfio;

use std::sync::Arc;

use ddvm_passthrough::NvmeConfig;

pub use bus::{Bus, BusDevice};

use ddvm_abi::channel::class;

use crate::domain::{DeviceThread, DomainDevice, DomainError};

/// A device handed to a driver domain.
#[derive(Clone, Debug)]
pub enum DeviceSpec {
    /// A fresh emulated NVMe controller (stands in for hardware; VFIO comes later), created
    /// with the domain and gone with it.
    EmulatedNvme(NvmeConfig),
    /// A fresh emulated e1000 NIC on its wire (taken from the spec at the first boot: a wire
    /// is one cable), created with the domain and gone with it. A NIC meant to outlive its
    /// domains is built with [`DomainDevice::emulated_e1000`] and handed over as
    /// [`DeviceSpec::Persistent`].
    EmulatedE1000(e1000::E1000Spec),
    /// A real PCI function through VFIO, opened with the domain.
    Vfio(vfio::VfioSpec),
    /// A device that outlives its domains (recovery hands it from a dead domain to a fresh
    /// one, as a VFIO device would be).
    Persistent(Arc<DomainDevice>),
}

impl DeviceSpec {
    /// The device of a domain named `name`: a fresh one of its kind, whose work that does not
    /// trap `thread` serves, or the one that outlives its domains.
    pub fn device(
        &self,
        name: &str,
        thread: DeviceThread,
    ) -> Result<Arc<DomainDevice>, DomainError> {
        match self {
            DeviceSpec::EmulatedNvme(cfg) => DomainDevice::emulated_nvme(name, cfg, thread),
            DeviceSpec::EmulatedE1000(spec) => {
                DomainDevice::emulated_e1000_on(name, spec.take(name)?, thread)
            }
            DeviceSpec::Vfio(spec) => DomainDevice::vfio(name, spec),
            DeviceSpec::Persistent(d) => Ok(d.clone()),
        }
    }

    /// The channel class a domain serves this device as (`ddvm_abi::channel::class`). A VFIO
    /// device's class is known once it is open (its model's): here it is taken as block; a
    /// VFIO NIC reaches its domains opened, as [`DeviceSpec::Persistent`].
    pub fn class(&self) -> u32 {
        match self {
            DeviceSpec::EmulatedNvme(_) | DeviceSpec::Vfio(_) => class::BLK,
            DeviceSpec::EmulatedE1000(_) => class::NET,
            DeviceSpec::Persistent(d) => d.model().class(),
        }
    }
}
