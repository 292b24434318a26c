//! The two ways into an image, and the PVH note.
//!
//! **ddvm 64-bit entry** (`_start`, the ELF entry point). The VMM enters in long mode at
//! (virtual) CPL 0 with its identity map of 0..4 GiB loaded, its GDT (code 0x10, data 0x18),
//! interrupts off, `rdi` = boot info address, `rsi` = [`ddvm_abi::boot::ENTRY_MAGIC`], and no
//! stack. The entry zeroes `.bss`, switches to the image's own stack and calls
//! [`crate::start::kernel_entry`]. It keeps the VMM's page tables: on PVM, native execution
//! depends on them (U/S at every level) and every privileged instruction is an exit.
//!
//! **PVH entry** (`_start_pvh`, named by the Xen `PHYS32_ENTRY` note; QEMU's `-kernel`). QEMU
//! enters in 32-bit protected mode, paging off, `ebx` = `hvm_start_info` address. The
//! trampoline zeroes `.bss`, builds an identity map of 4 GiB in `.bss` (2 MiB pages, U/S at
//! every level like the VMM's), enables long mode with the register values ddvm uses, loads the
//! guest GDT and far-jumps to 64-bit code, which calls `kernel_entry` with the `hvm_start_info`
//! address.

use core::arch::global_asm;

use ddvm_abi::layout::{pte, SEL_CODE64, SEL_DATA};

use super::descriptors::GDT;

/// `kernel_entry`'s third argument on the ddvm path.
pub(crate) const ENTRY_DDVM: u64 = 0;
/// `kernel_entry`'s third argument on the PVH path.
pub(crate) const ENTRY_PVH: u64 = 1;

/// Bytes of the boot stack.
const STACK_SIZE: usize = 64 * 1024;

/// CR0 = PG | AM | WP | NE | ET | MP | PE, as ddvm sets it.
const CR0: u32 = 0x8005_0033;
/// CR4 = OSXMMEXCPT | OSFXSR | PAE, as ddvm sets it.
const CR4: u32 = 0x620;
/// EFER bits to set: NXE | LME | SCE (the CPU sets LMA).
const EFER_SET: u32 = 0x901;
/// `IA32_EFER`.
const MSR_EFER: u32 = 0xc000_0080;
/// Xen ELF note type of the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

global_asm!(
    r#"
    .pushsection .text.entry, "ax"

    .code64
    .globl _start
    .type _start, @function
_start:
    cld
    mov r12, rdi
    mov r13, rsi
    /* Zero .bss: loaders do not (it holds the stack, so before any push). */
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb
    mov rsp, offset ddvm_stack_top
    xor ebp, ebp
    mov rdi, r12
    mov rsi, r13
    mov edx, {entry_ddvm}
    call {kernel_entry}
    ud2
    .size _start, . - _start

    .code32
    .globl _start_pvh
    .type _start_pvh, @function
_start_pvh:
    cli
    cld
    mov esi, ebx
    /* Zero .bss first: the page tables and the stack live there. */
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb
    mov esp, offset ddvm_stack_top

    /* PML4[0] -> PDPT; PDPT[0..4] -> the four page directories. */
    mov eax, offset ddvm_pvh_pdpt + {table}
    mov dword ptr [ddvm_pvh_pml4], eax
    xor ecx, ecx
.Lpvh_pdpt_loop:
    mov eax, ecx
    shl eax, 12
    add eax, offset ddvm_pvh_pd + {table}
    mov dword ptr [ddvm_pvh_pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jb .Lpvh_pdpt_loop
    /* 2048 2 MiB leaves: entry i maps i << 21. */
    xor ecx, ecx
.Lpvh_pd_loop:
    mov eax, ecx
    shl eax, 21
    or eax, {leaf}
    mov dword ptr [ddvm_pvh_pd + ecx * 8], eax
    mov eax, ecx
    shr eax, 11
    mov dword ptr [ddvm_pvh_pd + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 2048
    jb .Lpvh_pd_loop

    mov eax, offset ddvm_pvh_pml4
    mov cr3, eax
    mov eax, {cr4}
    mov cr4, eax
    mov ecx, {msr_efer}
    rdmsr
    or eax, {efer_set}
    wrmsr
    lgdt [ddvm_pvh_gdt_pointer]
    mov eax, {cr0}
    mov cr0, eax
    /* Far return into 64-bit code (push selector, push target, retf). */
    mov eax, {sel_code}
    push eax
    mov eax, offset .Lpvh_long_mode
    push eax
    retf

    .code64
.Lpvh_long_mode:
    mov eax, {sel_data}
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov fs, eax
    mov gs, eax
    mov rsp, offset ddvm_stack_top
    xor ebp, ebp
    mov edi, esi
    xor esi, esi
    mov edx, {entry_pvh}
    call {kernel_entry}
    ud2
    .size _start_pvh, . - _start_pvh

    /* lgdt operand for 32-bit mode: limit, 32-bit base. */
    .section .rodata.ddvm_pvh_gdt_pointer, "a"
    .balign 8
ddvm_pvh_gdt_pointer:
    .word 4 * 8 - 1
    .long {gdt}

    .section .bss.ddvm_stack, "aw", @nobits
    .balign 16
ddvm_stack_bottom:
    .skip {stack_size}
ddvm_stack_top:

    .section .bss.ddvm_pvh_tables, "aw", @nobits
    .balign 4096
ddvm_pvh_pml4:
    .skip 4096
ddvm_pvh_pdpt:
    .skip 4096
ddvm_pvh_pd:
    .skip 4 * 4096

    /* Xen PVH note: 32-bit physical entry point (QEMU's -kernel, linux-loader's PVH check). */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long {xen_phys32_entry}
    .asciz "Xen"
    .balign 4
    .quad _start_pvh
    .balign 4
    .popsection
    "#,
    kernel_entry = sym crate::start::kernel_entry,
    gdt = sym GDT,
    entry_ddvm = const ENTRY_DDVM,
    entry_pvh = const ENTRY_PVH,
    table = const pte::TABLE,
    leaf = const pte::LEAF_2M,
    cr0 = const CR0,
    cr4 = const CR4,
    efer_set = const EFER_SET,
    msr_efer = const MSR_EFER,
    sel_code = const SEL_CODE64,
    sel_data = const SEL_DATA,
    stack_size = const STACK_SIZE,
    xen_phys32_entry = const XEN_ELFNOTE_PHYS32_ENTRY,
);
