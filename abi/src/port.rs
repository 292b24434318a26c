//! I/O ports of the ddvm machine. Each access is a VM exit (tens of µs on PVM): none of them is
//! on a hot path.

/// COM1, a 16550 UART. The early console, and the only console under QEMU.
pub const SERIAL_COM1: u16 = 0x3f8;
/// Number of ports of a 16550 UART.
pub const SERIAL_LEN: u16 = 8;

/// Exit port, compatible with QEMU's `isa-debug-exit` device at its default `iobase`: a 32-bit
/// write stops the machine with that status. 0 means success. Under QEMU the process exits
/// with `(status << 1) | 1`.
pub const EXIT: u16 = 0xf4;

/// Panic port: a 32-bit write of a [`crate::panic::PanicKind`] after the guest has filled its
/// panic record (see [`crate::panic`]). The guest never runs again after it.
pub const PANIC: u16 = 0x500;

/// Wait port: a 32-bit write of a timeout in microseconds (0: no timeout) tells the VMM the
/// guest has nothing to do. The VMM blocks the vCPU until something arrives for the guest (a
/// kick), or the timeout passes, then resumes it.
pub const WAIT: u16 = 0x504;

/// Notify port: a 32-bit write tells the VMM the domain published completions. Written only
/// while the VMM asks for it (`channel::vmm_flags::NOTIFY_ME`); served in the kernel through an
/// ioeventfd (~23 µs on PVM instead of ~70 µs for an exit to the VMM's userspace).
pub const NOTIFY: u16 = 0x508;

/// Standby port: a 32-bit write (value ignored) by a domain booted as a warm standby
/// (`standby` on its command line), before it looks for its device. The VMM holds the vCPU
/// until it hands the domain its device, or stops it; a restart then costs only the device's
/// bring-up. Any other domain's write returns at once.
pub const STANDBY: u16 = 0x50c;

/// Longest wait the VMM honours, in microseconds; longer requests are clamped.
pub const WAIT_MAX_US: u32 = 1_000_000;

/// PCI configuration mechanism #1: address register.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// PCI configuration mechanism #1: data window (4 ports).
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
