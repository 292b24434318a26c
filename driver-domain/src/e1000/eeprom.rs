//! Reading the EEPROM, where the factory MAC address is (words 0–2, low byte first).
//!
//! The 82540 and 82545 read a word for the driver through EERD (start, poll DONE). The 82544
//! has no EERD: the driver bit-bangs the Microwire protocol through EECD (chip select, then
//! the READ opcode 110b and the word address clocked in on rising edges of SK, then 16 data
//! bits clocked out, most significant first). Every wait is bounded.

#![forbid(unsafe_code)]

use guest_kernel::time::{self, Instant};

use super::error::E1000Error;
use super::probe::Model;
use super::regs::{eecd, eerd, Registers, EECD, EERD};

/// How long one EERD read may take (the manual gives no bound; real parts take microseconds).
const EERD_TIMEOUT_US: u64 = 10_000;
/// Half a Microwire clock period: the EEPROMs on these boards run at up to 1 MHz.
const MICROWIRE_HALF_CLOCK_US: u64 = 2;
/// Microwire READ opcode (start bit 1, then 10b).
const MICROWIRE_READ: u16 = 0b110;
/// EECD: a 256-word EEPROM (8 address bits) rather than a 64-word one (6), on Microwire parts.
const EECD_SIZE: u32 = 1 << 9;

/// Whether the part reports an EEPROM (EECD.PRES).
pub fn present(regs: &Registers) -> bool {
    regs.read(EECD) & eecd::PRES != 0
}

/// Reads EEPROM word `word` the way `model` offers.
pub fn read_word(regs: &Registers, model: Model, word: u8) -> Result<u16, E1000Error> {
    if model.has_eerd() {
        read_eerd(regs, word)
    } else {
        Ok(read_microwire(regs, word))
    }
}

fn read_eerd(regs: &Registers, word: u8) -> Result<u16, E1000Error> {
    regs.write(EERD, eerd::START | u32::from(word) << eerd::ADDR_SHIFT);
    let start = Instant::now();
    loop {
        let v = regs.read(EERD);
        if v & eerd::DONE != 0 {
            return Ok((v >> eerd::DATA_SHIFT) as u16);
        }
        let us = start.elapsed_us();
        if us > EERD_TIMEOUT_US {
            return Err(E1000Error::EepromTimeout { word, us });
        }
        core::hint::spin_loop();
    }
}

fn read_microwire(regs: &Registers, word: u8) -> u16 {
    let idle = regs.read(EECD) & !(eecd::SK | eecd::CS | eecd::DI);
    let address_bits = if idle & EECD_SIZE != 0 { 8 } else { 6 };
    let set = |bits: u32| {
        regs.write(EECD, idle | bits);
        time::delay_us(MICROWIRE_HALF_CLOCK_US);
    };
    set(0);
    set(eecd::CS);
    let shift_out = |value: u16, bits: u32| {
        for i in (0..bits).rev() {
            let di = if value >> i & 1 != 0 { eecd::DI } else { 0 };
            set(eecd::CS | di);
            set(eecd::CS | di | eecd::SK);
            set(eecd::CS | di);
        }
    };
    shift_out(MICROWIRE_READ, 3);
    shift_out(u16::from(word), address_bits);
    let mut data = 0u16;
    for _ in 0..16 {
        set(eecd::CS | eecd::SK);
        let bit = regs.read(EECD) & eecd::DO != 0;
        data = data << 1 | u16::from(bit);
        set(eecd::CS);
    }
    set(0);
    data
}
