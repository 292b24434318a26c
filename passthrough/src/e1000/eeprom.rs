//! The EEPROM contents and the PHY registers the driver can read.
//!
//! The EEPROM is 64 words: the MAC address in words 0 to 2 (first byte in the low half of word
//! 0), the PCI identity where the 82540EM keeps it, and a checksum in word 0x3F chosen so that
//! the words 0 to 0x3F add up to 0xBABA, which drivers check.
//!
//! The PHY (address 1) always reports a link that is up, autonegotiated, at 1000 Mb/s full
//! duplex. Writes to it (a PHY reset, a restart of autonegotiation) are accepted and have no
//! effect: the link never goes down, so a driver that restarts costs no autonegotiation.

/// Words of the EEPROM.
pub const EEPROM_WORDS: usize = 64;
/// The word the EEPROM's words add up to.
pub const EEPROM_SUM: u16 = 0xBABA;
/// What a read beyond the EEPROM returns (erased cells).
pub const EEPROM_ERASED: u16 = 0xFFFF;
/// The PHY's address on the MDIO bus.
pub const PHY_ADDRESS: u32 = 1;

/// The EEPROM image for a NIC with `mac`.
pub fn image(mac: [u8; 6], vendor: u16, device: u16) -> [u16; EEPROM_WORDS] {
    let mut w = [0u16; EEPROM_WORDS];
    for i in 0..3 {
        w[i] = u16::from_le_bytes([mac[2 * i], mac[2 * i + 1]]);
    }
    // Initialization control words 1 and 2, as 82540EM boards ship them.
    w[0x0A] = 0x6400;
    w[0x0F] = 0x3040;
    // Subsystem ID, subsystem vendor ID, device ID, vendor ID.
    w[0x0B] = device;
    w[0x0C] = vendor;
    w[0x0D] = device;
    w[0x0E] = vendor;
    let sum = w[..EEPROM_WORDS - 1]
        .iter()
        .fold(0u16, |a, &x| a.wrapping_add(x));
    w[EEPROM_WORDS - 1] = EEPROM_SUM.wrapping_sub(sum);
    w
}

/// PHY registers (IEEE 802.3 clause 22, and the M88E1011's specific status); the status bits
/// are what a driver (and the tests) check.
#[allow(dead_code)]
pub mod phy {
    /// Basic Mode Control: autonegotiation enabled, full duplex, 1000 Mb/s.
    pub const BMCR: u32 = 0;
    /// Basic Mode Status.
    pub const BMSR: u32 = 1;
    pub const ID1: u32 = 2;
    pub const ID2: u32 = 3;
    /// Autonegotiation advertisement, link partner ability.
    pub const ANAR: u32 = 4;
    pub const ANLPAR: u32 = 5;
    /// 1000BASE-T control and status.
    pub const GBCR: u32 = 9;
    pub const GBSR: u32 = 10;
    /// PHY Specific Status.
    pub const PSSR: u32 = 17;

    /// BMSR: link status.
    pub const BMSR_LINK: u16 = 1 << 2;
    /// BMSR: autonegotiation complete.
    pub const BMSR_AN_COMPLETE: u16 = 1 << 5;
}

/// The value of PHY register `reg`: 0 for registers not modelled.
pub fn phy_read(reg: u32) -> u16 {
    match reg {
        phy::BMCR => 0x1140,
        // 100BASE-X/10BASE-T abilities, extended status, preamble suppression, autonegotiation
        // complete and able, link up, extended capabilities.
        phy::BMSR => 0x796D,
        // Marvell 88E1011.
        phy::ID1 => 0x0141,
        phy::ID2 => 0x0C20,
        phy::ANAR => 0x0DE1,
        phy::ANLPAR => 0x41E1,
        phy::GBCR => 0x0E00,
        phy::GBSR => 0x3C00,
        // 1000 Mb/s, full duplex, speed and duplex resolved, link up.
        phy::PSSR => 0xAC00,
        _ => 0,
    }
}
