//! The VMM's ports: wait, exit, panic.

use ddvm_abi::boot::Platform;
use ddvm_abi::panic::PanicKind;
use ddvm_abi::port::{EXIT, NOTIFY, PANIC, STANDBY, WAIT, WAIT_MAX_US};

use crate::arch::{cpu, io::Port};
use crate::{boot, time};

/// Exit status of a successful run.
pub const STATUS_SUCCESS: u32 = 0;
/// Exit status after a panic, when the panic port returned (QEMU: process status 5).
pub const STATUS_PANIC: u32 = 2;
/// Exit status after an exception, when the panic port returned (QEMU: process status 7).
pub const STATUS_EXCEPTION: u32 = 3;

/// Under QEMU nobody blocks the vCPU: `wait` spins at most this long instead.
const QEMU_WAIT_US: u32 = 1_000;

/// Tells the VMM the guest has nothing to do: it blocks the vCPU until a kick or until
/// `timeout_us` passes (0: no timeout; the VMM clamps to `WAIT_MAX_US`). One exit. Under QEMU,
/// spins a little instead (never blocks for ever).
pub fn wait(timeout_us: u32) {
    if boot::platform() == Platform::QemuPvh {
        let us = if timeout_us == 0 {
            QEMU_WAIT_US
        } else {
            timeout_us.min(QEMU_WAIT_US)
        };
        time::delay_us(u64::from(us));
        return;
    }
    // SAFETY: the wait port is the VMM's; writing it touches no memory.
    let port = unsafe { Port::<u32>::new(WAIT) };
    port.write(timeout_us.min(WAIT_MAX_US));
}

/// A warm standby's one exit before it touches its device: returns when the VMM has handed
/// the domain its device (the VMM stops a standby it does not need; this never returns then).
/// Under QEMU the device is there from the start: returns at once, without an exit.
pub fn standby() {
    if boot::platform() == Platform::QemuPvh {
        return;
    }
    // SAFETY: the standby port is the VMM's; writing it touches no memory.
    let port = unsafe { Port::<u32>::new(STANDBY) };
    port.write(0);
}

/// Tells the VMM the domain published completions (the notify port, served in the VMM's
/// kernel through an ioeventfd). Only when the VMM asked for it (`vmm_flags::NOTIFY_ME`).
/// Under QEMU nothing listens: the write is ignored.
pub fn notify() {
    // SAFETY: the notify port is the VMM's; writing it touches no memory.
    let port = unsafe { Port::<u32>::new(NOTIFY) };
    port.write(1);
}

/// Stops the VM with `status` (0: success). Under QEMU's `isa-debug-exit` the process exits
/// with `(status << 1) | 1`.
pub fn exit(status: u32) -> ! {
    // SAFETY: the exit port stops the VM; it touches no guest memory.
    let port = unsafe { Port::<u32>::new(EXIT) };
    port.write(status);
    halt_forever()
}

/// Writes the panic port (the panic record must be filled first). Under ddvm it does not
/// return; under QEMU it does.
pub(crate) fn report_panic(kind: PanicKind) {
    // SAFETY: the panic port stops the VM; it touches no guest memory.
    let port = unsafe { Port::<u32>::new(PANIC) };
    port.write(kind as u32);
}

/// Halts for ever (in a loop: on PVM `hlt` may wake spuriously).
pub fn halt_forever() -> ! {
    loop {
        cpu::halt();
    }
}
