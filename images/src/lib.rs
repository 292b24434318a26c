//! The guest images ddvm boots, built from this repository by `build.rs` (the `images/guest`
//! workspace, target x86_64-unknown-none) and embedded in the host binaries.
//!
//! Each image is a static ELF executable loaded at its physical addresses from 1 MiB, with
//! the ddvm 64-bit entry as `e_entry` and a Xen PVH note for QEMU's `-kernel`.

/// The driver-domain image (ELF).
pub const DRIVER_DOMAIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/driver-domain.elf"));

/// Absolute path of the driver-domain image on the build machine (for tools that want a file,
/// such as `qemu-system-x86_64 -kernel`). Tests and binaries run on the build machine can use
/// it; a deployed binary should use [`DRIVER_DOMAIN`].
pub fn driver_domain_path() -> &'static str {
    concat!(env!("OUT_DIR"), "/driver-domain.elf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_domain_is_a_static_x86_64_executable() {
        assert_eq!(&DRIVER_DOMAIN[..4], b"\x7fELF");
        assert_eq!(DRIVER_DOMAIN[4], 2, "ELFCLASS64");
        let e_type = u16::from_le_bytes([DRIVER_DOMAIN[16], DRIVER_DOMAIN[17]]);
        assert_eq!(e_type, 2, "ET_EXEC: loaders apply no relocations");
        let e_machine = u16::from_le_bytes([DRIVER_DOMAIN[18], DRIVER_DOMAIN[19]]);
        assert_eq!(e_machine, 62, "EM_X86_64");
        assert_eq!(std::fs::read(driver_domain_path()).unwrap(), DRIVER_DOMAIN);
    }
}
