//! A PCI function: configuration space plus the backend that implements it.

use vm_memory::GuestMemoryMmap;

use super::config::{WriteEffects, CMD_BUS_MASTER};
use super::{BarInfo, ConfigSpace, PciBackend, PciError, WakeDomain};

/// A PCI function handed to a driver domain.
pub struct PciDevice {
    /// Configuration space as the domain sees it.
    pub config: ConfigSpace,
    /// The device model (or VFIO device).
    pub backend: Box<dyn PciBackend>,
}

impl PciDevice {
    /// Places the backend's BARs at `bar_addresses` (BAR index, guest-physical address): every
    /// BAR of the backend needs exactly one entry. The function starts with MMIO and DMA off
    /// (command register 0), so the backend's bus mastering is switched off here.
    pub fn new(
        mut backend: Box<dyn PciBackend>,
        bar_addresses: &[(u8, u64)],
    ) -> Result<PciDevice, PciError> {
        let infos = backend.bars();
        for &(index, _) in bar_addresses {
            let known = infos.iter().any(|b| b.index == index);
            let once = bar_addresses.iter().filter(|(i, _)| *i == index).count() == 1;
            if !known || !once {
                return Err(PciError::UnknownBar { index });
            }
        }
        let mut placed: Vec<(BarInfo, u64)> = Vec::with_capacity(infos.len());
        for info in infos {
            let addr = bar_addresses
                .iter()
                .find(|(i, _)| *i == info.index)
                .map(|&(_, a)| a)
                .ok_or(PciError::MissingBarAddress { index: info.index })?;
            placed.push((info, addr));
        }
        let config = ConfigSpace::new(&backend.ids(), &placed)?;
        backend.set_bus_master(false);
        Ok(PciDevice { config, backend })
    }

    /// A configuration read of `data.len()` bytes at `offset`.
    pub fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    /// A configuration write; applies Bus Master Enable changes and Function Level Reset to
    /// the backend.
    pub fn config_write(&mut self, offset: u16, data: &[u8]) {
        let fx = self.config.write(offset, data);
        self.apply(fx);
    }

    fn apply(&mut self, fx: WriteEffects) {
        if fx.flr {
            self.function_reset();
            return;
        }
        let was = fx.old_command & CMD_BUS_MASTER != 0;
        let now = fx.new_command & CMD_BUS_MASTER != 0;
        if was != now {
            self.backend.set_bus_master(now);
        }
    }

    /// Function Level Reset, as the domain triggers it or the VMM does before handing the
    /// device to a fresh domain: bus mastering off first (no DMA can start), then the backend
    /// reset (which waits for DMA in progress), then configuration space back to power-on
    /// values (MMIO and DMA stay off until the new driver enables them).
    pub fn function_reset(&mut self) {
        self.backend.set_bus_master(false);
        self.backend.reset();
        self.config.reset();
    }

    /// Quiesces the device when the domain it served dies, before that domain's memory is
    /// freed or reused: [`PciDevice::function_reset`] (bus mastering off, backend reset, which
    /// waits for DMA in progress and drops what a reset drops, such as a volatile write
    /// cache; configuration space back to power-on values), then [`PciBackend::detach`]. Once
    /// this returns the device does no DMA into the old memory and never wakes the old domain.
    pub fn quiesce(&mut self) {
        self.function_reset();
        self.backend.detach();
    }

    /// Hands the quiesced device to a new domain: its DMA goes to `mem` (the new domain's
    /// memory) and its completions wake the domain through `wake`
    /// ([`PciBackend::attach`]). Call it before the new domain boots; its driver then enables
    /// memory space and bus mastering and initialises the device from scratch. BAR addresses
    /// are kept: the new domain finds the device where the old one did.
    pub fn attach(&mut self, mem: GuestMemoryMmap<()>, wake: WakeDomain) {
        self.backend.attach(mem, wake);
    }

    /// The BAR containing `[gpa, gpa + len)`, with the offset inside it, if memory space is on.
    fn route(&self, gpa: u64, len: usize) -> Option<(u8, u64)> {
        if !self.config.memory_enabled() || len == 0 {
            return None;
        }
        self.config.bars().into_iter().find_map(|(info, base)| {
            let offset = gpa.checked_sub(base)?;
            let end = offset.checked_add(len as u64)?;
            (end <= info.size).then_some((info.index, offset))
        })
    }

    /// An MMIO read; returns false (data set to all ones) when no BAR claims it or memory
    /// space is disabled.
    pub fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        match self.route(gpa, data.len()) {
            Some((bar, offset)) => {
                self.backend.bar_read(bar, offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// An MMIO write; returns false (dropped) when no BAR claims it or memory space is
    /// disabled.
    pub fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        match self.route(gpa, data.len()) {
            Some((bar, offset)) => {
                self.backend.bar_write(bar, offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::GuestMemoryBackend;

    use super::*;
    use crate::pci::{BarKind, PciIds};

    /// A backend that records what it is asked to do.
    #[derive(Default)]
    pub(crate) struct Probe {
        pub log: Arc<Mutex<Vec<String>>>,
    }

    impl PciBackend for Probe {
        fn ids(&self) -> PciIds {
            PciIds {
                vendor: 0x1234,
                device: 0x5678,
                subsystem_vendor: 0,
                subsystem: 0,
                class_code: 0x020000,
                revision: 1,
            }
        }
        fn bars(&self) -> Vec<BarInfo> {
            vec![BarInfo {
                index: 0,
                size: 0x4000,
                kind: BarKind::Mmio64,
                prefetchable: false,
            }]
        }
        fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.log
                .lock()
                .unwrap()
                .push(format!("read {bar} {offset:#x}"));
        }
        fn bar_write(&mut self, bar: u8, offset: u64, _data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push(format!("write {bar} {offset:#x}"));
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().push("reset".into());
        }
        fn set_bus_master(&mut self, enabled: bool) {
            self.log
                .lock()
                .unwrap()
                .push(format!("bus master {enabled}"));
        }
        fn detach(&mut self) {
            self.log.lock().unwrap().push("detach".into());
        }
        fn attach(&mut self, mem: GuestMemoryMmap<()>, wake: WakeDomain) {
            wake();
            self.log
                .lock()
                .unwrap()
                .push(format!("attach {:#x}", mem.last_addr().0));
        }
    }

    #[test]
    fn memory_enable_gates_mmio() {
        let probe = Probe::default();
        let log = probe.log.clone();
        let mut d = PciDevice::new(Box::new(probe), &[(0, 0xc000_0000)]).unwrap();
        let mut b = [0u8; 4];
        assert!(!d.mmio_read(0xc000_0010, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!d.mmio_write(0xc000_0010, &b));
        d.config_write(4, &[0x02, 0]);
        assert!(d.mmio_read(0xc000_0010, &mut b));
        assert_eq!(b, [0x10; 4]);
        assert!(d.mmio_write(0xc000_3ffc, &b));
        // Straddling the end of the BAR is not claimed.
        assert!(!d.mmio_write(0xc000_3ffe, &b));
        assert_eq!(
            *log.lock().unwrap(),
            ["bus master false", "read 0 0x10", "write 0 0x3ffc"]
        );
    }

    #[test]
    fn bus_master_changes_reach_the_backend_and_flr_resets_it() {
        let probe = Probe::default();
        let log = probe.log.clone();
        let mut d = PciDevice::new(Box::new(probe), &[(0, 0xc000_0000)]).unwrap();
        d.config_write(4, &[0x06, 0]);
        d.config_write(4, &[0x06, 0]);
        d.config_write(0x49, &[0x80]);
        assert_eq!(d.config.command(), 0);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "bus master false",
                "bus master true",
                "bus master false",
                "reset"
            ]
        );
    }

    #[test]
    fn quiesce_resets_then_detaches_and_attach_hands_over_memory_and_wake() {
        let probe = Probe::default();
        let log = probe.log.clone();
        let mut d = PciDevice::new(Box::new(probe), &[(0, 0xc000_0000)]).unwrap();
        d.config_write(4, &[0x06, 0]);
        d.quiesce();
        assert_eq!(d.config.command(), 0, "memory and bus mastering off");
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
        let woken = Arc::new(Mutex::new(0));
        let w = woken.clone();
        d.attach(mem, Arc::new(move || *w.lock().unwrap() += 1));
        assert_eq!(*woken.lock().unwrap(), 1);
        assert_eq!(d.config.command(), 0, "the new driver enables the device");
        assert_eq!(
            *log.lock().unwrap(),
            [
                "bus master false",
                "bus master true",
                "bus master false",
                "reset",
                "detach",
                "attach 0xffff"
            ]
        );
    }

    #[test]
    fn bar_addresses_must_match_the_backend() {
        let e = PciDevice::new(Box::new(Probe::default()), &[]).err();
        assert_eq!(e, Some(PciError::MissingBarAddress { index: 0 }));
        let e = PciDevice::new(Box::new(Probe::default()), &[(0, 0), (1, 0x10000)]).err();
        assert_eq!(e, Some(PciError::UnknownBar { index: 1 }));
        let e = PciDevice::new(Box::new(Probe::default()), &[(0, 0x1000)]).err();
        assert!(matches!(e, Some(PciError::BadBarAddress { .. })));
    }
}
