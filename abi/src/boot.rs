//! Boot information the VMM hands to a guest at [`crate::layout::BOOT_INFO`].
//!
//! At the 64-bit entry, `rdi` holds the address of the boot info and `rsi` holds
//! [`ENTRY_MAGIC`].

use crate::assert_abi_size;

/// `rsi` at the 64-bit entry.
pub const ENTRY_MAGIC: u64 = 0x6464_766d_2d36_3421; // "ddvm-64!"
/// `BootInfo::magic`.
pub const BOOT_INFO_MAGIC: u64 = 0x6464_766d_626f_6f74; // "ddvmboot"
/// `BootInfo::version`.
pub const BOOT_INFO_VERSION: u32 = 1;

/// Bytes of the ECAM window at [`BootInfo::pci_ecam`]: bus 0 only, function `f` of device `d`
/// at `d << 15 | f << 12`, 4 KiB of configuration space each.
pub const PCI_ECAM_SIZE: u64 = 32 * 8 * 4096;

/// The platform the guest runs on, as the VMM detected it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// Unknown hypervisor.
    Unknown = 0,
    /// Paravirtual KVM (guests at CPL 3, shadow paging, VIF page).
    Pvm = 1,
    /// KVM on Intel VMX.
    Vmx = 2,
    /// KVM on AMD SVM.
    Svm = 3,
    /// Booted by QEMU through the PVH entry (no ddvm VMM).
    QemuPvh = 4,
}

impl Platform {
    /// Decodes a raw value; unknown values map to [`Platform::Unknown`].
    pub fn from_raw(v: u32) -> Self {
        match v {
            1 => Platform::Pvm,
            2 => Platform::Vmx,
            3 => Platform::Svm,
            4 => Platform::QemuPvh,
            _ => Platform::Unknown,
        }
    }

    /// Short lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Unknown => "unknown",
            Platform::Pvm => "pvm",
            Platform::Vmx => "vmx",
            Platform::Svm => "svm",
            Platform::QemuPvh => "qemu-pvh",
        }
    }
}

/// Boot information. All addresses are guest-physical.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// [`Platform`] as a raw value.
    pub platform: u32,
    /// Bytes of RAM, starting at address 0.
    pub mem_size: u64,
    /// TSC frequency in kHz (0: unknown).
    pub tsc_khz: u64,
    /// Log ring address (0: none, use the serial port).
    pub log_ring: u64,
    /// Log ring size, header included.
    pub log_ring_size: u64,
    /// Panic record address.
    pub panic_record: u64,
    /// Channel address (0: no channel).
    pub channel: u64,
    /// Channel size in bytes.
    pub channel_size: u64,
    /// Command line address.
    pub cmdline: u64,
    /// Command line length in bytes.
    pub cmdline_len: u64,
    /// Base of the ECAM window of PCI bus 0, [`PCI_ECAM_SIZE`] bytes above RAM, page-aligned
    /// (0: none, use configuration mechanism #1 ports only). One exit per configuration access
    /// where the ports take two.
    pub pci_ecam: u64,
    /// Reserved, zero.
    pub reserved: [u64; 4],
}
assert_abi_size!(BootInfo, 128);

impl BootInfo {
    /// Whether magic and version are the ones this ABI defines.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC && self.version == BOOT_INFO_VERSION
    }

    /// The platform as an enum.
    pub fn platform(&self) -> Platform {
        Platform::from_raw(self.platform)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_round_trips_and_unknown_values_decode_as_unknown() {
        for p in [
            Platform::Unknown,
            Platform::Pvm,
            Platform::Vmx,
            Platform::Svm,
            Platform::QemuPvh,
        ] {
            assert_eq!(Platform::from_raw(p as u32), p);
        }
        assert_eq!(Platform::from_raw(77), Platform::Unknown);
    }

    #[test]
    fn boot_info_validity_needs_magic_and_version() {
        let mut b = BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            ..Default::default()
        };
        assert!(b.is_valid());
        b.version = 2;
        assert!(!b.is_valid());
        b.version = BOOT_INFO_VERSION;
        b.magic = 0;
        assert!(!b.is_valid());
    }
}
