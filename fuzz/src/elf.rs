//! The ELF checks: an image as `ddvm boot`, a topology or `ctl update` hands it over, checked
//! by `Image::check` for the guest-physical range `[IMAGE_BASE, 4 MiB)` and, if accepted,
//! loaded into guest memory of 4 MiB by `Image::load` (linux-loader's ELF loader).
//!
//! Input: the image's bytes.
//!
//! Checked: an image the checks accept loads (the check is the promise that it can), its
//! entry lies inside the range and its end at most the top; a refusal names the image.

use std::sync::OnceLock;

use ddvm::loader::Image;
use ddvm::memory::GuestMem;
use ddvm_abi::layout::IMAGE_BASE;

use crate::{guest_memory, Seed};

const MEM: u64 = 4 << 20;

fn memory() -> &'static GuestMem {
    static MEMORY: OnceLock<GuestMem> = OnceLock::new();
    MEMORY.get_or_init(|| guest_memory(MEM))
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let image = Image::from_bytes("fuzz.elf", data.to_vec());
    match image.check(IMAGE_BASE, MEM) {
        Err(e) => assert!(e.to_string().contains("fuzz.elf"), "{e}"),
        Ok(info) => {
            assert!(info.entry >= IMAGE_BASE && info.entry < MEM);
            assert!(info.end <= MEM && info.end > IMAGE_BASE);
            let loaded = image
                .load(&info, memory())
                .unwrap_or_else(|e| panic!("a checked image does not load: {e}"));
            assert_eq!((loaded.entry, loaded.end), (info.entry, info.end));
        }
    }
}

/// An ELF64 x86-64 executable: `segments` as (type, file bytes, paddr, memsz), with the
/// entry at the first one's address.
pub fn elf(segments: &[(u32, &[u8], u64, u64)]) -> Vec<u8> {
    let phoff = 64u64;
    let data_at = phoff + 56 * segments.len() as u64;
    let mut b = vec![0u8; data_at as usize];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    let entry = segments.first().map_or(0, |s| s.2);
    b[24..32].copy_from_slice(&entry.to_le_bytes());
    b[32..40].copy_from_slice(&phoff.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
    let mut offset = data_at;
    let mut body = Vec::new();
    for (i, &(kind, bytes, paddr, memsz)) in segments.iter().enumerate() {
        let ph = 64 + 56 * i;
        b[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
        b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        b[ph + 48..ph + 56].copy_from_slice(&8u64.to_le_bytes());
        body.extend_from_slice(bytes);
        offset += bytes.len() as u64;
    }
    b.extend_from_slice(&body);
    b
}

/// A PVH note (Xen ELF note type 18: the 32-bit PVH entry).
fn pvh_note(entry: u32) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&4u32.to_le_bytes());
    n.extend_from_slice(&4u32.to_le_bytes());
    n.extend_from_slice(&18u32.to_le_bytes());
    n.extend_from_slice(b"Xen\0");
    n.extend_from_slice(&entry.to_le_bytes());
    n
}

/// Seeds: one segment, code and data with a .bss, and one with a PVH note.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let code: &[u8] = &[0xf4, 0xeb, 0xfd];
    let note = pvh_note(IMAGE_BASE as u32);
    vec![
        ("one_segment", elf(&[(1, code, IMAGE_BASE, 3)])),
        (
            "code_data_bss",
            elf(&[
                (1, code, IMAGE_BASE, 0x1000),
                (1, &[1, 2, 3, 4], IMAGE_BASE + 0x2000, 0x8000),
            ]),
        ),
        (
            "pvh_note",
            elf(&[(1, code, IMAGE_BASE, 0x1000), (4, &note, 0, 0)]),
        ),
    ]
    .into_iter()
    .map(|(n, b)| (n.to_string(), Seed::new().bytes(&b).finish()))
    .collect()
}
