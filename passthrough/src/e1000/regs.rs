//! Register offsets in BAR0 and their bits (82540EM; the names are the datasheet's).
//!
//! The map names bits the model only stores (or the tests only use), so that the code reads
//! as the datasheet does.

#![allow(dead_code)]

/// Device Control.
pub const CTRL: u64 = 0x0000;
/// Device Status.
pub const STATUS: u64 = 0x0008;
/// EEPROM/Flash Control.
pub const EECD: u64 = 0x0010;
/// EEPROM Read.
pub const EERD: u64 = 0x0014;
/// Extended Device Control.
pub const CTRL_EXT: u64 = 0x0018;
/// MDI Control (PHY access).
pub const MDIC: u64 = 0x0020;
/// Flow Control Address Low / High, Type.
pub const FCAL: u64 = 0x0028;
pub const FCAH: u64 = 0x002C;
pub const FCT: u64 = 0x0030;
/// VLAN Ether Type.
pub const VET: u64 = 0x0038;
/// Interrupt Cause Read.
pub const ICR: u64 = 0x00C0;
/// Interrupt Throttling.
pub const ITR: u64 = 0x00C4;
/// Interrupt Cause Set.
pub const ICS: u64 = 0x00C8;
/// Interrupt Mask Set/Read.
pub const IMS: u64 = 0x00D0;
/// Interrupt Mask Clear.
pub const IMC: u64 = 0x00D8;
/// Receive Control.
pub const RCTL: u64 = 0x0100;
/// Flow Control Transmit Timer Value.
pub const FCTTV: u64 = 0x0170;
/// Transmit Control.
pub const TCTL: u64 = 0x0400;
/// Transmit IPG.
pub const TIPG: u64 = 0x0410;
/// LED Control.
pub const LEDCTL: u64 = 0x0E00;
/// Packet Buffer Allocation.
pub const PBA: u64 = 0x1000;
/// Flow Control Receive Threshold Low / High.
pub const FCRTL: u64 = 0x2160;
pub const FCRTH: u64 = 0x2168;
/// Receive descriptor ring: base low/high, length, head, tail.
pub const RDBAL: u64 = 0x2800;
pub const RDBAH: u64 = 0x2804;
pub const RDLEN: u64 = 0x2808;
pub const RDH: u64 = 0x2810;
pub const RDT: u64 = 0x2818;
/// Receive Delay Timer, Receive Descriptor Control, Receive Interrupt Absolute Delay.
pub const RDTR: u64 = 0x2820;
pub const RXDCTL: u64 = 0x2828;
pub const RADV: u64 = 0x282C;
/// Receive Small Packet Detect.
pub const RSRPD: u64 = 0x2C00;
/// Transmit descriptor ring: base low/high, length, head, tail.
pub const TDBAL: u64 = 0x3800;
pub const TDBAH: u64 = 0x3804;
pub const TDLEN: u64 = 0x3808;
pub const TDH: u64 = 0x3810;
pub const TDT: u64 = 0x3818;
/// Transmit Interrupt Delay, Transmit Descriptor Control, Transmit Absolute Interrupt Delay.
pub const TIDV: u64 = 0x3820;
pub const TXDCTL: u64 = 0x3828;
pub const TADV: u64 = 0x382C;
/// Statistics registers: 64 of them from here.
pub const STATS_BASE: u64 = 0x4000;
pub const STATS_END: u64 = 0x4100;
/// The page of filter tables and other registers without side effects (RXCSUM, the MTA, the
/// receive addresses, the VFTA, wake-up and manageability): plain memory in the model, which a
/// VM may map so that the driver's writes there need no exit.
pub const TABLE_PAGE: u64 = 0x5000;
pub const TABLE_PAGE_END: u64 = 0x6000;
/// Receive Checksum Control.
pub const RXCSUM: u64 = 0x5000;
/// Multicast Table Array: 128 words.
pub const MTA: u64 = 0x5200;
pub const MTA_END: u64 = 0x5400;
/// Receive Address registers: 16 pairs of (low, high).
pub const RA: u64 = 0x5400;
pub const RA_END: u64 = 0x5480;
/// VLAN Filter Table Array: 128 words.
pub const VFTA: u64 = 0x5600;
pub const VFTA_END: u64 = 0x5800;
/// Wake Up Control, Filter Control, Status.
pub const WUC: u64 = 0x5800;
pub const WUFC: u64 = 0x5808;
pub const WUS: u64 = 0x5810;
/// Manageability Control.
pub const MANC: u64 = 0x5820;

/// Statistics register offsets (each within `STATS_BASE..STATS_END`).
pub mod stat {
    pub const CRCERRS: u64 = 0x4000;
    pub const MPC: u64 = 0x4010;
    pub const PRC64: u64 = 0x405C;
    pub const GPRC: u64 = 0x4074;
    pub const BPRC: u64 = 0x4078;
    pub const MPRC: u64 = 0x407C;
    pub const GPTC: u64 = 0x4080;
    pub const GORCL: u64 = 0x4088;
    pub const GOTCL: u64 = 0x4090;
    pub const RNBC: u64 = 0x40A0;
    pub const RUC: u64 = 0x40A4;
    pub const ROC: u64 = 0x40AC;
    pub const TORL: u64 = 0x40C0;
    pub const TOTL: u64 = 0x40C8;
    pub const TPR: u64 = 0x40D0;
    pub const TPT: u64 = 0x40D4;
    pub const PTC64: u64 = 0x40D8;
    pub const MPTC: u64 = 0x40F0;
    pub const BPTC: u64 = 0x40F4;
    /// The high halves of the 64-bit octet counters: reading one clears the pair.
    pub const HIGH_HALVES: [u64; 4] = [GORCL + 4, GOTCL + 4, TORL + 4, TOTL + 4];
}

/// CTRL bits.
pub const CTRL_FD: u32 = 1 << 0;
pub const CTRL_ASDE: u32 = 1 << 5;
pub const CTRL_SLU: u32 = 1 << 6;
pub const CTRL_SPD_1000: u32 = 0b10 << 8;
pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_PHY_RST: u32 = 1 << 31;

/// STATUS bits: full duplex, link up, 1000 Mb/s, auto-detected speed 1000 Mb/s.
pub const STATUS_FD: u32 = 1 << 0;
pub const STATUS_LU: u32 = 1 << 1;
pub const STATUS_SPEED_1000: u32 = 0b10 << 6;
pub const STATUS_ASDV_1000: u32 = 0b10 << 8;

/// EECD bits: EEPROM request and grant, present.
pub const EECD_REQ: u32 = 1 << 6;
pub const EECD_GNT: u32 = 1 << 7;
pub const EECD_PRES: u32 = 1 << 8;

/// EERD: start, done, address and data fields.
pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;
pub const EERD_ADDR_SHIFT: u32 = 8;
pub const EERD_DATA_SHIFT: u32 = 16;

/// MDIC fields.
pub const MDIC_DATA_MASK: u32 = 0xFFFF;
pub const MDIC_REG_SHIFT: u32 = 16;
pub const MDIC_PHY_SHIFT: u32 = 21;
pub const MDIC_OP_WRITE: u32 = 0b01 << 26;
pub const MDIC_OP_READ: u32 = 0b10 << 26;
pub const MDIC_OP_MASK: u32 = 0b11 << 26;
pub const MDIC_READY: u32 = 1 << 28;
pub const MDIC_INT_EN: u32 = 1 << 29;
pub const MDIC_ERROR: u32 = 1 << 30;

/// Interrupt causes (ICR, ICS, IMS, IMC).
pub const ICR_TXDW: u32 = 1 << 0;
pub const ICR_TXQE: u32 = 1 << 1;
pub const ICR_LSC: u32 = 1 << 2;
pub const ICR_RXSEQ: u32 = 1 << 3;
pub const ICR_RXDMT0: u32 = 1 << 4;
pub const ICR_RXO: u32 = 1 << 6;
pub const ICR_RXT0: u32 = 1 << 7;
pub const ICR_MDAC: u32 = 1 << 9;
pub const ICR_RXCFG: u32 = 1 << 10;
pub const ICR_TXD_LOW: u32 = 1 << 15;
pub const ICR_SRPD: u32 = 1 << 16;
/// Every cause the 82540EM has.
pub const ICR_ALL: u32 = 0x0001_F6DF;

/// RCTL bits and fields.
pub const RCTL_EN: u32 = 1 << 1;
pub const RCTL_SBP: u32 = 1 << 2;
pub const RCTL_UPE: u32 = 1 << 3;
pub const RCTL_MPE: u32 = 1 << 4;
pub const RCTL_LPE: u32 = 1 << 5;
pub const RCTL_RDMTS_SHIFT: u32 = 8;
pub const RCTL_MO_SHIFT: u32 = 12;
pub const RCTL_BAM: u32 = 1 << 15;
pub const RCTL_BSIZE_SHIFT: u32 = 16;
pub const RCTL_BSEX: u32 = 1 << 25;
pub const RCTL_SECRC: u32 = 1 << 26;

/// TCTL bits.
pub const TCTL_EN: u32 = 1 << 1;
pub const TCTL_PSP: u32 = 1 << 3;

/// RAH: Address Valid, Address Select (0: destination address).
pub const RAH_AV: u32 = 1 << 31;
pub const RAH_ASEL_MASK: u32 = 0b11 << 16;

/// Ring length registers keep bits 19:7 (a multiple of 128 bytes, eight descriptors).
pub const RING_LEN_MASK: u32 = 0x000F_FF80;
/// Head and tail registers are 16 bits wide.
pub const RING_INDEX_MASK: u32 = 0xFFFF;
/// Ring base low registers keep 16-byte alignment.
pub const RING_BASE_LOW_MASK: u32 = !0xF;

/// Bytes of a legacy descriptor (receive or transmit).
pub const DESC_SIZE: u64 = 16;

/// Transmit descriptor command bits.
pub const TXD_CMD_EOP: u8 = 1 << 0;
pub const TXD_CMD_IFCS: u8 = 1 << 1;
pub const TXD_CMD_RS: u8 = 1 << 3;
pub const TXD_CMD_DEXT: u8 = 1 << 5;
/// Descriptor status: Descriptor Done.
pub const DESC_STA_DD: u8 = 1 << 0;
/// Receive descriptor status: End Of Packet.
pub const RXD_STA_EOP: u8 = 1 << 1;
