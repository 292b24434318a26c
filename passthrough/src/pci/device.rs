//! A PCI function: configuration space plus the backend that implements it.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::config::{
    WriteEffects, CMD_BUS_MASTER, CMD_INTX_DISABLE, MSIX_ENABLE, MSIX_FUNCTION_MASK,
};
use super::{BarInfo, ConfigSpace, Msix, PciBackend, PciError, WakeDomain};

/// A PCI function handed to a driver domain.
pub struct PciDevice {
    /// Configuration space as the domain sees it.
    pub config: ConfigSpace,
    /// The device model (or VFIO device).
    pub backend: Box<dyn PciBackend>,
    /// The MSI-X table, PBA and control bits, if the function has MSI-X.
    msix: Option<Arc<Msix>>,
}

/// Where an MMIO access lands.
enum Target {
    /// The backend's BAR `bar` at `offset`.
    Backend(u8, u64),
    /// The MSI-X table at `offset` from its start.
    Table(u64),
    /// The Pending Bit Array at `offset` from its start.
    Pba(u64),
    /// Partly inside the table or the PBA: ignored.
    Straddling,
}

/// Whether Message Control lets the function send messages.
fn msix_active(control: u16) -> bool {
    control & (MSIX_ENABLE | MSIX_FUNCTION_MASK) == MSIX_ENABLE
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
        let layout = backend.msix();
        let mut config = ConfigSpace::new(&backend.ids(), &placed, layout)?;
        if backend.intx() {
            config.set_interrupt_pin(1);
        }
        let msix = layout.map(|l| Arc::new(Msix::new(l)));
        if let Some(m) = &msix {
            backend.set_msix(m.clone());
        }
        backend.set_bus_master(false);
        Ok(PciDevice {
            config,
            backend,
            msix,
        })
    }

    /// The function's MSI-X state, if it has MSI-X.
    pub fn msix(&self) -> Option<&Arc<Msix>> {
        self.msix.as_ref()
    }

    /// A configuration read of `data.len()` bytes at `offset`.
    pub fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    /// A configuration write; applies Bus Master Enable changes, MSI-X Enable and Function Mask
    /// changes, and Function Level Reset to the backend.
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
        let intx_was = fx.old_command & CMD_INTX_DISABLE == 0;
        let intx_now = fx.new_command & CMD_INTX_DISABLE == 0;
        if intx_was != intx_now && self.config.interrupt_pin() != 0 {
            self.backend.intx_enabled(intx_now);
        }
        if fx.old_msix_control != fx.new_msix_control {
            let c = fx.new_msix_control;
            if let Some(m) = &self.msix {
                m.set_control(c & MSIX_ENABLE != 0, c & MSIX_FUNCTION_MASK != 0);
            }
            let now = msix_active(c);
            if msix_active(fx.old_msix_control) != now {
                self.backend.msix_enabled(now);
            }
        }
    }

    /// Function Level Reset, as the domain triggers it or the VMM does before handing the
    /// device to a fresh domain: bus mastering off first (no DMA can start), then the backend
    /// reset (which waits for DMA in progress), then MSI-X and configuration space back to
    /// power-on values (MMIO, DMA and MSI-X stay off until the new driver enables them).
    pub fn function_reset(&mut self) {
        self.reset_function();
        // Interrupt Disable is clear after a reset: the line may wake the domain again.
        if self.config.interrupt_pin() != 0 {
            self.backend.intx_enabled(true);
        }
    }

    /// [`PciDevice::function_reset`] without giving INTx back: the line stays off.
    fn reset_function(&mut self) {
        self.backend.set_bus_master(false);
        if self.config.interrupt_pin() != 0 {
            self.backend.intx_enabled(false);
        }
        self.backend.reset();
        if let Some(m) = &self.msix {
            self.backend.msix_enabled(false);
            m.reset();
        }
        self.config.reset();
    }

    /// Whether the function has an INTx line (Interrupt Pin not 0) that wakes its domain.
    pub fn intx(&self) -> bool {
        self.config.interrupt_pin() != 0
    }

    /// See [`PciBackend::clean_at_handover`].
    pub fn clean_at_handover(&self) -> bool {
        self.backend.clean_at_handover()
    }

    /// Quiesces the device when the domain it served dies, before that domain's memory is
    /// freed or reused: [`PciDevice::function_reset`] (bus mastering off, backend reset, which
    /// waits for DMA in progress and drops what a reset drops, such as a volatile write
    /// cache; MSI-X and configuration space back to power-on values), then
    /// [`PciBackend::detach`] and the MSI-X wake eventfd dropped. Once this returns the device
    /// does no DMA into the old memory and never wakes the old domain.
    pub fn quiesce(&mut self) {
        self.reset_function();
        self.backend.detach();
        if let Some(m) = &self.msix {
            m.detach();
        }
    }

    /// Hands the quiesced device to a new domain: its DMA goes to `mem` (the new domain's
    /// memory) and its interrupts wake the domain through `wake` (the MSI-X state and
    /// [`PciBackend::attach`]). Call it before the new domain boots; its driver then enables
    /// memory space, bus mastering and MSI-X and initialises the device from scratch. BAR
    /// addresses are kept: the new domain finds the device where the old one did.
    /// An error (why, from the backend) leaves the device detached.
    pub fn attach(&mut self, mem: GuestMemoryMmap<()>, wake: WakeDomain) -> Result<(), String> {
        self.backend.attach(mem, wake.clone())?;
        if let Some(m) = &self.msix {
            m.attach(wake);
        }
        Ok(())
    }

    /// Where an access to `[gpa, gpa + len)` goes, if memory space is on and a BAR holds it.
    fn route(&self, gpa: u64, len: usize) -> Option<Target> {
        if !self.config.memory_enabled() || len == 0 {
            return None;
        }
        let (bar, offset) = self.config.bars().into_iter().find_map(|(info, base)| {
            let offset = gpa.checked_sub(base)?;
            let end = offset.checked_add(len as u64)?;
            (end <= info.size).then_some((info.index, offset))
        })?;
        let Some(layout) = self.msix.as_ref().map(|m| m.layout()) else {
            return Some(Target::Backend(bar, offset));
        };
        let end = offset + len as u64;
        let ranges = [
            (layout.table_bar, layout.table_offset, layout.table_size()),
            (layout.pba_bar, layout.pba_offset, layout.pba_size()),
        ];
        for (i, (b, start, size)) in ranges.into_iter().enumerate() {
            if b != bar || end <= start || offset >= start + size {
                continue;
            }
            if offset < start || end > start + size {
                return Some(Target::Straddling);
            }
            return Some(if i == 0 {
                Target::Table(offset - start)
            } else {
                Target::Pba(offset - start)
            });
        }
        Some(Target::Backend(bar, offset))
    }

    /// An MMIO read; returns false (data set to all ones) when no BAR claims it or memory
    /// space is disabled.
    pub fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        let Some(target) = self.route(gpa, data.len()) else {
            data.fill(0xff);
            return false;
        };
        match (target, &self.msix) {
            (Target::Backend(bar, offset), _) => self.backend.bar_read(bar, offset, data),
            (Target::Table(offset), Some(m)) => m.table_read(offset, data),
            (Target::Pba(offset), Some(m)) => m.pba_read(offset, data),
            _ => data.fill(0),
        }
        true
    }

    /// An MMIO write; returns false (dropped) when no BAR claims it or memory space is
    /// disabled. Writes to the PBA, or straddling the table or the PBA, are dropped.
    pub fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(target) = self.route(gpa, data.len()) else {
            return false;
        };
        match (target, &self.msix) {
            (Target::Backend(bar, offset), _) => self.backend.bar_write(bar, offset, data),
            (Target::Table(offset), Some(m)) => m.table_write(offset, data),
            _ => {}
        }
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::GuestMemoryBackend;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::pci::{BarKind, MsixLayout, PciIds};

    /// A backend that records what it is asked to do.
    #[derive(Default)]
    pub(crate) struct Probe {
        pub log: Arc<Mutex<Vec<String>>>,
        /// MSI-X layout to report.
        pub msix: Option<MsixLayout>,
        /// Whether it has an INTx line.
        pub intx: bool,
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
        fn attach(&mut self, mem: GuestMemoryMmap<()>, wake: WakeDomain) -> Result<(), String> {
            wake.write(1).unwrap();
            self.log
                .lock()
                .unwrap()
                .push(format!("attach {:#x}", mem.last_addr().0));
            Ok(())
        }
        fn msix(&self) -> Option<MsixLayout> {
            self.msix
        }
        fn set_msix(&mut self, msix: Arc<Msix>) {
            self.log
                .lock()
                .unwrap()
                .push(format!("msix {}", msix.layout().vectors));
        }
        fn msix_enabled(&mut self, enabled: bool) {
            self.log.lock().unwrap().push(format!("msix {enabled}"));
        }
        fn intx(&self) -> bool {
            self.intx
        }
        fn intx_enabled(&mut self, enabled: bool) {
            self.log.lock().unwrap().push(format!("intx {enabled}"));
        }
    }

    fn with_msix() -> (PciDevice, Arc<Mutex<Vec<String>>>) {
        let probe = Probe {
            msix: Some(MsixLayout {
                vectors: 3,
                table_bar: 0,
                table_offset: 0x2000,
                pba_bar: 0,
                pba_offset: 0x3000,
            }),
            ..Probe::default()
        };
        let log = probe.log.clone();
        let d = PciDevice::new(Box::new(probe), &[(0, 0xc000_0000)]).unwrap();
        (d, log)
    }

    #[test]
    fn the_device_serves_the_msix_table_and_pba_never_the_backend() {
        let (mut d, log) = with_msix();
        d.config_write(4, &[0x02, 0]);
        let mut b = [0u8; 4];
        assert!(d.mmio_read(0xc000_2000 + 2 * 16 + 12, &mut b));
        assert_eq!(u32::from_le_bytes(b), 1, "masked at power-on");
        assert!(d.mmio_write(0xc000_2000 + 2 * 16 + 12, &0u32.to_le_bytes()));
        assert!(!d.msix().unwrap().masked(2));
        // Past the table's 3 entries the backend answers again; PBA writes are dropped.
        assert!(d.mmio_read(0xc000_2030, &mut b));
        assert!(d.mmio_write(0xc000_3000, &u32::MAX.to_le_bytes()));
        assert!(d.mmio_read(0xc000_3000, &mut b));
        assert_eq!(b, [0; 4]);
        // Straddling the start of the table: ignored, reads zeros.
        let mut q = [0xaau8; 8];
        assert!(d.mmio_read(0xc000_1ffc, &mut q));
        assert_eq!(q, [0; 8]);
        assert!(d.mmio_write(0xc000_1ffc, &[0; 8]));
        assert!(d.mmio_write(0xc000_3004, &[0; 8]));
        assert_eq!(
            *log.lock().unwrap(),
            ["msix 3", "bus master false", "read 0 0x2030"]
        );
    }

    #[test]
    fn msix_enable_and_function_mask_reach_the_msix_state_and_the_backend() {
        let (mut d, log) = with_msix();
        let cap = crate::pci::MSIX_CAP_OFFSET as u16;
        let control = |v: u16| v.to_le_bytes();
        d.config_write(cap + 2, &control(0xc000));
        assert!(d.msix().unwrap().enabled() && d.msix().unwrap().function_masked());
        d.config_write(cap + 3, &[0x80]);
        d.config_write(cap + 2, &control(0x8000));
        d.config_write(cap + 2, &control(0x0000));
        d.config_write(cap + 2, &control(0x8000));
        d.function_reset();
        assert!(!d.msix().unwrap().enabled());
        assert_eq!(d.config.msix_control(), 2);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "msix 3",
                "bus master false",
                "msix true",
                "msix false",
                "msix true",
                "bus master false",
                "reset",
                "msix false"
            ]
        );
    }

    #[test]
    fn quiesce_detaches_the_wake_eventfd_and_attach_gives_the_new_one() {
        let (mut d, _) = with_msix();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
        let old = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        d.attach(mem.clone(), old.clone()).unwrap();
        old.read().unwrap();
        let msix = d.msix().unwrap().clone();
        d.config_write(
            crate::pci::MSIX_CAP_OFFSET as u16 + 2,
            &0x8000u16.to_le_bytes(),
        );
        msix.table_write(12, &0u32.to_le_bytes());
        assert!(msix.raise(0));
        assert_eq!(old.read().unwrap(), 1);
        d.quiesce();
        assert!(!msix.raise(0));
        d.config_write(
            crate::pci::MSIX_CAP_OFFSET as u16 + 2,
            &0x8000u16.to_le_bytes(),
        );
        msix.table_write(12, &0u32.to_le_bytes());
        assert!(!msix.raise(0), "no domain attached");
        assert!(
            old.read().is_err(),
            "the old domain was woken after quiesce"
        );
        let new = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        d.attach(mem, new.clone()).unwrap();
        new.read().unwrap();
        assert!(msix.raise(0));
        assert_eq!(new.read().unwrap(), 1);
        assert!(old.read().is_err());
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
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        d.attach(mem, wake.clone()).unwrap();
        assert_eq!(wake.read().unwrap(), 1);
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
    fn an_intx_line_shows_as_inta_and_follows_interrupt_disable_and_resets() {
        let probe = Probe {
            intx: true,
            ..Probe::default()
        };
        let log = probe.log.clone();
        let mut d = PciDevice::new(Box::new(probe), &[(0, 0xc000_0000)]).unwrap();
        assert!(d.intx());
        let mut pin = [0u8; 1];
        d.config_read(0x3d, &mut pin);
        assert_eq!(pin, [1], "INTA#");
        // Interrupt Disable set, then cleared; a write that keeps it changes nothing.
        d.config_write(4, &[0x06, 0x04]);
        d.config_write(4, &[0x06, 0x00]);
        d.config_write(4, &[0x06, 0x00]);
        // A function level reset the domain asks for: the line off across the reset, then on
        // (Interrupt Disable reads clear).
        d.config_write(0x49, &[0x80]);
        d.config_read(0x3d, &mut pin);
        assert_eq!(pin, [1], "the pin survives a reset");
        // A quiesce leaves it off.
        d.quiesce();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "bus master false",
                "bus master true",
                "intx false",
                "intx true",
                "bus master false",
                "intx false",
                "reset",
                "intx true",
                "bus master false",
                "intx false",
                "reset",
                "detach"
            ]
        );
        // Without a line nothing reaches the backend.
        let probe = Probe::default();
        let log = probe.log.clone();
        let mut d = PciDevice::new(Box::new(probe), &[(0, 0xc000_0000)]).unwrap();
        d.config_read(0x3d, &mut pin);
        assert_eq!(pin, [0]);
        d.config_write(4, &[0x00, 0x04]);
        d.function_reset();
        assert!(!log.lock().unwrap().iter().any(|l| l.starts_with("intx")));
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
