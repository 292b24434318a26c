//! The readers of what a guest writes for the VMM to read: the console log ring
//! (`ddvm::console::LogReader`) and the panic record (`ddvm::vcpu::read_panic`).
//!
//! Input: a ring size byte, then ops. `op % 4`: 0 writes bytes into the ring's data area at
//! an offset, 1 sets the guest's head, 2 drains, 3 writes a panic record (its bytes) and
//! reads it as the panic port's value would make the VMM read it.
//!
//! Checked: each drain hands the console exactly what the ring's arithmetic allows (the
//! bytes between the reader and the head, at most a ring's worth, the rest counted lost; a
//! head that went backwards yields nothing), and a panic report's message is one printable
//! line no longer than the record's message area.

use ddvm::console::{Console, Echo, LogReader};
use ddvm::vcpu::{read_panic, GuestExit};
use ddvm_abi::log::{LOG_HEADER_SIZE, LOG_HEAD_OFFSET};
use ddvm_abi::panic::{PanicRecord, PANIC_MAGIC, PANIC_MSG_MAX};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::{guest_memory, Input, Seed};

const BASE: u64 = ddvm_abi::layout::LOG_RING;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest_memory(1 << 20);
    let size = LOG_HEADER_SIZE + 16 * (1 + u64::from(input.u8()));
    let data_size = size - LOG_HEADER_SIZE;
    let console = Console::new("fuzz", Echo::Off);
    let mut reader = LogReader::create(&mem, BASE, size).expect("ring in memory");
    // The model: where the reader is, what it has handed over and counted lost.
    let (mut read, mut total, mut lost) = (0u64, 0u64, 0u64);
    let mut head = 0u64;
    let mut ops = 0;
    while !input.is_empty() && ops < 1024 {
        ops += 1;
        match input.u8() % 4 {
            0 => {
                let at = u64::from(input.u16()) % data_size;
                let bytes = input.blob();
                let n = bytes.len().min((data_size - at) as usize);
                mem.write_slice(&bytes[..n], GuestAddress(BASE + LOG_HEADER_SIZE + at))
                    .expect("in the ring");
            }
            1 => {
                head = input.u64();
                mem.write_obj(head, GuestAddress(BASE + LOG_HEAD_OFFSET))
                    .expect("in the ring");
            }
            2 => {
                reader.drain(&mem, &console);
                if head >= read {
                    let pending = head - read;
                    total += pending.min(data_size);
                    lost = lost.saturating_add(pending.saturating_sub(data_size));
                }
                read = head;
                assert_eq!(console.counts(), (total, lost), "head {head}");
            }
            _ => {
                let value = u32::from(input.u8() % 4);
                let mut record = PanicRecord::default();
                let bytes = input.blob();
                let n = bytes.len().min(record.as_slice().len());
                record.as_mut_slice()[..n].copy_from_slice(&bytes[..n]);
                if input.u8() & 1 == 1 {
                    record.magic = PANIC_MAGIC;
                }
                mem.write_obj(record, GuestAddress(ddvm_abi::layout::PANIC_RECORD))
                    .expect("in memory");
                let exit = read_panic(&mem, value);
                assert!(exit.is_crash() || matches!(exit, GuestExit::BadPanicReport { .. }));
                if let GuestExit::Panicked { message } = &exit {
                    assert!(message.chars().count() <= PANIC_MSG_MAX);
                    assert!(!message.chars().any(char::is_control), "{message:?}");
                }
                assert!(!exit.to_string().contains('\n'));
            }
        }
    }
}

/// Seeds: lines written and drained across the wrap, a writer that laps the reader, a head
/// that goes backwards, a panic and an exception.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut s = Seed::new();
    s.u8(0); // 16-byte ring
    s.u8(0).u16(0).blob(b"hello\n");
    s.u8(1).u64(6);
    s.u8(2);
    s.u8(0).u16(6).blob(b"0123456789");
    s.u8(0).u16(0).blob(b"ab\n");
    s.u8(1).u64(19);
    s.u8(2);
    s.u8(1).u64(100);
    s.u8(2);
    s.u8(1).u64(3);
    s.u8(2);
    let ring = s.finish();

    let mut record = PanicRecord {
        magic: PANIC_MAGIC,
        kind: 1,
        msg_len: 11,
        ..Default::default()
    };
    record.msg[..11].copy_from_slice(b"panicked!\n\x1b");
    let mut p = Seed::new();
    p.u8(3);
    p.u8(3).u8(1).blob(record.as_slice()).u8(1);
    let exception = PanicRecord {
        magic: PANIC_MAGIC,
        kind: 2,
        vector: 14,
        rip: 0x10_0000,
        cr2: 0xdead_0000,
        ..Default::default()
    };
    p.u8(3).u8(2).blob(&exception.as_slice()[..64]).u8(1);
    vec![("ring".into(), ring), ("panic".into(), p.finish())]
}
