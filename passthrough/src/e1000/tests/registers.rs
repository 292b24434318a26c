//! Identity, EEPROM, PHY, STATUS and the register file.

use crate::e1000::eeprom::phy;
use crate::e1000::regs::*;
use crate::e1000::testdriver::{TestNic, MAC_A};
use crate::e1000::{EEPROM_SUM, EEPROM_WORDS};
use crate::net::{wire_pair, PairConfig};

fn nic() -> TestNic {
    let (w, _) = wire_pair(PairConfig::default()).unwrap();
    TestNic::on(MAC_A, Box::new(w), false)
}

#[test]
fn the_eeprom_holds_the_mac_and_a_valid_checksum() {
    let mut t = nic();
    assert_eq!(t.eeprom_mac(), MAC_A);
    let sum = (0..EEPROM_WORDS as u32).fold(0u16, |a, w| a.wrapping_add(t.eeprom(w)));
    assert_eq!(sum, EEPROM_SUM);
    assert_eq!(t.eeprom(0x0E), 0x8086);
    assert_eq!(t.eeprom(0x0D), 0x100E);
    assert_eq!(t.eeprom(200), 0xFFFF, "beyond the EEPROM: erased");
    // Receive address 0 comes from the EEPROM, valid.
    assert_eq!(t.read32(RA), u32::from_le_bytes([0x52, 0x54, 0x00, 0x12]));
    assert_eq!(t.read32(RA + 4), 0x0134 | RAH_AV);
}

#[test]
fn the_link_is_up_at_1000_full_duplex_and_the_phy_says_so() {
    let mut t = nic();
    let status = t.read32(STATUS);
    assert_eq!(status & STATUS_LU, STATUS_LU);
    assert_eq!(status & STATUS_FD, STATUS_FD);
    assert_eq!(status & (0b11 << 6), STATUS_SPEED_1000);
    let bmsr = t.phy_read(phy::BMSR);
    assert!(bmsr & MDIC_READY != 0 && bmsr & MDIC_ERROR == 0);
    let bmsr = bmsr as u16;
    assert!(bmsr & phy::BMSR_LINK != 0 && bmsr & phy::BMSR_AN_COMPLETE != 0);
    assert_eq!(t.phy_read(phy::ID1) as u16, 0x0141);
    // A PHY reset and a restart of autonegotiation are accepted and change nothing.
    t.write32(
        MDIC,
        MDIC_OP_WRITE | 1 << MDIC_PHY_SHIFT | phy::BMCR << MDIC_REG_SHIFT | 0x8000 | 0x0200,
    );
    assert!(t.read32(MDIC) & MDIC_READY != 0);
    let ctrl = t.read32(CTRL);
    t.write32(CTRL, ctrl | CTRL_PHY_RST);
    assert_eq!(t.read32(STATUS) & STATUS_LU, STATUS_LU);
    assert!(t.phy_read(phy::BMSR) as u16 & phy::BMSR_LINK != 0);
    assert_eq!(t.read32(ICR) & ICR_LSC, 0, "no link change");
    // Another PHY address answers with an error.
    t.write32(
        MDIC,
        MDIC_OP_READ | 2 << MDIC_PHY_SHIFT | 1 << MDIC_REG_SHIFT,
    );
    assert!(t.read32(MDIC) & MDIC_ERROR != 0);
}

#[test]
fn eecd_grants_the_eeprom_to_a_driver_that_asks() {
    let mut t = nic();
    assert_eq!(t.read32(EECD) & (EECD_PRES | EECD_GNT), EECD_PRES);
    t.write32(EECD, EECD_REQ);
    assert_eq!(t.read32(EECD) & EECD_GNT, EECD_GNT);
    t.write32(EECD, 0);
    assert_eq!(t.read32(EECD) & EECD_GNT, 0);
}

#[test]
fn unknown_offsets_read_zero_and_their_writes_are_counted() {
    let mut t = nic();
    assert_eq!(t.read32(0x0004), 0);
    t.write32(0x0004, 0xdead_beef);
    assert_eq!(t.read32(0x0004), 0);
    t.write32(0x1_FFFC, 1);
    t.write32(STATUS, 0);
    // Not 4 bytes or not aligned.
    t.nic_write(RCTL, &[1, 2]);
    t.nic_write(RCTL + 1, &[1, 2, 3, 4]);
    assert_eq!(t.nic.stats().ignored_register_writes, 5);
    assert_eq!(t.read32(RCTL), 0);
    // Stored registers read back as written.
    for (off, v) in [
        (TIPG, 0x0060_200A),
        (RDTR, 32),
        (TIDV, 8),
        (MTA + 0x40, 0x8000_0001),
    ] {
        t.write32(off, v);
        assert_eq!(t.read32(off), v, "{off:#x}");
    }
}

#[test]
fn statistics_clear_on_read_and_the_high_half_clears_the_pair() {
    let (mut t, mut peer) = TestNic::with_peer();
    use crate::e1000::testdriver::{frame, BROADCAST};
    use crate::net::Wire;
    peer.send(&frame(MAC_A, [2; 6], 1, 100)).unwrap();
    peer.send(&frame(BROADCAST, [2; 6], 2, 200)).unwrap();
    t.recv();
    t.recv();
    t.send(&frame([2; 6], MAC_A, 3, 300));
    assert_eq!(t.read32(stat::GPRC), 2);
    assert_eq!(t.read32(stat::GPRC), 0, "cleared by the read");
    assert_eq!(t.read32(stat::BPRC), 1);
    assert_eq!(t.read32(stat::TPR), 2);
    assert_eq!(t.read32(stat::GPTC), 1);
    assert_eq!(t.read32(stat::TPT), 1);
    assert_eq!(t.read32(stat::GORCL), 100 + 200 + 8);
    assert_eq!(
        t.read32(stat::GORCL),
        308,
        "the low half alone does not clear"
    );
    assert_eq!(t.read32(stat::GORCL + 4), 0);
    assert_eq!(t.read32(stat::GORCL), 0, "the high half cleared the pair");
    assert_eq!(t.read32(stat::GOTCL), 304);
    assert_eq!(t.read32(stat::MPC), 0);
}
