//! Completion interrupts through MSI-X.
//!
//! A driver domain never takes an interrupt (it runs with interrupts off): a message from its
//! device is what ends its wait in the VMM. The driver polls while it has work; when it
//! waits with commands in flight, the I/O completion queue's vector wakes it, so the wait
//! need not time out. Under ddvm the VMM emulates the MSI-X table whatever the device (the
//! emulated controller, or a real one through VFIO) and only its mask bits matter; a real
//! message (QEMU's NVMe under a PVH boot) goes to the local APIC, where, with interrupts off,
//! it stays pending and harms nothing.
//!
//! Everything comes from the function's MSI-X capability (the table's BAR and offset), never
//! from a device's known layout. A device without MSI-X, with its table in a BAR the driver
//! did not map, or with too few vectors, is driven without interrupts (timed waits).

use guest_kernel::mmio::MmioRegion;
use guest_kernel::pci::{self, msix, Bdf, MemoryBar};

/// The vector of the I/O completion queue. Vector 0, the admin queue's, stays masked: the
/// driver polls its admin commands.
pub const IO_VECTOR: u16 = 1;
/// Message address: the local APIC's MSI window (destination 0).
const MSI_ADDRESS: u64 = 0xfee0_0000;
/// Message data: fixed delivery, edge, vector 0x30 (never unmasked in the guest: interrupts
/// stay off).
const MSI_DATA: u32 = 0x30;

/// Sets up [`IO_VECTOR`] on the function at `bdf` whose BAR `bar` is mapped as `registers`:
/// programs and unmasks its table entry, then sets MSI-X Enable. Returns the vector for the
/// I/O completion queue, or `None` when the function cannot interrupt this driver.
/// Configuration accesses: the capability walk (three reads on a function whose MSI-X
/// capability is its second), one read of the table's location, one write of Message
/// Control; two MMIO writes to the table.
pub fn enable(bdf: Bdf, bar: &MemoryBar, registers: &MmioRegion) -> Option<u16> {
    let cap = pci::msix_capability(bdf)?;
    if cap.vectors <= IO_VECTOR || cap.table_bar != bar.index {
        return None;
    }
    let entry = u64::from(cap.table_offset) + u64::from(IO_VECTOR) * msix::ENTRY_SIZE;
    if entry + msix::ENTRY_SIZE > registers.len() {
        return None;
    }
    // The entry is masked (power-on) while its address is written; the second write sets
    // the data and clears Vector Control's mask bit.
    registers
        .read_write::<u64>(entry + msix::ADDRESS)
        .write(MSI_ADDRESS);
    registers
        .read_write::<u64>(entry + msix::DATA)
        .write(u64::from(MSI_DATA));
    pci::set_msix_control(bdf, &cap, true, false);
    Some(IO_VECTOR)
}
