//! The NIC behind a PciDevice: identity, BAR0, and moving between domains.

use vm_memory::{Bytes, GuestAddress};

use crate::dma::DmaWindow;
use crate::e1000::regs::*;
use crate::e1000::testdriver::{frame, memory, wait_until, WakeCounter, MAC_A};
use crate::e1000::{E1000Config, EmulatedE1000, BAR0_SIZE, E1000_CLASS_CODE};
use crate::net::{wire_pair, PairConfig, Wire, MAX_FRAME};
use crate::pci::PciDevice;

const BAR0: u64 = 0xe000_0000;
const RXR: u64 = 0x1000;
const RXB: u64 = 0x8000;

fn w(dev: &mut PciDevice, off: u64, v: u32) {
    assert!(dev.mmio_write(BAR0 + off, &v.to_le_bytes()));
}

fn r(dev: &mut PciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(dev.mmio_read(BAR0 + off, &mut b));
    u32::from_le_bytes(b)
}

/// Enables the function and a receive ring of 8 descriptors with every IMS cause.
fn bring_up(dev: &mut PciDevice, mem: &vm_memory::GuestMemoryMmap<()>) {
    dev.config_write(4, &[0x06, 0]);
    for i in 0..8u64 {
        mem.write_obj(RXB + i * 2048, GuestAddress(RXR + i * 16))
            .unwrap();
        mem.write_obj(0u64, GuestAddress(RXR + i * 16 + 8)).unwrap();
    }
    w(dev, RDBAL, RXR as u32);
    w(dev, RDLEN, 128);
    w(dev, RDH, 0);
    w(dev, RDT, 7);
    w(dev, RCTL, RCTL_EN | RCTL_BAM);
    w(dev, IMS, ICR_ALL);
}

#[test]
fn the_function_is_an_82540em_with_a_128k_memory_bar() {
    let (wire, _peer) = wire_pair(PairConfig::default()).unwrap();
    let nic = EmulatedE1000::new(
        E1000Config {
            mac: MAC_A,
            wire: Box::new(wire),
        },
        DmaWindow::detached(),
    )
    .unwrap();
    let mut dev = PciDevice::new(Box::new(nic), &[(0, BAR0)]).unwrap();
    let mut b = [0u8; 4];
    dev.config_read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x100E_8086);
    dev.config_read(8, &mut b);
    assert_eq!(u32::from_le_bytes(b) >> 8, E1000_CLASS_CODE);
    dev.config_write(0x10, &u32::MAX.to_le_bytes());
    dev.config_read(0x10, &mut b);
    let v = u32::from_le_bytes(b);
    assert_eq!(v & 0b111, 0, "32-bit memory BAR");
    assert_eq!(u64::from(!(v & !0xF)) + 1, BAR0_SIZE);
    dev.config_read(0x14, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0, "no other BAR");
    assert!(dev.msix().is_none(), "the 82540EM has no MSI-X");
}

#[test]
fn after_quiesce_the_old_domain_is_neither_written_nor_woken_and_the_next_one_is_served() {
    let (wire, mut peer) = wire_pair(PairConfig::default()).unwrap();
    let nic = EmulatedE1000::new(
        E1000Config {
            mac: MAC_A,
            wire: Box::new(wire),
        },
        DmaWindow::detached(),
    )
    .unwrap();
    nic.start_worker().unwrap();
    let monitor = nic.monitor();
    let mut dev = PciDevice::new(Box::new(nic), &[(0, BAR0)]).unwrap();
    let (old, old_wake) = (memory(), WakeCounter::new());
    dev.attach(old.clone(), old_wake.fd.clone()).unwrap();
    bring_up(&mut dev, &old);
    let f1 = frame(MAC_A, [2; 6], 1, 100);
    peer.send(&f1).unwrap();
    wait_until("received", || monitor.stats().frames_received == 1);
    let mut got = vec![0u8; 100];
    old.read_slice(&mut got, GuestAddress(RXB)).unwrap();
    assert_eq!(got, f1);
    assert_eq!(old_wake.count(), 1);
    dev.quiesce();
    let mut snapshot = vec![0u8; 0x10000];
    old.read_slice(&mut snapshot, GuestAddress(0)).unwrap();
    let f2 = frame(MAC_A, [2; 6], 2, 100);
    peer.send(&f2).unwrap();
    // Reset by the quiesce: receive is off; the frame waits in the packet buffer.
    wait_until("held", || monitor.stats().rx_waiting == 1);
    let mut now = vec![0u8; 0x10000];
    old.read_slice(&mut now, GuestAddress(0)).unwrap();
    assert!(now == snapshot, "the old domain's memory is untouched");
    assert_eq!(old_wake.count(), 1, "the old domain is not woken");
    // The next domain: a clean NIC, link up, its own memory and wake-up.
    let (new, new_wake) = (memory(), WakeCounter::new());
    dev.attach(new.clone(), new_wake.fd.clone()).unwrap();
    dev.config_write(4, &[0x06, 0]);
    assert_eq!(r(&mut dev, RCTL), 0, "reset by the quiesce");
    assert_eq!(r(&mut dev, STATUS) & STATUS_LU, STATUS_LU);
    bring_up(&mut dev, &new);
    // What arrived during the hand-over goes to the new domain first.
    wait_until("the held frame received by the new domain", || {
        monitor.stats().frames_received == 2
    });
    let mut got = vec![0u8; 100];
    new.read_slice(&mut got, GuestAddress(RXB)).unwrap();
    assert_eq!(got, f2);
    let f3 = frame(MAC_A, [2; 6], 3, 200);
    peer.send(&f3).unwrap();
    wait_until("received by the new domain", || {
        monitor.stats().frames_received == 3
    });
    let mut got = vec![0u8; 200];
    new.read_slice(&mut got, GuestAddress(RXB + 2048)).unwrap();
    assert_eq!(got, f3);
    assert!(new_wake.count() >= 1);
    assert_eq!(old_wake.count(), 1);
    // And it transmits.
    new.write_slice(&frame([2; 6], MAC_A, 4, 64), GuestAddress(0x20000))
        .unwrap();
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&0x20000u64.to_le_bytes());
    d[8] = 64;
    d[11] = TXD_CMD_EOP | TXD_CMD_RS;
    new.write_slice(&d, GuestAddress(0x3000)).unwrap();
    w(&mut dev, TDBAL, 0x3000);
    w(&mut dev, TDLEN, 128);
    w(&mut dev, TCTL, TCTL_EN);
    w(&mut dev, TDT, 1);
    let mut buf = vec![0; MAX_FRAME];
    assert_eq!(peer.recv(&mut buf).unwrap(), Some(64));
    assert_eq!(buf[..64], frame([2; 6], MAC_A, 4, 64)[..]);
    assert_eq!(monitor.stats().dma_refused, 0);
}
