//! Identify data (NVMe base specification 1.4, figures 247 and 249), parsed from a private
//! copy of the page the controller wrote.

use super::error::NvmeError;

/// Bytes of an Identify data structure.
pub const IDENTIFY_SIZE: usize = 4096;

fn u16_at(b: &[u8; IDENTIFY_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; IDENTIFY_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; IDENTIFY_SIZE], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

/// Optional Admin Command Support: Doorbell Buffer Config.
const OACS_DBBUF: u16 = 1 << 8;
/// Optional NVM Command Support: Dataset Management.
const ONCS_DSM: u16 = 1 << 2;
/// Optional NVM Command Support: Write Zeroes.
const ONCS_WRITE_ZEROES: u16 = 1 << 3;

/// What the driver keeps from Identify Controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI vendor ID.
    pub vendor: u16,
    /// Serial number (ASCII, space padded; sanitized).
    pub serial: [u8; 20],
    /// Model number (ASCII, space padded; sanitized).
    pub model: [u8; 40],
    /// Firmware revision (ASCII; sanitized).
    pub firmware: [u8; 8],
    /// Version, as the VS register (0: not reported, before NVMe 1.2).
    pub ver: u32,
    /// Maximum data transfer size as a power of two of the minimum page size (0: no limit).
    pub mdts: u8,
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// SQ entry sizes: required (low nibble) and maximum (high nibble), powers of two.
    pub sqes: u8,
    /// CQ entry sizes, as `sqes`.
    pub cqes: u8,
    /// Number of namespaces (highest valid NSID).
    pub nn: u32,
    /// Optional NVM Command Support.
    pub oncs: u16,
    /// Volatile Write Cache present.
    pub vwc: bool,
    /// RTD3 Entry Latency: the time a normal shutdown may take, in microseconds (0: not
    /// reported).
    pub rtd3e: u32,
}

/// Replaces what is not printable ASCII (or NUL) with `?`: these bytes are shown to people
/// and copied to the VMM.
fn sanitize<const N: usize>(raw: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    for (o, &b) in out.iter_mut().zip(raw) {
        *o = match b {
            0 | 0x20..=0x7e => b,
            _ => b'?',
        };
    }
    out
}

impl ControllerInfo {
    /// Parses Identify Controller.
    pub fn parse(b: &[u8; IDENTIFY_SIZE]) -> Self {
        ControllerInfo {
            vendor: u16_at(b, 0),
            serial: sanitize(&b[4..24]),
            model: sanitize(&b[24..64]),
            firmware: sanitize(&b[64..72]),
            ver: u32_at(b, 80),
            mdts: b[77],
            oacs: u16_at(b, 256),
            sqes: b[512],
            cqes: b[513],
            nn: u32_at(b, 516),
            oncs: u16_at(b, 520),
            vwc: b[525] & 1 != 0,
            rtd3e: u32_at(b, 88),
        }
    }

    /// Doorbell Buffer Config supported.
    pub fn doorbell_buffer_config(&self) -> bool {
        self.oacs & OACS_DBBUF != 0
    }

    /// Dataset Management (deallocate) supported.
    pub fn dataset_management(&self) -> bool {
        self.oncs & ONCS_DSM != 0
    }

    /// Write Zeroes supported.
    pub fn write_zeroes(&self) -> bool {
        self.oncs & ONCS_WRITE_ZEROES != 0
    }

    /// Whether queue entries of 2^`sq` and 2^`cq` bytes are allowed. Controllers before
    /// NVMe 1.1 may leave SQES/CQES zero, meaning the standard sizes.
    pub fn entry_sizes_ok(&self, sq: u8, cq: u8) -> bool {
        let ok = |field: u8, want: u8| field == 0 || (field & 0xf <= want && want <= field >> 4);
        ok(self.sqes, sq) && ok(self.cqes, cq)
    }
}

/// What the driver keeps from Identify Namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Namespace size in blocks.
    pub blocks: u64,
    /// Block size as a power of two (LBADS of the format in use).
    pub lbads: u8,
    /// Metadata bytes per block of the format in use.
    pub metadata: u16,
}

impl NamespaceInfo {
    /// Parses Identify Namespace; `None` when the namespace is inactive (all zero). Formats
    /// other than 512..=4096-byte blocks without metadata are refused.
    pub fn parse(b: &[u8; IDENTIFY_SIZE]) -> Result<Option<Self>, NvmeError> {
        let blocks = u64_at(b, 0);
        if blocks == 0 {
            return Ok(None);
        }
        let nlbaf = usize::from(b[25]);
        let format = usize::from(b[26] & 0xf);
        if format > nlbaf {
            return Err(NvmeError::Unsupported(
                "namespace format index beyond its format list",
            ));
        }
        let lbaf = u32_at(b, 128 + 4 * format);
        let (lbads, metadata) = ((lbaf >> 16) as u8, lbaf as u16);
        if !(9..=12).contains(&lbads) || metadata != 0 {
            return Err(NvmeError::Format { lbads, metadata });
        }
        Ok(Some(NamespaceInfo {
            blocks,
            lbads,
            metadata,
        }))
    }

    /// Block size in bytes (512..=4096).
    pub fn block_size(&self) -> u32 {
        1 << self.lbads
    }
}

/// The first active namespace in an Active Namespace ID list.
pub fn first_active_namespace(b: &[u8; IDENTIFY_SIZE]) -> Option<u32> {
    let nsid = u32_at(b, 0);
    (nsid != 0 && nsid < 0xffff_fffe).then_some(nsid)
}
