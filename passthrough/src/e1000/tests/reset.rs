//! Resets: CTRL.RST and the function reset put the MAC back to power-on state and keep the
//! link up.

use crate::e1000::regs::*;
use crate::e1000::testdriver::{frame, TestNic, MAC_A, MAC_B, RCTL_DEFAULT};
use crate::net::PairConfig;
use crate::pci::PciBackend;

fn assert_power_on(t: &mut TestNic) {
    assert_eq!(t.read32(RCTL), 0);
    assert_eq!(t.read32(TCTL), 0);
    assert_eq!(t.read32(IMS), 0);
    assert_eq!(t.read32(ICR), 0, "no cause pending, LSC included");
    assert_eq!(t.read32(RDLEN), 0);
    assert_eq!(t.read32(TDT), 0);
    assert_eq!(t.read32(CTRL) & CTRL_RST, 0, "RST clears itself");
    assert_eq!(t.read32(RA + 4), 0x0134 | RAH_AV, "RAR0 reloaded");
    assert_eq!(t.read32(RA + 8), 0);
    assert_eq!(t.read32(STATUS) & STATUS_LU, STATUS_LU, "the link stays up");
}

fn dirty(t: &mut TestNic) {
    t.write32(IMS, ICR_ALL);
    t.write32(RA + 8, 0x1234);
    t.write32(RA + 12, RAH_AV);
    t.write32(ICS, ICR_RXO);
    t.read32(ICR);
}

#[test]
fn ctrl_rst_resets_the_mac_and_keeps_the_link_up() {
    let (mut a, mut b) = TestNic::pair(PairConfig::default());
    dirty(&mut a);
    let wakes = a.wakes.count();
    let ctrl = a.read32(CTRL);
    a.write32(CTRL, ctrl | CTRL_RST);
    assert_power_on(&mut a);
    assert_eq!(a.wakes.count(), wakes, "no interrupt from the reset");
    // A driver re-initialises and traffic flows at once: no autonegotiation to wait for.
    a.init(RCTL_DEFAULT);
    let f = frame(MAC_B, MAC_A, 1, 500);
    a.send(&f);
    assert_eq!(b.recv(), f);
    b.send(&frame(MAC_A, MAC_B, 2, 500));
    assert_eq!(a.recv(), frame(MAC_A, MAC_B, 2, 500));
}

#[test]
fn the_function_reset_does_the_same_and_drops_a_half_sent_chain() {
    let (mut a, mut b) = TestNic::pair(PairConfig::default());
    dirty(&mut a);
    // Half a chain (no EOP) is in the NIC when the reset comes.
    let f = frame(MAC_B, MAC_A, 1, 1000);
    a.tx_desc(0, crate::e1000::testdriver::TX_BUFS, 500, TXD_CMD_RS);
    a.write32(TDT, 1);
    a.nic.reset();
    assert_power_on(&mut a);
    a.init(RCTL_DEFAULT);
    a.send(&f);
    assert_eq!(
        b.recv(),
        f,
        "the new chain is whole: nothing of the old one"
    );
    b.recv_nothing();
}
