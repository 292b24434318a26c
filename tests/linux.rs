//! Stock Linux clients on this host: the real Debian kernel the rig uses (`scripts/rig setup`
//! fetches it into ~/.cache/ddvm/rig) is loaded as ddvm would boot it, and on PVM, where a
//! stock kernel cannot run, ddvm refuses it with a message that says where it can. Booting it
//! is tested in the rig (`tests/rig.rs`).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use ddvm::blk::{BlockGeometry, LbaRange};
use ddvm::client::{Client, ClientConfig};
use ddvm::console::Echo;
use ddvm::linux::{self, LinuxBoot};
use linux_loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};

use common::*;

/// The rig's kernel: `$DDVM_RIG_DIR` or ~/.cache/ddvm/rig (`scripts/setup` fetches it).
fn rig_kernel() -> PathBuf {
    let dir = std::env::var_os("DDVM_RIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME");
            PathBuf::from(home).join(".cache/ddvm/rig")
        });
    let version = std::fs::read_to_string(dir.join("kernel.version")).unwrap_or_else(|e| {
        panic!(
            "no rig kernel in {} ({e}): run scripts/setup (or scripts/rig setup)",
            dir.display()
        )
    });
    dir.join(format!("kernel/boot/vmlinuz-{}", version.trim()))
}

/// A file holding `bytes`, and its scratch directory (removed when dropped).
fn scratch_file(name: &str, bytes: &[u8]) -> (PathBuf, Scratch) {
    let dir = scratch(&format!("linux-{name}"));
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    (path, dir)
}

#[test]
fn a_debian_bzimage_is_loaded_with_its_zero_page_initrd_and_acpi() {
    let initrd: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let (initrd_path, _dir) = scratch_file("initrd.img", &initrd);
    let boot = LinuxBoot {
        kernel: rig_kernel(),
        initrd: Some(initrd_path),
        cmdline: "console=ttyS0 quiet".into(),
        vcpus: 2,
    };
    let mem = ddvm::memory::create(128 << 20, 4 << 30).unwrap();
    let dev = linux::MmioDevice {
        base: 0xd000_0000,
        len: 0x1000,
        gsi: 5,
    };
    let k = linux::load(&mem, &boot, &[dev]).unwrap();
    // The protected-mode kernel at 1 MiB, entered 0x200 in.
    assert_eq!(k.entry, 0x10_0200);
    assert!(k.end > 0x10_0000 + (1 << 20), "{k:?}");
    let bp: boot_params = mem.read_obj(GuestAddress(linux::ZERO_PAGE)).unwrap();
    let hdr = bp.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448, "HdrS");
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!(u64::from(hdr.cmd_line_ptr), linux::CMDLINE);
    let mut cmdline = vec![0u8; 20];
    mem.read_slice(&mut cmdline, GuestAddress(linux::CMDLINE))
        .unwrap();
    assert_eq!(&cmdline, b"console=ttyS0 quiet\0");
    // The initrd, page-aligned, above the kernel, below the end of RAM, byte for byte.
    let (at, size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
    assert_eq!((at, size), k.initrd);
    assert_eq!(size, initrd.len() as u64);
    assert!(
        at % 4096 == 0 && at >= k.end && at + size <= 128 << 20,
        "{at:#x}"
    );
    let mut back = vec![0u8; initrd.len()];
    mem.read_slice(&mut back, GuestAddress(at)).unwrap();
    assert!(back == initrd, "the initrd in guest memory differs");
    // RAM below the BIOS hole, the hole reserved (the ACPI tables are in it), RAM from 1 MiB.
    assert_eq!(bp.e820_entries, 3);
    let e820: Vec<(u64, u64, u32)> = bp.e820_table[..3]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect();
    assert_eq!(
        e820,
        [
            (0, 0x9_fc00, 1),
            (0x9_fc00, 0x6_0400, 2),
            (0x10_0000, (128 << 20) - 0x10_0000, 1)
        ]
    );
    assert_eq!({ bp.acpi_rsdp_addr }, linux::ACPI_BASE);
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(linux::ACPI_BASE))
        .unwrap();
    assert_eq!(&sig, b"RSD PTR ");
}

#[test]
fn an_initrd_that_cannot_fit_is_refused_naming_it() {
    let (big, _dir) = scratch_file("big.img", &vec![0u8; 80 << 20]);
    let boot = LinuxBoot {
        kernel: rig_kernel(),
        initrd: Some(big),
        cmdline: String::new(),
        vcpus: 1,
    };
    let mem = ddvm::memory::create(64 << 20, 4 << 30).unwrap();
    let e = linux::load(&mem, &boot, &[]).unwrap_err().to_string();
    assert!(e.contains("big.img") && e.contains("do not fit"), "{e}");
}

/// Under PVM a stock kernel would run in its instruction emulator for ever: ddvm refuses it
/// and says where it can run. (On VMX/SVM the boot must go ahead.)
#[test]
fn a_stock_kernel_is_refused_on_pvm_and_booted_elsewhere() {
    let hv = Arc::new(kvm());
    let cfg = ClientConfig {
        name: "linux0".into(),
        image: ddvm::client::builtin_workload_client(),
        memory: 128 << 20,
        cmdline: String::new(),
        geometry: Some(BlockGeometry {
            range: LbaRange {
                first: 0,
                sectors: 1 << 14,
            },
            block_size: 512,
            read_only: false,
            discard: false,
            write_zeroes: false,
            serial: "t".into(),
            queues: 2,
        }),
        echo: Echo::Off,
        nic: None,
        linux: Some(LinuxBoot {
            kernel: rig_kernel(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
        }),
    };
    match Client::boot(&hv, &cfg) {
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("linux0") && e.contains("PVM") && e.contains("scripts/rig"),
                "{e}"
            );
        }
        Ok(mut c) => {
            let platform = c.guest().platform();
            c.guest_mut().stop();
            assert_ne!(platform, ddvm_abi::boot::Platform::Pvm, "booted under PVM");
        }
    }
}
