//! The controller behind a PciDevice on a PciBus, as a driver domain reaches it.

use std::sync::{Arc, Mutex};

use crate::nvme::namespace::tests::TempPath;
use crate::nvme::queue::Command;
use crate::nvme::testdriver::{config, wait_until, TestDriver, WakeCounter};
use crate::nvme::{bar0_layout, EmulatedNvme, Status, NVME_CLASS_CODE, NVME_VENDOR_ID};
use crate::pci::{PciBus, PciDevice, MSIX_CAP_OFFSET};

const BAR0: u64 = 0xe000_0000;

fn cfg_read32(bus: &mut PciBus, dev: u32, reg: u32) -> u32 {
    bus.write_address((1 << 31) | (dev << 11) | reg);
    let mut d = [0u8; 4];
    bus.read_data(0, &mut d);
    u32::from_le_bytes(d)
}

fn cfg_write(bus: &mut PciBus, dev: u32, reg: u32, data: &[u8]) {
    bus.write_address((1 << 31) | (dev << 11) | (reg & !3));
    bus.write_data((reg & 3) as u8, data);
}

#[test]
fn vendor_class_and_bar_sizing_through_cf8_cfc() {
    let mut b = Behind::new();
    let bus = &mut b.bus;
    assert_eq!(cfg_read32(bus, 0, 0) & 0xffff, u32::from(NVME_VENDOR_ID));
    assert_eq!(cfg_read32(bus, 0, 8) >> 8, NVME_CLASS_CODE);
    assert_eq!(cfg_read32(bus, 0, 0x10), BAR0 as u32 | 0b100);
    assert_eq!(cfg_read32(bus, 0, 0x14), 0);
    cfg_write(bus, 0, 0x10, &u32::MAX.to_le_bytes());
    cfg_write(bus, 0, 0x14, &u32::MAX.to_le_bytes());
    let lo = cfg_read32(bus, 0, 0x10);
    let hi = cfg_read32(bus, 0, 0x14);
    let mask = (u64::from(hi) << 32) | u64::from(lo & !0xf);
    assert_eq!(!mask + 1, bar0_layout(config(&b._path).max_io_queues).1);
    assert_eq!(!mask + 1, 0x4000, "4 queue pairs: QEMU's 16 KiB");
    cfg_write(bus, 0, 0x10, &(BAR0 as u32).to_le_bytes());
    cfg_write(bus, 0, 0x14, &0u32.to_le_bytes());
    assert_eq!(cfg_read32(bus, 0, 0x10), BAR0 as u32 | 0b100);
    assert_eq!(cfg_read32(bus, 5, 0), u32::MAX);
}

#[test]
fn memory_enable_gates_register_access() {
    let mut b = Behind::new();
    let (bus, dev) = (&mut b.bus, b.dev.clone());
    let mut b = [0u8; 4];
    assert!(!dev.lock().unwrap().mmio_read(BAR0 + 8, &mut b));
    cfg_write(bus, 0, 4, &[0x02, 0]);
    assert!(dev.lock().unwrap().mmio_read(BAR0 + 8, &mut b));
    assert_eq!(u32::from_le_bytes(b), crate::nvme::NVME_VERSION);
    cfg_write(bus, 0, 4, &[0x00, 0]);
    assert!(!dev
        .lock()
        .unwrap()
        .mmio_write(BAR0 + 0x14, &1u32.to_le_bytes()));
}

/// Drives a controller that sits behind a PciDevice, with a TestDriver for memory.
struct Behind {
    bus: PciBus,
    dev: Arc<Mutex<PciDevice>>,
    d: TestDriver,
    _path: TempPath,
}

impl Behind {
    fn new() -> Behind {
        let d = TestDriver::new(|_| {});
        let path = TempPath::new("behind");
        let nvme = EmulatedNvme::new(config(&path), d.dma.clone()).unwrap();
        nvme.start_worker().unwrap();
        let dev = Arc::new(Mutex::new(
            PciDevice::new(Box::new(nvme), &[(0, BAR0)]).unwrap(),
        ));
        let mut bus = PciBus::new();
        bus.insert(0, dev.clone()).unwrap();
        Behind {
            bus,
            dev,
            d,
            _path: path,
        }
    }

    fn w32(&self, off: u64, v: u32) {
        assert!(self
            .dev
            .lock()
            .unwrap()
            .mmio_write(BAR0 + off, &v.to_le_bytes()));
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.dev.lock().unwrap().mmio_read(BAR0 + off, &mut b));
        u32::from_le_bytes(b)
    }

    /// Enables the controller with an admin queue pair; returns (sq, cq).
    fn enable(&mut self) -> (u64, u64) {
        let (sq, cq) = (self.d.alloc(1), self.d.alloc(1));
        self.w32(0x24, 3 | (3 << 16));
        self.w32(0x28, sq as u32);
        self.w32(0x2c, 0);
        self.w32(0x30, cq as u32);
        self.w32(0x34, 0);
        self.w32(0x14, 1 | (6 << 16) | (4 << 20));
        assert_eq!(self.r32(0x1c) & 3, 1);
        (sq, cq)
    }

    /// Writes an admin command at `slot` and rings tail `slot + 1`.
    fn submit(&self, sq: u64, slot: u64, cmd: Command) {
        use vm_memory::{Bytes, GuestAddress};
        self.d
            .mem
            .write_slice(&cmd.to_bytes(), GuestAddress(sq + 64 * slot))
            .unwrap();
        self.w32(0x1000, slot as u32 + 1);
    }

    /// What a driver asking for interrupts does: finds the MSI-X capability, unmasks vector 0
    /// in the table its capability names, sets MSI-X Enable.
    fn enable_vector0(&mut self) {
        let cap = MSIX_CAP_OFFSET as u32;
        assert_eq!(cfg_read32(&mut self.bus, 0, 0x40) >> 8 & 0xff, cap);
        let table = cfg_read32(&mut self.bus, 0, cap + 4);
        assert_eq!(table & 7, 0, "table in BAR0");
        self.w32(u64::from(table & !7) + 12, 0);
        cfg_write(&mut self.bus, 0, cap + 2, &0x8000u16.to_le_bytes());
    }

    fn cqe_status(&self, cq: u64, slot: u64) -> Option<Status> {
        use vm_memory::{Bytes, GuestAddress};
        let dw3: u32 = self
            .d
            .mem
            .read_obj(GuestAddress(cq + 16 * slot + 12))
            .unwrap();
        (dw3 >> 16 & 1 == 1).then(|| Status::from_field((dw3 >> 16) as u16))
    }
}

#[test]
fn bus_master_gates_dma() {
    let mut b = Behind::new();
    cfg_write(&mut b.bus, 0, 4, &[0x02, 0]);
    let (sq, cq) = b.enable();
    let identify = Command {
        opcode: 0x06,
        cid: 1,
        prp1: b.d.alloc(1),
        cdw: [1, 0, 0, 0, 0, 0],
        ..Command::default()
    };
    b.submit(sq, 0, identify);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(b.cqe_status(cq, 0), None, "no DMA without bus mastering");
    cfg_write(&mut b.bus, 0, 4, &[0x06, 0]);
    wait_until("completion after bus master on", || {
        b.cqe_status(cq, 0).is_some()
    });
    assert_eq!(b.cqe_status(cq, 0), Some(Status::SUCCESS));
}

#[test]
fn flr_resets_the_controller() {
    let mut b = Behind::new();
    cfg_write(&mut b.bus, 0, 4, &[0x06, 0]);
    let (_sq, _cq) = b.enable();
    // PCIe capability: Device Capabilities advertises FLR.
    let devcap = cfg_read32(&mut b.bus, 0, 0x44);
    assert_ne!(devcap & (1 << 28), 0);
    cfg_write(&mut b.bus, 0, 0x48, &(1u16 << 15 | 0x2810).to_le_bytes());
    // Memory space is off after FLR; the controller is back to power-on state.
    assert_eq!(cfg_read32(&mut b.bus, 0, 4) & 0x6, 0);
    cfg_write(&mut b.bus, 0, 4, &[0x06, 0]);
    assert_eq!(b.r32(0x1c), 0);
    assert_eq!(b.r32(0x24), 0);
    assert_eq!(b.r32(0x14), 0);
    // And it comes back up.
    let (sq, cq) = b.enable();
    b.submit(
        sq,
        0,
        Command {
            opcode: 0x0a,
            cid: 7,
            cdw: [7, 0, 0, 0, 0, 0],
            ..Command::default()
        },
    );
    wait_until("completion", || b.cqe_status(cq, 0).is_some());
}

#[test]
fn quiesce_and_attach_hand_the_controller_to_a_new_domain() {
    let mut b = Behind::new();
    cfg_write(&mut b.bus, 0, 4, &[0x06, 0]);
    let (sq, cq) = b.enable();
    b.submit(
        sq,
        0,
        Command {
            opcode: 0x0a,
            cid: 1,
            cdw: [7, 0, 0, 0, 0, 0],
            ..Command::default()
        },
    );
    wait_until("completion in the first domain", || {
        b.cqe_status(cq, 0).is_some()
    });

    b.dev.lock().unwrap().quiesce();
    assert_eq!(cfg_read32(&mut b.bus, 0, 4) & 0x6, 0);
    assert!(!b.d.dma.attached());
    let old = b.d.mem.clone();
    let old_image = crate::nvme::testdriver::snapshot(&old);

    // The next domain: new memory, its own wake-up, the same BAR.
    let mem = crate::nvme::testdriver::memory();
    let woken = WakeCounter::new();
    b.dev
        .lock()
        .unwrap()
        .attach(mem.clone(), woken.fd.clone())
        .unwrap();
    b.d.mem = mem;
    assert_eq!(cfg_read32(&mut b.bus, 0, 0x10), BAR0 as u32 | 0b100);
    cfg_write(&mut b.bus, 0, 4, &[0x06, 0]);
    assert_eq!(
        b.r32(0x1c),
        0,
        "the controller starts from its power-on state"
    );
    b.enable_vector0();
    let (sq, cq) = b.enable();
    b.submit(
        sq,
        0,
        Command {
            opcode: 0x0a,
            cid: 2,
            cdw: [7, 0, 0, 0, 0, 0],
            ..Command::default()
        },
    );
    wait_until("completion in the new domain", || {
        b.cqe_status(cq, 0).is_some()
    });
    assert_eq!(b.cqe_status(cq, 0), Some(Status::SUCCESS));
    wait_until("the new domain woken", || woken.count() > 0);
    assert!(crate::nvme::testdriver::snapshot(&old) == old_image);
}

#[test]
fn msix_through_config_space_and_bar0() {
    let mut b = Behind::new();
    let wake = WakeCounter::new();
    let mem = b.d.mem.clone();
    b.dev.lock().unwrap().attach(mem, wake.fd.clone()).unwrap();
    cfg_write(&mut b.bus, 0, 4, &[0x06, 0]);
    let cap = MSIX_CAP_OFFSET as u32;
    let (layout, _) = bar0_layout(4);
    let dword0 = cfg_read32(&mut b.bus, 0, cap);
    assert_eq!(dword0 & 0xff, 0x11);
    assert_eq!(dword0 >> 16, u32::from(layout.vectors) - 1);
    assert_eq!(cfg_read32(&mut b.bus, 0, cap + 4), 0x2000);
    assert_eq!(cfg_read32(&mut b.bus, 0, cap + 8), 0x3000);
    // The table is served by the device, not the controller's registers.
    assert_eq!(b.r32(0x2000 + 12), 1, "vector 0 masked at power-on");
    b.w32(0x2000, 0xfee0_0000);
    assert_eq!(b.r32(0x2000), 0xfee0_0000);
    // Function masked and enabled: the admin completion is left pending.
    cfg_write(&mut b.bus, 0, cap + 2, &0xc000u16.to_le_bytes());
    b.w32(0x2000 + 12, 0);
    let (sq, cq) = b.enable();
    b.submit(
        sq,
        0,
        Command {
            opcode: 0x0a,
            cid: 1,
            cdw: [7, 0, 0, 0, 0, 0],
            ..Command::default()
        },
    );
    wait_until("completion", || b.cqe_status(cq, 0).is_some());
    assert_eq!(wake.count(), 0);
    assert_eq!(b.r32(0x3000), 1, "vector 0 pending");
    b.w32(0x3000, 0);
    assert_eq!(b.r32(0x3000), 1, "the PBA is read-only");
    cfg_write(&mut b.bus, 0, cap + 2, &0x8000u16.to_le_bytes());
    assert_eq!(wake.count(), 1, "sent when the function mask cleared");
    assert_eq!(b.r32(0x3000), 0);
    // A function reset disables MSI-X and masks every vector again.
    cfg_write(&mut b.bus, 0, 0x48, &(1u16 << 15 | 0x2810).to_le_bytes());
    assert_eq!(cfg_read32(&mut b.bus, 0, cap) >> 16 & 0xc000, 0);
    cfg_write(&mut b.bus, 0, 4, &[0x06, 0]);
    assert_eq!(b.r32(0x2000 + 12), 1);
    assert_eq!(b.r32(0x2000), 0);
}
