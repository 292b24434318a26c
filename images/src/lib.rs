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

/// The workload client image (ELF): a client guest that drives a virtio-blk device
/// (virtio-mmio) with a verified workload and reports one `ddvm-workload:` JSON line
/// (`guest-kernel/workload`).
pub const WORKLOAD_CLIENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload-client.elf"));

/// Absolute path of the workload client image on the build machine (see
/// [`driver_domain_path`]).
pub fn workload_client_path() -> &'static str {
    concat!(env!("OUT_DIR"), "/workload-client.elf")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_static_x86_64_executable(image: &[u8]) {
        assert_eq!(&image[..4], b"\x7fELF");
        assert_eq!(image[4], 2, "ELFCLASS64");
        let e_type = u16::from_le_bytes([image[16], image[17]]);
        assert_eq!(e_type, 2, "ET_EXEC: loaders apply no relocations");
        let e_machine = u16::from_le_bytes([image[18], image[19]]);
        assert_eq!(e_machine, 62, "EM_X86_64");
    }

    #[test]
    fn driver_domain_is_a_static_x86_64_executable() {
        assert_static_x86_64_executable(DRIVER_DOMAIN);
        assert_eq!(std::fs::read(driver_domain_path()).unwrap(), DRIVER_DOMAIN);
    }

    #[test]
    fn workload_client_is_a_static_x86_64_executable() {
        assert_static_x86_64_executable(WORKLOAD_CLIENT);
        assert_eq!(
            std::fs::read(workload_client_path()).unwrap(),
            WORKLOAD_CLIENT
        );
    }
}
