//! What the driver found out about the device, for logs and for the channel's device info.

use core::fmt;

use super::identify::ControllerInfo;

/// What the driver found out about the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Controller version (VS).
    pub version: u32,
    /// Identify Controller.
    pub controller: ControllerInfo,
    /// Namespace served.
    pub nsid: u32,
    /// Namespace size in blocks.
    pub blocks: u64,
    /// Block size in bytes (512..=4096).
    pub block_size: u32,
    /// Largest data transfer of one command in bytes (MDTS, one PRP list page, 65536
    /// blocks), a multiple of the block size.
    pub max_transfer: u32,
    /// I/O queue entries (commands in flight: one less).
    pub queue_entries: u16,
    /// Shadow doorbells in use.
    pub shadow_doorbells: bool,
    /// The MSI-X vector of the I/O completion queue (`None`: no interrupts, polled).
    pub interrupt_vector: Option<u16>,
}

impl DiskInfo {
    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }
}

/// Trims trailing spaces and NULs off an Identify string.
pub fn trimmed(s: &[u8]) -> &str {
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |i| i + 1);
    // Sanitized to printable ASCII at parse time.
    core::str::from_utf8(&s[..end]).unwrap_or("?")
}

impl fmt::Display for DiskInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.controller;
        write!(
            f,
            "nvme: \"{}\" serial \"{}\" fw \"{}\" version {}.{}, namespace {}: {} blocks of {} B \
             ({} MiB), max transfer {} KiB, {} queue entries, vwc={} discard={} write_zeroes={} \
             shadow_doorbells={} ",
            trimmed(&c.model),
            trimmed(&c.serial),
            trimmed(&c.firmware),
            self.version >> 16,
            (self.version >> 8) & 0xff,
            self.nsid,
            self.blocks,
            self.block_size,
            self.capacity_bytes() >> 20,
            self.max_transfer >> 10,
            self.queue_entries,
            u8::from(c.vwc),
            u8::from(c.dataset_management()),
            u8::from(c.write_zeroes()),
            u8::from(self.shadow_doorbells),
        )?;
        match self.interrupt_vector {
            Some(v) => write!(f, "msix_vector={v}"),
            None => write!(f, "msix_vector=none"),
        }
    }
}
