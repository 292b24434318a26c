//! x86-64 machine setup for the direct 64-bit entry: page tables, GDT, registers, boot info.
//!
//! The guest starts in long mode with paging on, an identity map of the first 4 GiB in 2 MiB
//! pages with U/S set at every level (PVM runs guests at hardware CPL 3 and livelocks on shadow
//! page faults otherwise; elsewhere the bit is harmless), and a GDT whose selector 0x10 is 64-bit
//! code. The register values are the ones measured to run natively on PVM (see
//! `docs/ARCHITECTURE.md`, "Platforms").

use ddvm_abi::boot::{BootInfo, ENTRY_MAGIC};
use ddvm_abi::layout::{self, pte};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::memory::GuestMem;

/// CR0: PG | AM | WP | NE | ET | MP | PE.
pub const CR0: u64 = 0x8005_0033;
/// CR4: OSXMMEXCPT | OSFXSR | PAE.
pub const CR4: u64 = 0x620;
/// EFER: NXE | LMA | LME | SCE.
pub const EFER: u64 = 0xd01;
/// Initial stack pointer: below the image, in memory the layout leaves free.
pub const INITIAL_RSP: u64 = layout::IMAGE_BASE;

/// Writes the entry GDT and the identity-map page tables.
pub fn write_page_tables_and_gdt(mem: &GuestMem) -> Result<(), GuestMemoryError> {
    for (i, entry) in layout::GDT_ENTRIES.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT + 8 * i as u64))?;
    }
    mem.write_obj(layout::PDPT | pte::TABLE, GuestAddress(layout::PML4))?;
    let directories = layout::IDENTITY_MAPPED >> 30;
    let mut pd = Vec::with_capacity(layout::PAGE_SIZE as usize);
    for d in 0..directories {
        let pd_gpa = layout::PD + d * layout::PAGE_SIZE;
        mem.write_obj(pd_gpa | pte::TABLE, GuestAddress(layout::PDPT + 8 * d))?;
        pd.clear();
        for i in 0..512u64 {
            let leaf = ((d << 30) + (i << 21)) | pte::LEAF_2M;
            pd.extend_from_slice(&leaf.to_le_bytes());
        }
        mem.write_slice(&pd, GuestAddress(pd_gpa))?;
    }
    Ok(())
}

/// Writes the boot info and the command line.
pub fn write_boot_info(
    mem: &GuestMem,
    info: &BootInfo,
    cmdline: &str,
) -> Result<(), GuestMemoryError> {
    mem.write_obj(*info, GuestAddress(layout::BOOT_INFO))?;
    mem.write_slice(
        cmdline.as_bytes(),
        GuestAddress(layout::BOOT_INFO + layout::CMDLINE_OFFSET),
    )
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xfffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for the 64-bit entry, starting from the vCPU's current ones.
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = segment(layout::SEL_CODE64, 0xb, true);
    let data = segment(layout::SEL_DATA, 0x3, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        type_: 11,
        present: 1,
        limit: 0x67,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    s.gdt.base = layout::GDT;
    s.gdt.limit = (8 * layout::GDT_ENTRIES.len() - 1) as u16;
    // No IDT until the guest installs its own: an exception before that is a triple fault,
    // which the VMM sees as a shutdown exit and reports as a crash.
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0;
    s.cr3 = layout::PML4;
    s.cr4 = CR4;
    s.efer = EFER;
    s
}

/// General registers for the 64-bit entry.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rdi: layout::BOOT_INFO,
        rsi: ENTRY_MAGIC,
        rsp: INITIAL_RSP,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map_has_user_bit_at_every_level_and_covers_4_gib() {
        let mem = crate::memory::create(2 << 20, 1 << 30).unwrap();
        write_page_tables_and_gdt(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4)).unwrap();
        assert_eq!(pml4, layout::PDPT | 0x7);
        for d in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(layout::PDPT + 8 * d)).unwrap();
            assert_eq!(pdpte & 0x7, 0x7, "PDPT entry {d} lacks P/RW/US");
            let pd = pdpte & !0xfff;
            for i in [0u64, 1, 511] {
                let e: u64 = mem.read_obj(GuestAddress(pd + 8 * i)).unwrap();
                assert_eq!(e, ((d << 30) + (i << 21)) | 0x87);
            }
        }
        let unused: u64 = mem.read_obj(GuestAddress(layout::PDPT + 8 * 4)).unwrap();
        assert_eq!(unused, 0);
    }

    #[test]
    fn sregs_are_the_measured_long_mode_values() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(
            (s.cr0, s.cr4, s.efer, s.cr3),
            (CR0, CR4, EFER, layout::PML4)
        );
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!((s.cs.l, s.cs.dpl, s.cs.type_), (1, 0, 0xb));
        assert_eq!(s.gdt.limit, 31);
    }
}
