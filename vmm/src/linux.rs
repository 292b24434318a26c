//! Stock Linux client guests: what a Linux kernel needs from the machine beyond ddvm's own
//! guests.
//!
//! - The kernel is a bzImage entered through the 64-bit boot protocol (Documentation/arch/x86/
//!   boot.rst): long mode, an identity map, a GDT with `__BOOT_CS` = 0x10 and `__BOOT_DS` =
//!   0x18 (ddvm's entry GDT), `%rsi` pointing at the zero page, which carries the e820 map, the
//!   command line and the initrd.
//! - Devices are found through ACPI (hardware-reduced, as Cloud Hypervisor does it): the FADT
//!   points at a DSDT that describes each virtio-mmio window as a `LNRO0005` device (the ID
//!   Linux's `virtio_mmio` driver binds to) with its interrupt, and the MADT gives the local
//!   APIC and the I/O APIC. A stock Debian kernel has no `virtio_mmio.device=` command-line
//!   support, so ACPI is how it finds a virtio-mmio device at all.
//! - Interrupts come from KVM's in-kernel I/O APIC: each device's eventfd is an irqfd on its
//!   GSI with a resample eventfd, level-triggered and active-high ([`LevelIrq`]): the line is
//!   asserted again after each EOI while the device still has an interrupt pending.
//! - Small legacy devices a kernel touches at boot: the CMOS clock (an idle one: without it the
//!   kernel waits seconds for an update-in-progress bit), the keyboard controller's reset line
//!   (`reboot=k`), and the hardware-reduced ACPI sleep registers (`poweroff`).
//!
//! Stock kernels do not run under PVM (their page tables lack the U/S bit on kernel pages, so
//! they never reach PVM's native mode and stay in its instruction emulator), so
//! ddvm boots them only on VMX/SVM hosts, such as the TCG rig (`scripts/rig`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acpi_tables::{aml, fadt, gas, madt, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use ddvm_abi::{layout, port};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::arch;
use crate::console::Console;
use crate::devices::serial::SerialPort;
use crate::devices::{Bus, BusDevice};
use crate::hypervisor::{register_pvm_vif, Hypervisor};
use crate::loader::Loaded;
use crate::memory::GuestMem;
use crate::stats::VcpuStats;
use crate::vcpu::{self, GuestExit, Shared, VcpuContext};
use crate::vm::{self, AttachFn, Guest, GuestConfig, GuestError, GuestParts};

/// The zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x2_0000;
/// The command line.
pub const CMDLINE: u64 = 0x2_1000;
/// Longest command line (the kernel's COMMAND_LINE_SIZE on x86 is 2048, with its NUL).
pub const CMDLINE_MAX: usize = 2047;
/// Initial stack pointer (the kernel sets up its own at once).
pub const INITIAL_RSP: u64 = 0x1_f000;
/// Where the ACPI tables go: in the BIOS area (reserved in the e820 map), where the kernel
/// also looks for the RSDP if the zero page did not say.
pub const ACPI_BASE: u64 = 0xe_0000;
/// End of the ACPI area.
const ACPI_END: u64 = 0x10_0000;
/// Start of the reserved hole below 1 MiB (EBDA, option ROMs, BIOS).
const LOW_RAM_END: u64 = 0x9_fc00;
/// Start of high memory, where the kernel is loaded.
const HIGH_RAM: u64 = 0x10_0000;
/// Local APIC base.
pub const LAPIC_BASE: u32 = 0xfee0_0000;
/// I/O APIC base.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// COM1's GSI (ISA IRQ 4).
pub const SERIAL_GSI: u32 = 4;
/// COM1's ports.
const COM1: u16 = ddvm_abi::port::SERIAL_COM1;
/// CMOS ports.
pub const CMOS_PORT: u16 = 0x70;
/// The keyboard controller's data and command ports.
pub const I8042_PORT: u16 = 0x60;
/// Hardware-reduced ACPI sleep control and status registers (one byte each).
pub const SLEEP_PORT: u16 = 0x3c0;
/// Smallest memory for a Linux guest.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Most vCPUs of a Linux client: one package of cores, APIC IDs 0 to 31.
pub const MAX_VCPUS: u32 = 32;
/// The TSS area VMX needs below 4 GiB (three pages), out of the way of RAM and devices.
pub const TSS_ADDRESS: usize = 0xfffb_d000;
/// `SLP_TYP` of S5 (soft off), as the DSDT's `_S5_` gives it.
const S5_TYPE: u8 = 5;
/// `SLP_EN` in the sleep control register.
const SLP_EN: u8 = 1 << 5;

/// A stock Linux kernel to boot, with its initrd and command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    /// A bzImage with a 64-bit entry.
    pub kernel: PathBuf,
    /// An initramfs (cpio, compressed or not), if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u32,
}

/// A virtio-mmio window to describe in the DSDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

/// Why a Linux guest could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// A file could not be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// Kernel or initrd.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel is not a bzImage this loader can boot.
    #[error("kernel {path}: {message}; expected a bzImage with a 64-bit entry (boot protocol 2.12 or later)")]
    Kernel {
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The initrd does not fit.
    #[error("initrd {path}: {size} bytes do not fit in guest memory below {limit:#x} above the kernel (end {kernel_end:#x})")]
    InitrdTooLarge {
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest address the kernel accepts.
        limit: u64,
        /// Where the kernel ends.
        kernel_end: u64,
    },
    /// The command line is too long or holds a NUL.
    #[error("command line of {len} bytes; expected at most {CMDLINE_MAX} bytes without NUL")]
    Cmdline {
        /// Its length.
        len: usize,
    },
    /// A vCPU count out of range.
    #[error("{count} vCPUs; expected from 1 to {MAX_VCPUS}")]
    Vcpus {
        /// The count asked for.
        count: u32,
    },
    /// Writing into guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        /// What.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The ACPI tables do not fit their area.
    #[error("ACPI tables of {len} bytes do not fit in [{ACPI_BASE:#x}, {ACPI_END:#x})")]
    AcpiTooLarge {
        /// Their length.
        len: u64,
    },
}

/// Where the kernel was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The end of the kernel in guest memory.
    pub end: u64,
    /// Where the initrd is, and its size (0: none).
    pub initrd: (u64, u64),
}

fn mem_err(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> LinuxError {
    move |source| LinuxError::Memory { what, source }
}

/// Loads the kernel and initrd, and writes the zero page, the command line and the ACPI
/// tables that describe `devices`. The entry GDT and page tables are the caller's.
pub fn load(
    mem: &GuestMem,
    boot: &LinuxBoot,
    devices: &[MmioDevice],
) -> Result<LoadedKernel, LinuxError> {
    if boot.cmdline.len() > CMDLINE_MAX || boot.cmdline.contains('\0') {
        return Err(LinuxError::Cmdline {
            len: boot.cmdline.len(),
        });
    }
    let read_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| LinuxError::Read { what, path, source }
    };
    let kernel_err = |message: String| LinuxError::Kernel {
        path: boot.kernel.clone(),
        message,
    };
    let mut kernel = File::open(&boot.kernel).map_err(read_err("kernel", &boot.kernel))?;
    let loaded = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIGH_RAM)))
        .map_err(|e| kernel_err(e.to_string()))?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| kernel_err("no setup header".into()))?;
    // 2.12: the 64-bit entry flag (XLF_KERNEL_64) and the 64-bit zero-page fields.
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < 0x020c || xloadflags & 1 == 0 {
        return Err(kernel_err(format!(
            "boot protocol {}.{}, xloadflags {xloadflags:#x}",
            version >> 8,
            version & 0xff
        )));
    }
    let kernel_start = loaded.kernel_load.raw_value();
    // linux-loader's end is an address (where the protected-mode kernel it read ends), not
    // a size.
    let kernel_end = loaded.kernel_end;
    let ram_end = mem.last_addr().raw_value() + 1;
    // The header chooses where the kernel goes (code32_start): it must be in RAM and hold
    // the 64-bit entry (an empty kernel "loads" anywhere).
    if kernel_end > ram_end || kernel_end <= kernel_start + 0x200 {
        return Err(kernel_err(format!(
            "protected-mode kernel at [{kernel_start:#x}, {kernel_end:#x}), \
             not inside guest RAM (below {ram_end:#x}) with its 64-bit entry at +0x200"
        )));
    }

    // The initrd: as high as the kernel allows, page-aligned.
    let mut initrd = (0, 0);
    if let Some(path) = &boot.initrd {
        let data = std::fs::read(path).map_err(read_err("initrd", path))?;
        let size = data.len() as u64;
        let limit = u64::from(hdr.initrd_addr_max).min(ram_end - 1) + 1;
        let at = limit
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end.max(kernel_start + u64::from(hdr.init_size)));
        let Some(at) = at else {
            return Err(LinuxError::InitrdTooLarge {
                path: path.clone(),
                size,
                limit,
                kernel_end,
            });
        };
        mem.write_slice(&data, GuestAddress(at))
            .map_err(mem_err("initrd"))?;
        initrd = (at, size);
    }

    let mut cmdline = boot.cmdline.clone().into_bytes();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE))
        .map_err(mem_err("command line"))?;

    if !(1..=MAX_VCPUS).contains(&boot.vcpus) {
        return Err(LinuxError::Vcpus { count: boot.vcpus });
    }
    let rsdp = write_acpi(mem, devices, boot.vcpus)?;

    // The zero page: the kernel's own setup header, and what a boot loader fills in.
    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = boot.cmdline.len() as u32;
    hdr.ramdisk_image = initrd.0 as u32;
    hdr.ramdisk_size = initrd.1 as u32;
    // CAN_USE_HEAP is for the 16-bit setup code, which the 64-bit entry skips.
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let e820 = [
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, HIGH_RAM - LOW_RAM_END, E820_RESERVED),
        (HIGH_RAM, ram_end - HIGH_RAM, E820_RAM),
    ];
    for (i, (addr, size, kind)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(mem_err("zero page"))?;
    Ok(LoadedKernel {
        // The 64-bit entry is 0x200 into the protected-mode kernel.
        entry: kernel_start + 0x200,
        end: kernel_end,
        initrd,
    })
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const OEM_ID: [u8; 6] = *b"DDVM  ";
const OEM_TABLE: [u8; 8] = *b"DDVMCLNT";

/// Appends `table` at the 16-byte aligned end of `area`; returns its address.
fn place(area: &mut Vec<u8>, table: &dyn Aml) -> u64 {
    area.resize(area.len().next_multiple_of(16), 0);
    let at = ACPI_BASE + area.len() as u64;
    table.to_aml_bytes(area);
    at
}

/// The DSDT: each virtio-mmio window as an `LNRO0005` device, and `_S5_` for power-off.
fn dsdt(devices: &[MmioDevice]) -> Sdt {
    let mut body = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, d.base as u32, d.len as u32);
        // Consumer, level-triggered, active-high, exclusive: the device's line stays
        // asserted until its interrupt is acknowledged (see `LevelIrq`).
        let irq = aml::Interrupt::new(true, false, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_value = i as u32;
        let uid = aml::Name::new("_UID".into(), &uid_value);
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("_SB_.V{i:03X}");
        aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut body);
    }
    // COM1, so that the kernel's 8250 driver takes its interrupt (transmitter empty) through
    // the I/O APIC; without it, output from user space stalls.
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_io = aml::IO::new(COM1, COM1, 1, 8);
    // Level-triggered, active-high: asserted while the UART has an interrupt pending.
    let com1_irq = aml::Interrupt::new(true, false, false, false, SERIAL_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    aml::Device::new("_SB_.COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs])
        .to_aml_bytes(&mut body);
    let s5 = aml::Package::new(vec![&S5_TYPE, &S5_TYPE, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    t.append_slice(&body);
    t
}

/// Writes RSDP, XSDT, FADT, MADT (with `vcpus` local APICs) and DSDT; returns the RSDP's
/// address.
fn write_acpi(mem: &GuestMem, devices: &[MmioDevice], vcpus: u32) -> Result<u64, LinuxError> {
    // The RSDP first, at the start of the area (16-byte aligned, where a scan finds it); its
    // XSDT address is known once the rest is placed, so it is written last.
    let mut area = vec![0u8; Rsdp::len()];
    let dsdt_at = place(&mut area, &dsdt(devices));
    let sleep = |port: u16| {
        gas::GAS::new(
            gas::AddressSpace::SystemIo,
            8,
            0,
            gas::AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut fadt = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_at)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::PwrButton)
        .flag(fadt::Flags::SlpButton);
    fadt.sleep_control_reg = sleep(SLEEP_PORT);
    fadt.sleep_status_reg = sleep(SLEEP_PORT + 1);
    // IAPC_BOOT_ARCH: no VGA (bit 2), no MSI (bit 3: nothing here uses it), no CMOS RTC to
    // probe as a device (bit 5; the kernel still reads the clock's registers).
    fadt.iapc_boot_arch = (1u16 << 2 | 1 << 3 | 1 << 5).into();
    let fadt_at = place(&mut area, &fadt.finalize());
    let mut madt = madt::MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        madt::LocalInterruptController::Address(LAPIC_BASE),
    );
    // Processor UID and APIC ID both the vCPU's index: what its CPUID says ([`vcpu_cpuid`]).
    for id in 0..u8::try_from(vcpus.min(MAX_VCPUS)).unwrap_or(1) {
        madt.add_structure(madt::ProcessorLocalApic::new(
            id,
            id,
            madt::EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(madt::IoApic::new(0, IOAPIC_BASE, 0));
    let madt_at = place(&mut area, &madt);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt_at = place(&mut area, &xsdt);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_at).to_aml_bytes(&mut rsdp);
    area[..rsdp.len()].copy_from_slice(&rsdp);
    if ACPI_BASE + area.len() as u64 > ACPI_END {
        return Err(LinuxError::AcpiTooLarge {
            len: area.len() as u64,
        });
    }
    mem.write_slice(&area, GuestAddress(ACPI_BASE))
        .map_err(mem_err("ACPI tables"))?;
    Ok(ACPI_BASE)
}

/// Fits KVM's supported CPUID to vCPU `index` of `count`:
/// - CPUID.1:ECX\[31\], "running on a hypervisor": without it the kernel does not look for
///   KVM's leaves, gets no kvm-clock, and hangs calibrating its clocks (measured in the rig);
/// - the vCPU's APIC ID (= `index`, as the MADT says) in every leaf that carries one, and a
///   topology of `count` single-thread cores in one package (leaves 0xB/0x1F, and AMD's
///   0x8000_0008 and 0x8000_001E), whatever the host's own is.
pub fn vcpu_cpuid(cpuid: &mut kvm_bindings::CpuId, index: u32, count: u32) {
    // Bits of the APIC ID that number the cores of the one package.
    // APIC IDs a package of `count` cores spans, and the bits that number them.
    let slots = count.max(1).next_power_of_two();
    let shift = slots.trailing_zeros();
    for e in cpuid.as_mut_slice() {
        match (e.function, e.index) {
            (0x1, _) => {
                e.ecx |= 1 << 31;
                // Initial APIC ID (31:24) and logical processors of the package (23:16),
                // valid with HTT.
                e.ebx = (e.ebx & 0xffff) | index << 24 | slots << 16;
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            // Extended topology: SMT level of one thread, core level of `count` cores; EDX is
            // the x2APIC ID at every level.
            (0xb | 0x1f, 0) => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 1, 1 << 8, index);
            }
            (0xb | 0x1f, 1) => {
                (e.eax, e.ebx, e.ecx, e.edx) = (shift, count, 2 << 8 | 1, index);
            }
            (0xb | 0x1f, n) => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, n, index);
            }
            // AMD: cores of the package minus one, and the APIC-ID bits that number them.
            (0x8000_0008, _) => {
                e.ecx = (e.ecx & !0xf0ff) | shift << 12 | count.saturating_sub(1);
            }
            // AMD TOPOEXT: extended APIC ID, and one thread per core.
            (0x8000_001e, _) => {
                e.eax = index;
                e.ebx = (e.ebx & !0xffff) | (index & 0xff);
            }
            _ => {}
        }
    }
}

/// Programs the local APIC's LINT0 as ExtINT and LINT1 as NMI (the virtual-wire mode a BIOS
/// leaves behind), so the legacy PIC's interrupts reach the CPU until the kernel switches to
/// the I/O APIC.
pub fn virtual_wire(lapic: &mut kvm_bindings::kvm_lapic_state) {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const EXTINT: u32 = 0x7 << 8;
    const NMI: u32 = 0x4 << 8;
    for (reg, mode) in [(LVT_LINT0, EXTINT), (LVT_LINT1, NMI)] {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = lapic.regs[reg + i] as u8;
        }
        // Delivery mode is bits 8-10; everything else (mask included) is cleared.
        let v = (u32::from_le_bytes(b) & !0x1_07ff) | mode;
        for (i, byte) in v.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = byte as _;
        }
    }
}

/// The CMOS clock, idle: index register and zeroed data, except that status register B says
/// 24-hour binary mode and D says the time is valid. The kernel reads the time from it at
/// boot (kvm-clock gives the wall clock anyway) and must never see update-in-progress.
#[derive(Debug, Default)]
pub struct Cmos {
    index: u8,
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match (offset, self.index) {
            (1, 0x0b) => 0x06,
            (1, 0x0d) => 0x80,
            (1, _) => 0,
            _ => self.index,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&v)) = (offset, data.first()) {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = v & 0x7f;
        }
    }
}

/// The keyboard controller as far as a kernel resets through it: its status reads empty
/// buffers, and the reset command (0xfe on the command port) ends the guest.
pub struct I8042 {
    shared: Arc<Shared>,
}

impl I8042 {
    /// A controller whose reset stops the guest of `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        I8042 { shared }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Port 0x64 is offset 4 from 0x60.
        if offset == 4 && data.first() == Some(&0xfe) {
            self.shared.guest_stop(GuestExit::Reset);
        }
    }
}

/// The hardware-reduced ACPI sleep control (offset 0) and status (offset 1) registers:
/// entering S5 powers the guest off.
pub struct SleepControl {
    shared: Arc<Shared>,
}

impl SleepControl {
    /// Sleep registers whose power-off stops the guest of `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        SleepControl { shared }
    }
}

impl BusDevice for SleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        if offset == 0 && v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_TYPE {
            self.shared.guest_stop(GuestExit::Exited { status: 0 });
        }
    }
}

/// A device's level-triggered interrupt line on the guest's I/O APIC (as QEMU's virtio-mmio
/// lines are). An irqfd with a resample eventfd: writing `trigger` asserts the line; at the
/// guest's EOI KVM de-asserts it and signals the resample eventfd, and the line is asserted
/// again while `pending` holds. Unlike an edge, a level survives the guest masking the pin
/// for a moment (as Linux does when it reprograms one): KVM's I/O APIC drops an edge that
/// arrives on a masked pin. With edges, a 2-vCPU Linux client stopped for good now and then.
pub struct LevelIrq {
    /// The I/O APIC input.
    pub gsi: u32,
    /// Written to assert the line.
    pub trigger: EventFd,
    /// Whether the device still has an interrupt for the guest.
    pub pending: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// Registers `line` as an irqfd with a resample eventfd; returns both, for
/// [`resample_lines`].
fn register_line(vm: &VmFd, name: &str, line: LevelIrq) -> Result<(LevelIrq, EventFd), GuestError> {
    let resample = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| GuestError::Host {
        name: name.to_string(),
        what: "eventfd",
        source,
    })?;
    vm.register_irqfd_with_resample(&line.trigger, &resample, line.gsi)
        .map_err(|source| GuestError::Kvm {
            name: name.to_string(),
            what: "KVM_IRQFD (resample)",
            source,
        })?;
    Ok((line, resample))
}

/// Re-asserts level-triggered lines after each EOI while their device has an interrupt
/// pending; ends once the guest is asked to stop.
fn resample_lines(shared: &Shared, lines: Vec<(LevelIrq, EventFd)>) {
    use std::os::fd::AsRawFd;
    let fds: Vec<_> = lines.iter().map(|(_, r)| r.as_raw_fd()).collect();
    while !shared.stopping() {
        if !vcpu::wait_fds(&fds, Duration::from_millis(50)) {
            continue;
        }
        for (line, resample) in &lines {
            if resample.read().is_ok() && (line.pending)() {
                // Fails only when the counter would overflow: asserted already.
                let _ = line.trigger.write(1);
            }
        }
    }
}

/// Boots a stock Linux kernel with the devices `attach` builds: each goes on the MMIO bus
/// and into the ACPI tables, its interrupt a level-triggered line on the I/O APIC
/// ([`LevelIrq`]). `cfg.image` is not used: the kernel is `boot`'s. VMX/SVM hosts only: under
/// PVM a stock kernel never leaves the instruction emulator.
pub fn boot(
    hv: &Hypervisor,
    cfg: &GuestConfig,
    boot: &LinuxBoot,
    attach: &mut AttachFn<'_>,
) -> Result<Guest, GuestError> {
    let started = Instant::now();
    let name = cfg.name.clone();
    if cfg.memory < MIN_MEMORY {
        return Err(GuestError::Unsupported {
            name,
            what: format!(
                "memory of {} MiB; a Linux guest needs at least {} MiB",
                cfg.memory >> 20,
                MIN_MEMORY >> 20
            ),
        });
    }
    let mem = vm::guest_memory(&name, cfg.memory)?;
    let setup = |what: &'static str| {
        let name = name.clone();
        move |source| GuestError::Setup { name, what, source }
    };
    let host_err = |what: &'static str| {
        let name = name.clone();
        move |source| GuestError::Host { name, what, source }
    };
    let kvm_err = |what: &'static str| {
        let name = name.clone();
        move |source| GuestError::Kvm { name, what, source }
    };
    arch::write_page_tables_and_gdt(&mem).map_err(setup("page tables"))?;
    let shared = Arc::new(Shared::new().map_err(host_err("eventfd"))?);
    let attachments = attach(&mem, &shared)?;
    let devices: Vec<MmioDevice> = attachments
        .iter()
        .filter_map(|a| {
            a.irq.as_ref().map(|line| MmioDevice {
                base: a.base,
                len: a.len,
                gsi: line.gsi,
            })
        })
        .collect();
    if let Some(a) = attachments.iter().find(|a| a.base < cfg.memory) {
        return Err(GuestError::Unsupported {
            name,
            what: format!(
                "memory of {} MiB reaches the device window at {:#x}",
                cfg.memory >> 20,
                a.base
            ),
        });
    }
    let kernel = load(&mem, boot, &devices).map_err(|source| GuestError::Linux {
        name: name.clone(),
        source,
    })?;

    let vm = vm::vm_with_memory(hv, &name, &mem)?;
    // VMX needs a TSS area for real-mode emulation; elsewhere the call fails harmlessly.
    let _ = vm.set_tss_address(TSS_ADDRESS);
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_bindings::kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let mut vcpus = Vec::new();
    for index in 0..boot.vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        if index == 0 && register_pvm_vif(&vcpu, layout::VIF_PAGE) {
            return Err(GuestError::Unsupported {
                name,
                what: "/dev/kvm is PVM, which cannot run a stock Linux kernel (it would run \
                       in PVM's instruction emulator); run it on a VMX/SVM host, or in the \
                       TCG rig (scripts/rig)"
                    .into(),
            });
        }
        let mut cpuid = hv
            .supported_cpuid()
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?
            .clone();
        vcpu_cpuid(&mut cpuid, index, boot.vcpus);
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        if index == 0 {
            // The boot processor: the legacy PIC's wire, long mode, the 64-bit entry. The
            // others stay in reset until the kernel's INIT/SIPI (KVM's local APIC holds
            // them: with the in-kernel irqchip they start uninitialized).
            let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
            virtual_wire(&mut lapic);
            vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
            let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&arch::long_mode_sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            vcpu.set_regs(&kvm_bindings::kvm_regs {
                rip: kernel.entry,
                rsi: ZERO_PAGE,
                rsp: INITIAL_RSP,
                rflags: 0x2,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        vcpus.push(vcpu);
    }
    let platform = hv.host_kind();
    let stats = VcpuStats::open(&vcpus[0]);

    let console = Arc::new(Console::new(&name, cfg.echo));
    let bus_err = |e: crate::devices::bus::BusError| GuestError::Host {
        name: name.clone(),
        what: "device buses",
        source: std::io::Error::other(e),
    };
    // COM1's line, level-triggered like the disk's: asserted while the UART has an
    // interrupt pending.
    let trigger = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("eventfd"))?;
    let uart = Arc::new(Mutex::new(SerialPort::with_interrupt(
        console.clone(),
        trigger.try_clone().map_err(host_err("eventfd"))?,
    )));
    let pending = uart.clone();
    let mut lines = vec![register_line(
        &vm,
        &name,
        LevelIrq {
            gsi: SERIAL_GSI,
            trigger,
            pending: Arc::new(move || crate::sync::lock(&pending).interrupt_pending()),
        },
    )?];
    let mut pio = Bus::new();
    pio.insert(
        u64::from(port::SERIAL_COM1),
        u64::from(port::SERIAL_LEN),
        uart,
    )
    .map_err(bus_err)?;
    pio.insert(
        u64::from(CMOS_PORT),
        2,
        Arc::new(Mutex::new(Cmos::default())),
    )
    .map_err(bus_err)?;
    pio.insert(
        u64::from(I8042_PORT),
        5,
        Arc::new(Mutex::new(I8042::new(shared.clone()))),
    )
    .map_err(bus_err)?;
    pio.insert(
        u64::from(SLEEP_PORT),
        2,
        Arc::new(Mutex::new(SleepControl::new(shared.clone()))),
    )
    .map_err(bus_err)?;
    let mut mmio = Bus::new();
    for a in attachments {
        if let Some(line) = vm::put_on_bus(&vm, &name, &mut mmio, a)? {
            lines.push(register_line(&vm, &name, line)?);
        }
    }
    let mut helpers = Vec::new();
    {
        let shared = shared.clone();
        helpers.push(
            std::thread::Builder::new()
                .name(format!("irq-{name}"))
                .spawn(move || {
                    crate::seccomp::enter(crate::seccomp::ThreadClass::IrqResampler);
                    resample_lines(&shared, lines)
                })
                .map_err(host_err("spawning the interrupt thread"))?,
        );
    }
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let mut threads = Vec::new();
    for (index, vcpu) in (0..).zip(vcpus) {
        let ctx = VcpuContext {
            mem: mem.clone(),
            pio: pio.clone(),
            mmio: mmio.clone(),
            shared: shared.clone(),
            console: console.clone(),
            log: None,
            channel: None,
            started,
            abi_ports: false,
            on_wait: None,
            index,
        };
        let thread_name = match index {
            0 => name.clone(),
            i => format!("{name}-{i}"),
        };
        match vm::start_vcpu(&thread_name, vcpu, ctx) {
            Ok(t) => threads.push(t),
            Err(e) => {
                // Those started go down with the guest.
                shared.request_stop();
                for (t, _) in threads {
                    vm::join_vcpu(t);
                }
                for h in helpers {
                    let _ = h.join();
                }
                return Err(e);
            }
        }
    }
    let mut threads = threads.into_iter();
    let Some((thread, cpu_clock)) = threads.next() else {
        return Err(GuestError::Unsupported {
            name,
            what: "no vCPU".into(),
        });
    };
    let aps = threads.map(|(t, _)| t).collect();
    Ok(Guest::from_parts(GuestParts {
        name,
        platform,
        loaded: Loaded {
            entry: kernel.entry,
            end: kernel.end,
            has_pvh_entry: false,
        },
        started,
        shared,
        console,
        stats,
        thread,
        cpu_clock,
        aps,
        helpers,
        vm,
        mem,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(area: &[u8], addr: u64) -> &[u8] {
        let off = (addr - ACPI_BASE) as usize;
        let len = u32::from_le_bytes(area[off + 4..off + 8].try_into().unwrap()) as usize;
        &area[off..off + len]
    }

    #[test]
    fn acpi_tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = crate::memory::create(16 << 20, 16 << 20).unwrap();
        let dev = MmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        };
        assert_eq!(write_acpi(&mem, &[dev], 3).unwrap(), ACPI_BASE);
        let mut area = vec![0u8; (ACPI_END - ACPI_BASE) as usize];
        mem.read_slice(&mut area, GuestAddress(ACPI_BASE)).unwrap();
        assert_eq!(&area[..8], b"RSD PTR ");
        assert!(checksum_ok(&area[..20]) && checksum_ok(&area[..36]));
        let xsdt_at = u64::from_le_bytes(area[24..32].try_into().unwrap());
        let xsdt = table_at(&area, xsdt_at);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|&a| &table_at(&area, a)[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
        for &a in &entries {
            assert!(checksum_ok(table_at(&area, a)));
        }
        let fadt = table_at(&area, entries[0]);
        // Flags at 112: hardware-reduced.
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        // X_DSDT at 140.
        let dsdt_at = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&area, dsdt_at);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(dsdt));
        let body = &dsdt[36..];
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"LNRO0005\0"), "the virtio-mmio HID");
        assert!(has(&0xd000_0000u32.to_le_bytes()), "the window's base");
        // Extended interrupt descriptor: consumer, level, active-high, one interrupt, GSI 5.
        assert!(has(&[0x89, 6, 0, 0b001, 1, 5, 0, 0, 0]), "the interrupt");
        assert!(has(b"_S5_"));
        // COM1: PNP0501 (EISA-compressed), its ports and GSI 4.
        assert!(has(&[0x41, 0xd0, 0x05, 0x01]), "PNP0501");
        assert!(has(&[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), "COM1's ports");
        assert!(has(&[0x89, 6, 0, 0b001, 1, 4, 0, 0, 0]), "COM1's interrupt");
        // The MADT: a local APIC and an I/O APIC at their bases.
        let madt = table_at(&area, entries[1]);
        assert_eq!(
            u32::from_le_bytes(madt[36..40].try_into().unwrap()),
            LAPIC_BASE
        );
        assert!(madt.windows(4).any(|w| w == IOAPIC_BASE.to_le_bytes()));
        // One enabled processor local APIC (type 0, length 8) per vCPU, UID = APIC ID.
        let mut apics = Vec::new();
        let mut at = 44;
        while at + 2 <= madt.len() {
            let (kind, len) = (madt[at], usize::from(madt[at + 1]));
            assert!(len >= 2 && at + len <= madt.len(), "MADT entry at {at}");
            if kind == 0 {
                assert_eq!(len, 8);
                let flags = u32::from_le_bytes(madt[at + 4..at + 8].try_into().unwrap());
                assert_eq!(flags & 1, 1, "enabled");
                apics.push((madt[at + 2], madt[at + 3]));
            }
            at += len;
        }
        assert_eq!(apics, [(0, 0), (1, 1), (2, 2)]);
    }

    #[test]
    fn a_second_window_gets_its_own_dsdt_device_and_interrupt() {
        let mem = crate::memory::create(16 << 20, 16 << 20).unwrap();
        let disk = MmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        };
        let nic = MmioDevice {
            base: 0xd000_1000,
            len: 0x1000,
            gsi: 6,
        };
        write_acpi(&mem, &[disk, nic], 1).unwrap();
        let mut area = vec![0u8; (ACPI_END - ACPI_BASE) as usize];
        mem.read_slice(&mut area, GuestAddress(ACPI_BASE)).unwrap();
        let xsdt = table_at(&area, u64::from_le_bytes(area[24..32].try_into().unwrap()));
        let fadt = table_at(&area, u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let dsdt = table_at(
            &area,
            u64::from_le_bytes(fadt[140..148].try_into().unwrap()),
        );
        assert!(checksum_ok(dsdt));
        let body = &dsdt[36..];
        let count = |needle: &[u8]| body.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"LNRO0005\0"), 2, "two virtio-mmio devices");
        assert_eq!(count(b"V000"), 1);
        assert_eq!(count(b"V001"), 1);
        // Memory32Fixed (0x86, length 9, read-write): base and length of each window.
        for base in [0xd000_0000u32, 0xd000_1000] {
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&base.to_le_bytes());
            m.extend_from_slice(&0x1000u32.to_le_bytes());
            assert_eq!(count(&m), 1, "the window at {base:#x}");
        }
        // Each its own level-triggered, active-high line.
        assert_eq!(count(&[0x89, 6, 0, 0b001, 1, 5, 0, 0, 0]), 1, "GSI 5");
        assert_eq!(count(&[0x89, 6, 0, 0b001, 1, 6, 0, 0, 0]), 1, "GSI 6");
    }

    #[test]
    fn each_vcpu_has_its_own_apic_id_in_one_package() {
        let entry = |function, index| kvm_bindings::kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_0000,
            ..Default::default()
        };
        let base = kvm_bindings::CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        for (index, count) in [(0, 1), (2, 3), (5, 8)] {
            let mut c = base.clone();
            vcpu_cpuid(&mut c, index, count);
            let e = c.as_slice();
            assert_ne!(e[0].ecx & 1 << 31, 0, "the hypervisor bit");
            assert_eq!(e[0].ebx >> 24, index, "leaf 1: initial APIC ID");
            assert_eq!(e[0].edx >> 28 & 1, u32::from(count > 1), "HTT");
            assert_eq!(e[0].ebx >> 16 & 0xff, count.next_power_of_two());
            assert!(e[1..4].iter().all(|l| l.edx == index), "x2APIC IDs");
            assert_eq!((e[1].ebx, e[1].ecx >> 8 & 0xff), (1, 1), "SMT: one thread");
            assert_eq!((e[2].ebx, e[2].ecx >> 8 & 0xff), (count, 2), "cores");
            assert_eq!(1 << e[2].eax, count.next_power_of_two());
            assert_eq!(e[3].ecx >> 8 & 0xff, 0, "no further level");
            assert_eq!(e[4].ecx & 0xff, count - 1, "AMD: cores minus one");
        }
    }

    /// A bzImage with one setup sector, boot protocol 2.15 with the 64-bit entry, its
    /// protected-mode kernel `kernel` to go at `code32_start`.
    fn bzimage(code32_start: u32, kernel: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0x1f1] = 1;
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x211] = 1;
        b[0x214..0x218].copy_from_slice(&code32_start.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(kernel);
        b
    }

    /// Found by the `bzimage` fuzz target: the kernel's end counted its start twice (an
    /// address taken for a size), and a header could put an empty kernel anywhere, even
    /// outside guest RAM, and have it accepted.
    #[test]
    fn the_kernel_ends_where_it_was_loaded_and_inside_guest_ram() {
        let dir = std::env::temp_dir().join(format!("ddvm-bzimage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = crate::memory::create(16 << 20, 16 << 20).unwrap();
        let boot = |name: &str, bytes: Vec<u8>| {
            let kernel = dir.join(name);
            std::fs::write(&kernel, bytes).unwrap();
            LinuxBoot {
                kernel,
                initrd: None,
                cmdline: String::new(),
                vcpus: 1,
            }
        };
        let k = load(&mem, &boot("ok", bzimage(0x10_0000, &[0x90; 4096])), &[]).unwrap();
        assert_eq!((k.entry, k.end), (0x10_0200, 0x10_1000));
        for (name, at, kernel) in [
            ("outside", 0xff00_0000, &[][..]),
            ("empty", 0x10_0000, &[][..]),
            ("past_ram", 0x00ff_f000, &[0x90; 8192][..]),
        ] {
            let e = load(&mem, &boot(name, bzimage(at, kernel)), &[]).unwrap_err();
            assert!(matches!(e, LinuxError::Kernel { .. }), "{name}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_bzimage_is_refused_naming_it() {
        let dir = std::env::temp_dir().join(format!("ddvm-linux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notakernel");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let mem = crate::memory::create(64 << 20, 64 << 20).unwrap();
        let boot = LinuxBoot {
            kernel: path.clone(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
        };
        let e = load(&mem, &boot, &[]).unwrap_err();
        assert!(matches!(e, LinuxError::Kernel { .. }), "{e}");
        assert!(e.to_string().contains("notakernel"), "{e}");
        let missing = LinuxBoot {
            kernel: dir.join("missing"),
            ..boot.clone()
        };
        let e = load(&mem, &missing, &[]).unwrap_err();
        assert!(e.to_string().starts_with("kernel "), "{e}");
        let long = LinuxBoot {
            cmdline: "x".repeat(CMDLINE_MAX + 1),
            ..boot
        };
        assert!(matches!(
            load(&mem, &long, &[]),
            Err(LinuxError::Cmdline { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cmos_never_reports_an_update_in_progress() {
        let mut c = Cmos::default();
        let mut b = [0xffu8];
        for reg in [0x0a, 0x0b, 0x0d, 0x8a] {
            c.write(0, &[reg]);
            c.read(1, &mut b);
            match reg & 0x7f {
                0x0a => assert_eq!(b[0] & 0x80, 0, "UIP"),
                0x0b => assert_eq!(b[0], 0x06),
                0x0d => assert_eq!(b[0], 0x80),
                _ => unreachable!(),
            }
        }
    }

    /// After an EOI (the resample eventfd), the line is asserted again exactly while its
    /// device has an interrupt pending; the thread ends once the guest is asked to stop.
    #[test]
    fn a_level_line_is_asserted_again_after_eoi_only_while_pending() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let shared = Arc::new(Shared::new().unwrap());
        let trigger = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = trigger.try_clone().unwrap();
        let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let eoi = resample.try_clone().unwrap();
        let pending = Arc::new(AtomicBool::new(true));
        let p = pending.clone();
        let line = LevelIrq {
            gsi: 5,
            trigger,
            pending: Arc::new(move || p.load(Ordering::Acquire)),
        };
        let s = shared.clone();
        let thread = std::thread::spawn(move || resample_lines(&s, vec![(line, resample)]));
        let asserted =
            |timeout: Duration| vcpu::wait_eventfd(&seen, timeout) && seen.read().is_ok();
        eoi.write(1).unwrap();
        assert!(
            asserted(Duration::from_secs(2)),
            "pending at EOI: asserted again"
        );
        pending.store(false, Ordering::Release);
        eoi.write(1).unwrap();
        assert!(
            !asserted(Duration::from_millis(200)),
            "nothing pending: left low"
        );
        shared.request_stop();
        thread.join().unwrap();
    }
}
