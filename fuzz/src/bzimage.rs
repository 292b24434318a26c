//! The bzImage checks: a stock Linux kernel as a client's topology names it, loaded by
//! `ddvm::linux::load` (linux-loader's bzImage loader, then ddvm's own checks of the boot
//! protocol, the zero page, the command line and the ACPI tables) into 16 MiB of guest memory.
//!
//! Input: a command-line length byte, that many bytes of command line, then the kernel file.
//!
//! Checked: a kernel accepted has its 64-bit entry 0x200 past where it was loaded, inside
//! guest memory, and ends inside it; a refusal names the kernel (or the command line).

use std::path::PathBuf;
use std::sync::OnceLock;

use ddvm::linux::{load, LinuxBoot, MmioDevice};
use ddvm::memory::GuestMem;

use crate::{guest_memory, Input, Seed};

const MEM: u64 = 16 << 20;

fn memory() -> &'static GuestMem {
    static MEMORY: OnceLock<GuestMem> = OnceLock::new();
    MEMORY.get_or_init(|| guest_memory(MEM))
}

fn kernel_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("ddvm-fuzz-bzimage-{}", std::process::id()))
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let n = usize::from(input.u8());
    let cmdline = String::from_utf8_lossy(input.bytes(n)).into_owned();
    let kernel = input.rest();
    let path = kernel_path();
    std::fs::write(path, kernel).expect("writing the fuzz kernel");
    let boot = LinuxBoot {
        kernel: path.clone(),
        initrd: None,
        cmdline,
        vcpus: 1,
    };
    let devices = [MmioDevice {
        base: 0xd000_0000,
        len: 0x1000,
        gsi: 5,
    }];
    match load(memory(), &boot, &devices) {
        Ok(k) => {
            assert!(k.end <= MEM, "kernel ends at {:#x}", k.end);
            assert!(k.entry < k.end, "entry {:#x} end {:#x}", k.entry, k.end);
            assert_eq!(k.initrd, (0, 0));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("ddvm-fuzz-bzimage") || msg.contains("command line"),
                "{msg}"
            );
        }
    }
}

/// A bzImage: one setup sector after the boot sector, boot protocol `version`, XLF_KERNEL_64
/// as asked, and `kernel` as the protected-mode kernel.
pub fn bzimage(version: u16, kernel64: bool, kernel: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut b = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    b[0x1f1] = setup_sects;
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    // loadflags: LOADED_HIGH.
    b[0x211] = 1;
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    // initrd_addr_max.
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    // kernel_alignment, relocatable.
    b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    b[0x234] = 1;
    // xloadflags: XLF_KERNEL_64.
    b[0x236..0x238].copy_from_slice(&u16::from(kernel64).to_le_bytes());
    // cmdline_size.
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    // init_size.
    b[0x260..0x264].copy_from_slice(&(kernel.len() as u32 * 2).to_le_bytes());
    b.extend_from_slice(kernel);
    b
}

/// Seeds: a 2.15 kernel with a 64-bit entry and a command line, one without the 64-bit
/// entry, and an old boot protocol.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let kernel = vec![0x90u8; 4096];
    let with = |cmdline: &str, image: Vec<u8>| {
        Seed::new()
            .u8(cmdline.len() as u8)
            .bytes(cmdline.as_bytes())
            .bytes(&image)
            .finish()
    };
    vec![
        (
            "kernel64".to_string(),
            with("console=ttyS0 reboot=k", bzimage(0x020f, true, &kernel)),
        ),
        (
            "no_64bit_entry".to_string(),
            with("", bzimage(0x020f, false, &kernel)),
        ),
        (
            "old_protocol".to_string(),
            with("quiet", bzimage(0x0206, true, &kernel)),
        ),
    ]
}
