//! Interrupt causes, the mask, and the wake eventfd.

use crate::e1000::regs::*;
use crate::e1000::testdriver::{frame, wait_until, TestNic, MAC_A};
use crate::net::Wire;
use crate::pci::PciBackend;

#[test]
fn a_cause_wakes_the_domain_only_when_enabled_in_ims() {
    let (mut t, mut peer) = TestNic::with_peer();
    let w0 = t.wakes.count();
    t.send(&frame([2; 6], MAC_A, 1, 64));
    assert_eq!(t.wakes.count(), w0, "IMS is empty: no wake-up");
    assert_eq!(t.read32(ICR), ICR_TXDW | ICR_TXQE, "the causes are pending");
    assert_eq!(t.read32(ICR), 0, "reading ICR cleared it");
    t.write32(IMS, ICR_RXT0 | ICR_LSC);
    assert_eq!(t.read32(IMS), ICR_RXT0 | ICR_LSC);
    t.send(&frame([2; 6], MAC_A, 2, 64));
    assert_eq!(t.wakes.count(), w0, "TXDW is masked");
    peer.send(&frame(MAC_A, [2; 6], 3, 64)).unwrap();
    wait_until("a wake-up for RXT0", || t.wakes.count() == w0 + 1);
    assert_eq!(t.read32(ICR) & ICR_RXT0, ICR_RXT0);
    assert_eq!(t.nic.stats().interrupts, 1);
    // IMC masks it again.
    t.write32(IMC, ICR_RXT0);
    assert_eq!(t.read32(IMS), ICR_LSC);
    t.recv();
    peer.send(&frame(MAC_A, [2; 6], 4, 64)).unwrap();
    t.recv();
    assert_eq!(t.wakes.count(), w0 + 1);
}

#[test]
fn unmasking_a_pending_cause_wakes_and_ics_raises_causes() {
    let (mut t, _peer) = TestNic::with_peer();
    t.send(&frame([2; 6], MAC_A, 1, 64));
    let w0 = t.wakes.count();
    t.write32(IMS, ICR_TXDW);
    assert_eq!(t.wakes.count(), w0 + 1, "TXDW was pending");
    t.write32(IMS, ICR_TXDW);
    assert_eq!(t.wakes.count(), w0 + 1, "already enabled: no new wake-up");
    assert_eq!(t.read32(ICR), ICR_TXDW | ICR_TXQE);
    t.write32(ICS, ICR_RXDMT0);
    assert_eq!(t.wakes.count(), w0 + 1, "RXDMT0 is masked");
    t.write32(ICS, ICR_TXDW);
    assert_eq!(t.wakes.count(), w0 + 2);
    assert_eq!(t.read32(ICR), ICR_RXDMT0 | ICR_TXDW);
    // Writing ICR clears the causes written.
    t.write32(ICS, ICR_RXO | ICR_RXT0);
    t.write32(ICR, ICR_RXO);
    assert_eq!(t.read32(ICR), ICR_RXT0);
}

#[test]
fn nothing_wakes_the_domain_after_detach() {
    let (mut t, mut peer) = TestNic::with_peer();
    t.write32(IMS, ICR_ALL);
    peer.send(&frame(MAC_A, [2; 6], 1, 64)).unwrap();
    wait_until("a wake-up", || t.wakes.count() == 1);
    t.nic.detach();
    let interrupts = t.nic.stats().interrupts;
    peer.send(&frame(MAC_A, [2; 6], 2, 64)).unwrap();
    // No domain to write to: the frame waits for the next one.
    wait_until("the frame held", || t.nic.stats().rx_waiting == 1);
    t.write32(ICS, ICR_ALL);
    t.send_chunks(&frame([2; 6], MAC_A, 3, 64), 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(t.wakes.count(), 1, "no wake-up after detach");
    assert_eq!(t.nic.stats().interrupts, interrupts);
    assert_eq!(
        peer.stats().received,
        0,
        "nothing transmitted while detached"
    );
}

#[test]
fn rxdmt0_is_raised_when_free_descriptors_fall_to_the_threshold() {
    let (mut t, mut peer) = TestNic::with_peer();
    // 31 descriptors free of 32; RDMTS = 1/2: at 16 free or fewer.
    for n in 0..14u32 {
        peer.send(&frame(MAC_A, [2; 6], n, 64)).unwrap();
    }
    wait_until("14 frames", || t.nic.stats().frames_received == 14);
    assert_eq!(t.read32(ICR) & ICR_RXDMT0, 0, "17 free");
    peer.send(&frame(MAC_A, [2; 6], 14, 64)).unwrap();
    wait_until("15 frames", || t.nic.stats().frames_received == 15);
    assert_eq!(t.read32(ICR) & ICR_RXDMT0, ICR_RXDMT0, "16 free");
}
