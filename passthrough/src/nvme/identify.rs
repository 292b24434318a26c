//! Identify data structures (NVMe 1.4, 5.15.2).

use super::namespace::Namespace;
use super::prp::PAGE_SIZE;
use super::{MDTS, NVME_SUBSYSTEM_VENDOR_ID, NVME_VENDOR_ID, NVME_VERSION};

/// Identify data is one memory page.
pub type Page = [u8; PAGE_SIZE as usize];

/// Optional Admin Command Support: Doorbell Buffer Config.
pub const OACS_DBBUF: u16 = 1 << 8;
/// Optional NVM Command Support: Dataset Management.
pub const ONCS_DSM: u16 = 1 << 2;
/// Optional NVM Command Support: Write Zeroes.
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
/// Asynchronous Event Request Limit (0's based).
pub const AERL: u8 = 3;

fn put(page: &mut Page, at: usize, bytes: &[u8]) {
    page[at..at + bytes.len()].copy_from_slice(bytes);
}

/// ASCII field padded with spaces (the caller validated length and charset).
fn ascii(page: &mut Page, at: usize, len: usize, s: &str) {
    page[at..at + len].fill(b' ');
    let n = s.len().min(len);
    page[at..at + n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Identify Controller (CNS 1).
pub fn controller(serial: &str, model: &str, volatile_write_cache: bool) -> Page {
    let mut p = [0u8; PAGE_SIZE as usize];
    put(&mut p, 0, &NVME_VENDOR_ID.to_le_bytes());
    put(&mut p, 2, &NVME_SUBSYSTEM_VENDOR_ID.to_le_bytes());
    ascii(&mut p, 4, 20, serial);
    ascii(&mut p, 24, 40, model);
    ascii(
        &mut p,
        64,
        8,
        concat!("ddvm", env!("CARGO_PKG_VERSION_MAJOR")),
    );
    p[72] = 6; // Recommended Arbitration Burst
    p[77] = MDTS;
    put(&mut p, 80, &NVME_VERSION.to_le_bytes());
    p[111] = 1; // Controller Type: I/O controller
    put(&mut p, 256, &OACS_DBBUF.to_le_bytes());
    p[258] = 3; // Abort Command Limit (0's based)
    p[259] = AERL;
    p[260] = 0x3; // Firmware: one read-only slot
    p[512] = 0x66; // SQES: 64 bytes
    p[513] = 0x44; // CQES: 16 bytes
    put(&mut p, 516, &1u32.to_le_bytes()); // Number of Namespaces
    put(&mut p, 520, &(ONCS_DSM | ONCS_WRITE_ZEROES).to_le_bytes());
    // Volatile Write Cache: present; Flush with NSID FFFFFFFFh supported.
    p[525] = if volatile_write_cache {
        1 | (0b11 << 1)
    } else {
        0
    };
    ascii(
        &mut p,
        768,
        256,
        &format!("nqn.2026-01.dev.ddvm:nvme:{serial}"),
    );
    put(&mut p, 2048, &2500u16.to_le_bytes()); // Power state 0: 25 W
    p
}

/// Identify Namespace (CNS 0) for namespace 1.
pub fn namespace(ns: &Namespace) -> Page {
    let mut p = [0u8; PAGE_SIZE as usize];
    let blocks = ns.blocks().to_le_bytes();
    put(&mut p, 0, &blocks); // NSZE
    put(&mut p, 8, &blocks); // NCAP
    put(&mut p, 16, &blocks); // NUSE
                              // DLFEAT: deallocated blocks read as zeroes; Write Zeroes supports Deallocate.
    p[33] = 0b1001;
    let lbads = ns.lba_size().trailing_zeros();
    put(&mut p, 128, &(lbads << 16).to_le_bytes()); // LBA Format 0
    p
}

/// Active Namespace ID list (CNS 2): namespaces above `nsid`.
pub fn active_namespaces(nsid: u32) -> Page {
    let mut p = [0u8; PAGE_SIZE as usize];
    if nsid < 1 {
        put(&mut p, 0, &1u32.to_le_bytes());
    }
    p
}
