//! The console: the VMM's shared log ring under ddvm (no exit per byte), COM1 otherwise.
//!
//! Output is unbuffered and unlocked: the guest has one CPU and runs with interrupts off, so
//! writers never interleave except a panic in the middle of a line.

use core::fmt::{self, Write};
use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};

use ddvm_abi::boot::BootInfo;
use ddvm_abi::log::{LogHeader, LOG_HEADER_SIZE, LOG_HEAD_OFFSET, LOG_MAGIC};
use ddvm_abi::port::SERIAL_COM1;

use crate::arch::io::Port;
use crate::shared::{publish_fence, SharedRegion};

/// Log ring base address (0: serial), data size, and the guest's private head.
static RING_BASE: AtomicU64 = AtomicU64::new(0);
static RING_DATA_SIZE: AtomicU64 = AtomicU64::new(0);
static RING_HEAD: AtomicU64 = AtomicU64::new(0);

/// Where the console writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// The shared log ring.
    LogRing,
    /// COM1.
    Serial,
}

/// Chooses the sink: the log ring when the boot info names one whose header the VMM
/// initialised correctly, else COM1. Boot only.
pub(crate) fn init(info: &BootInfo) {
    if info.log_ring == 0 {
        return;
    }
    // SAFETY: boot validated `log_ring..log_ring + max(log_ring_size, header)` as RAM outside
    // the image; the VMM gave it to the guest as the log ring.
    let ring = unsafe { SharedRegion::new(info.log_ring, info.log_ring_size.max(LOG_HEADER_SIZE)) };
    let header: LogHeader = ring.read(0);
    let data_size = u64::from(header.data_size);
    let fits = LOG_HEADER_SIZE
        .checked_add(data_size)
        .is_some_and(|end| end <= info.log_ring_size);
    if header.magic != LOG_MAGIC || data_size == 0 || !fits {
        crate::println!(
            "console: log ring at {:#x} is invalid (magic {:#x} data_size {}), using serial",
            info.log_ring,
            header.magic,
            header.data_size
        );
        return;
    }
    RING_HEAD.store(header.head, Ordering::Relaxed);
    RING_DATA_SIZE.store(data_size, Ordering::Relaxed);
    RING_BASE.store(info.log_ring, Ordering::Release);
}

/// The current sink.
pub fn sink() -> Sink {
    if RING_BASE.load(Ordering::Acquire) != 0 {
        Sink::LogRing
    } else {
        Sink::Serial
    }
}

/// Writes raw bytes to the console.
pub fn write_bytes(bytes: &[u8]) {
    let base = RING_BASE.load(Ordering::Acquire);
    if base == 0 {
        bytes.iter().for_each(|&b| serial_write(b));
        return;
    }
    let size = RING_DATA_SIZE.load(Ordering::Relaxed);
    // SAFETY: `init` validated the header and that `LOG_HEADER_SIZE + size` bytes at `base` lie
    // in the log ring.
    let ring = unsafe { SharedRegion::new(base, LOG_HEADER_SIZE + size) };
    let mut head = RING_HEAD.load(Ordering::Relaxed);
    for &b in bytes {
        ring.write(LOG_HEADER_SIZE + head % size, b);
        head = head.wrapping_add(1);
    }
    // The bytes before the head that publishes them.
    publish_fence();
    ring.write(LOG_HEAD_OFFSET, head);
    RING_HEAD.store(head, Ordering::Relaxed);
}

const _: () = assert!(LOG_HEAD_OFFSET as usize + size_of::<u64>() <= LOG_HEADER_SIZE as usize);

/// Line status register offset and its "transmit holding register empty" bit.
const LSR: u16 = 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// Polls of LSR before writing anyway (a missing UART reads all ones; a stuck one must not hang).
const LSR_POLLS: u32 = 1_000;

/// Whether to poll the UART's status before each byte: not under the ddvm VMM, whose UART is
/// always ready and where each poll is an exit; elsewhere (QEMU, or before the boot info is
/// taken) yes.
fn poll_uart() -> bool {
    let info = crate::boot::info();
    !info.is_valid() || info.platform() == ddvm_abi::boot::Platform::QemuPvh
}

fn serial_write(b: u8) {
    // SAFETY: COM1 is a UART: reading its status and writing its data register cannot touch
    // memory.
    let (data, status) = unsafe {
        (
            Port::<u8>::new(SERIAL_COM1),
            Port::<u8>::new(SERIAL_COM1 + LSR),
        )
    };
    if b == b'\n' {
        serial_write(b'\r');
    }
    if poll_uart() {
        for _ in 0..LSR_POLLS {
            if status.read() & LSR_THR_EMPTY != 0 {
                break;
            }
        }
    }
    data.write(b);
}

/// A `core::fmt::Write` handle on the console.
#[derive(Debug, Default)]
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    // Writing to the console cannot fail.
    let _ = Console.write_fmt(args);
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::console::_print(format_args!($($arg)*)));
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::console::_print(format_args!("{}\n", format_args!($($arg)*))));
}
