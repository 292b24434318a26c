//! The panic record a guest fills before it writes the panic port.

use crate::assert_abi_size;

/// `PanicRecord::magic`.
pub const PANIC_MAGIC: u32 = 0x7061_6e21; // "pan!"
/// Longest message carried by the record.
pub const PANIC_MSG_MAX: usize = 4096 - 64;

/// What stopped the guest; the value written to the panic port.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanicKind {
    /// A Rust panic (message in the record).
    Panic = 1,
    /// A CPU exception delivered through the guest's IDT (vector, RIP, error code).
    Exception = 2,
}

impl PanicKind {
    /// Decodes the port value.
    pub fn from_raw(v: u32) -> Option<Self> {
        match v {
            1 => Some(PanicKind::Panic),
            2 => Some(PanicKind::Exception),
            _ => None,
        }
    }
}

/// Written by the guest at [`crate::layout::PANIC_RECORD`]; everything in it is untrusted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PanicRecord {
    /// [`PANIC_MAGIC`].
    pub magic: u32,
    /// [`PanicKind`] as a raw value.
    pub kind: u32,
    /// Exception vector (exceptions only).
    pub vector: u32,
    /// Bytes of `msg` in use.
    pub msg_len: u32,
    /// Error code pushed by the CPU (0 where the vector has none).
    pub error_code: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// CR2 at the fault (page faults only).
    pub cr2: u64,
    /// Stack pointer at the fault.
    pub rsp: u64,
    /// Reserved, zero.
    pub reserved: [u64; 2],
    /// UTF-8 message, `msg_len` bytes.
    pub msg: [u8; PANIC_MSG_MAX],
}
assert_abi_size!(PanicRecord, 4096);

impl Default for PanicRecord {
    fn default() -> Self {
        PanicRecord {
            magic: 0,
            kind: 0,
            vector: 0,
            msg_len: 0,
            error_code: 0,
            rip: 0,
            cr2: 0,
            rsp: 0,
            reserved: [0; 2],
            msg: [0; PANIC_MSG_MAX],
        }
    }
}

impl PanicRecord {
    /// The message bytes, clamped to the record whatever `msg_len` claims.
    pub fn message(&self) -> &[u8] {
        let len = (self.msg_len as usize).min(PANIC_MSG_MAX);
        &self.msg[..len]
    }
}

/// Name of an x86 exception vector.
pub fn vector_name(vector: u32) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        20 => "#VE virtualization",
        21 => "#CP control protection",
        _ => "exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_clamped_to_the_record() {
        let mut r = PanicRecord {
            msg_len: u32::MAX,
            ..Default::default()
        };
        assert_eq!(r.message().len(), PANIC_MSG_MAX);
        r.msg_len = 3;
        r.msg[..3].copy_from_slice(b"abc");
        assert_eq!(r.message(), b"abc");
    }

    #[test]
    fn kinds_decode() {
        assert_eq!(PanicKind::from_raw(1), Some(PanicKind::Panic));
        assert_eq!(PanicKind::from_raw(2), Some(PanicKind::Exception));
        assert_eq!(PanicKind::from_raw(0), None);
    }
}
