//! The 8254x registers the driver uses (offsets into BAR0) and their bits, as the 8254x
//! Family of Gigabit Ethernet Controllers Software Developer's Manual names them.

#![forbid(unsafe_code)]

use guest_kernel::mmio::MmioRegion;

/// Device Control.
pub const CTRL: u64 = 0x0000;
/// Device Status.
pub const STATUS: u64 = 0x0008;
/// EEPROM/Flash Control and Data (bit-banged EEPROM access).
pub const EECD: u64 = 0x0010;
/// EEPROM Read (82540/82545/82546: the device reads one word).
pub const EERD: u64 = 0x0014;
/// Flow Control Address Low.
pub const FCAL: u64 = 0x0028;
/// Flow Control Address High.
pub const FCAH: u64 = 0x002c;
/// Flow Control Type.
pub const FCT: u64 = 0x0030;
/// VLAN Ether Type.
pub const VET: u64 = 0x0038;
/// Interrupt Cause Read (clears on read).
pub const ICR: u64 = 0x00c0;
/// Interrupt Throttling.
pub const ITR: u64 = 0x00c4;
/// Interrupt Mask Set/Read.
pub const IMS: u64 = 0x00d0;
/// Interrupt Mask Clear.
pub const IMC: u64 = 0x00d8;
/// Receive Control.
pub const RCTL: u64 = 0x0100;
/// Flow Control Transmit Timer Value.
pub const FCTTV: u64 = 0x0170;
/// Transmit Control.
pub const TCTL: u64 = 0x0400;
/// Transmit Inter-Packet Gap.
pub const TIPG: u64 = 0x0410;
/// Receive Descriptor Base Address Low / High.
pub const RDBAL: u64 = 0x2800;
/// See [`RDBAL`].
pub const RDBAH: u64 = 0x2804;
/// Receive Descriptor Length (bytes, a multiple of 128).
pub const RDLEN: u64 = 0x2808;
/// Receive Descriptor Head.
pub const RDH: u64 = 0x2810;
/// Receive Descriptor Tail.
pub const RDT: u64 = 0x2818;
/// Receive Delay Timer.
pub const RDTR: u64 = 0x2820;
/// Receive Interrupt Absolute Delay Timer.
pub const RADV: u64 = 0x282c;
/// Transmit Descriptor Base Address Low / High.
pub const TDBAL: u64 = 0x3800;
/// See [`TDBAL`].
pub const TDBAH: u64 = 0x3804;
/// Transmit Descriptor Length (bytes, a multiple of 128).
pub const TDLEN: u64 = 0x3808;
/// Transmit Descriptor Head.
pub const TDH: u64 = 0x3810;
/// Transmit Descriptor Tail.
pub const TDT: u64 = 0x3818;
/// Transmit Interrupt Delay Value.
pub const TIDV: u64 = 0x3820;
/// Transmit Absolute Interrupt Delay Value.
pub const TADV: u64 = 0x382c;
/// Missed Packets Count (statistics clear on read).
pub const MPC: u64 = 0x4010;
/// Good Packets Received Count.
pub const GPRC: u64 = 0x4074;
/// Good Packets Transmitted Count.
pub const GPTC: u64 = 0x4080;
/// Multicast Table Array: [`MTA_ENTRIES`] dwords.
pub const MTA: u64 = 0x5200;
/// Dwords of the multicast table (4096 bits).
pub const MTA_ENTRIES: u64 = 128;
/// Receive Address Low of entry 0; RAH at +4; entries 8 bytes apart.
pub const RAL0: u64 = 0x5400;
/// Receive address entries (RAR0..RAR15).
pub const RAR_ENTRIES: usize = 16;
/// Bytes of the register window the driver touches (up to the end of the RAR table).
pub const WINDOW: u64 = 0x5480;

/// RAL of receive address entry `i`.
pub const fn ral(i: usize) -> u64 {
    RAL0 + 8 * i as u64
}

/// RAH of receive address entry `i`.
pub const fn rah(i: usize) -> u64 {
    ral(i) + 4
}

/// CTRL bits.
pub mod ctrl {
    /// Link Reset.
    pub const LRST: u32 = 1 << 3;
    /// Auto-Speed Detection Enable.
    pub const ASDE: u32 = 1 << 5;
    /// Set Link Up.
    pub const SLU: u32 = 1 << 6;
    /// Invert Loss-of-Signal.
    pub const ILOS: u32 = 1 << 7;
    /// Force Speed.
    pub const FRCSPD: u32 = 1 << 11;
    /// Force Duplex.
    pub const FRCDPLX: u32 = 1 << 12;
    /// Receive flow control enable.
    pub const RFCE: u32 = 1 << 27;
    /// Transmit flow control enable.
    pub const TFCE: u32 = 1 << 28;
    /// Device Reset (self-clearing).
    pub const RST: u32 = 1 << 26;
    /// VLAN Mode Enable.
    pub const VME: u32 = 1 << 30;
    /// PHY Reset: never set by this driver.
    pub const PHY_RST: u32 = 1 << 31;
}

/// STATUS bits.
pub mod status {
    /// Full duplex.
    pub const FD: u32 = 1 << 0;
    /// Link Up.
    pub const LU: u32 = 1 << 1;
    /// Speed (00 10, 01 100, 1x 1000 Mb/s).
    pub const SPEED_SHIFT: u32 = 6;
}

/// EERD bits (82540/82545/82546 layout).
pub mod eerd {
    /// Start a read.
    pub const START: u32 = 1 << 0;
    /// The read is done.
    pub const DONE: u32 = 1 << 4;
    /// Word address.
    pub const ADDR_SHIFT: u32 = 8;
    /// Data read.
    pub const DATA_SHIFT: u32 = 16;
}

/// EECD bits (Microwire EEPROM).
pub mod eecd {
    /// Clock input to the EEPROM.
    pub const SK: u32 = 1 << 0;
    /// Chip select.
    pub const CS: u32 = 1 << 1;
    /// Data input to the EEPROM.
    pub const DI: u32 = 1 << 2;
    /// Data output from the EEPROM.
    pub const DO: u32 = 1 << 3;
    /// An EEPROM is present.
    pub const PRES: u32 = 1 << 8;
}

/// Interrupt causes (ICR, IMS, IMC).
pub mod int {
    /// Transmit descriptor written back.
    pub const TXDW: u32 = 1 << 0;
    /// Link status change.
    pub const LSC: u32 = 1 << 2;
    /// Receive timer: a frame was received.
    pub const RXT0: u32 = 1 << 7;
    /// Every cause.
    pub const ALL: u32 = u32::MAX;
}

/// RCTL bits.
pub mod rctl {
    /// Receiver enable.
    pub const EN: u32 = 1 << 1;
    /// Unicast promiscuous.
    pub const UPE: u32 = 1 << 3;
    /// Multicast promiscuous.
    pub const MPE: u32 = 1 << 4;
    /// Broadcast accept mode.
    pub const BAM: u32 = 1 << 15;
    /// Buffer size 2048 bytes (BSIZE 00, BSEX 0).
    pub const BSIZE_2048: u32 = 0;
    /// Strip the Ethernet CRC.
    pub const SECRC: u32 = 1 << 26;
}

/// TCTL bits and fields.
pub mod tctl {
    /// Transmitter enable.
    pub const EN: u32 = 1 << 1;
    /// Pad short packets.
    pub const PSP: u32 = 1 << 3;
    /// Collision threshold (the manual's recommended 0x0f).
    pub const CT: u32 = 0x0f << 4;
    /// Collision distance, full duplex (0x40 byte times).
    pub const COLD: u32 = 0x40 << 12;
}

/// TIPG for copper 82540/82544/82545 parts: IPGT 10, IPGR1 8, IPGR2 6.
pub const TIPG_COPPER: u32 = 10 | 8 << 10 | 6 << 20;

/// RAH bit: the entry is valid.
pub const RAH_AV: u32 = 1 << 31;

/// The register window behind BAR0.
#[derive(Clone, Copy, Debug)]
pub struct Registers(MmioRegion);

impl Registers {
    /// The registers in `window` (checked by the caller to cover [`WINDOW`]).
    pub fn new(window: MmioRegion) -> Self {
        Registers(window)
    }

    /// Reads the register at `offset`.
    pub fn read(&self, offset: u64) -> u32 {
        self.0.read_only::<u32>(offset).read()
    }

    /// Writes the register at `offset`.
    pub fn write(&self, offset: u64, value: u32) {
        self.0.write_only::<u32>(offset).write(value)
    }
}
