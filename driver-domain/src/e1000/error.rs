//! Why the e1000 driver stops. Each is fatal for the domain, like the NVMe driver's errors: the
//! device is broken or gone, and the supervisor restarts the domain.

#![forbid(unsafe_code)]

use core::fmt;

/// A fatal e1000 driver error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E1000Error {
    /// The register window (BAR0) is smaller than the registers the driver needs.
    BarTooSmall {
        /// Window length.
        len: u64,
        /// Bytes needed.
        need: u64,
    },
    /// STATUS reads all ones: the device is gone.
    NotResponding,
    /// CTRL.RST did not clear.
    ResetTimeout {
        /// Time waited.
        us: u64,
    },
    /// An EEPROM read did not finish (EERD.DONE never set).
    EepromTimeout {
        /// Word read.
        word: u8,
        /// Time waited.
        us: u64,
    },
    /// Neither the EEPROM nor RAR0 holds a usable unicast MAC address.
    NoMacAddress,
    /// A transmit descriptor was not written back in time while the link was up.
    TxTimeout {
        /// Its ring index.
        index: u16,
        /// Time waited.
        ms: u64,
    },
    /// The heap could not hold the descriptor rings.
    OutOfMemory,
}

impl fmt::Display for E1000Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            E1000Error::BarTooSmall { len, need } => write!(
                f,
                "e1000: register window of {len:#x} bytes, the driver needs {need:#x}"
            ),
            E1000Error::NotResponding => {
                write!(f, "e1000: device not responding (STATUS reads all ones)")
            }
            E1000Error::ResetTimeout { us } => {
                write!(f, "e1000: CTRL.RST did not clear within {us} us")
            }
            E1000Error::EepromTimeout { word, us } => {
                write!(f, "e1000: EEPROM word {word} not read within {us} us")
            }
            E1000Error::NoMacAddress => {
                write!(f, "e1000: no valid MAC address in the EEPROM or RAR0")
            }
            E1000Error::TxTimeout { index, ms } => write!(
                f,
                "e1000: transmit descriptor {index} not written back within {ms} ms with the \
                 link up"
            ),
            E1000Error::OutOfMemory => write!(f, "e1000: out of memory for descriptor rings"),
        }
    }
}
