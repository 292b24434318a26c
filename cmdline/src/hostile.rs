//! The hostile client's cases: one malformed virtio-blk request each (the guest's
//! `hostile=CASE`; what each does is the workload client's `hostile` module).

/// A malformed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// A read whose data descriptor's `next` is itself.
    DescLoop,
    /// A read into an address far beyond guest memory (32 GiB).
    AddrOutside,
    /// A read whose header descriptor is device-writable.
    WriteOnlyHeader,
    /// A read whose status descriptor is not device-writable.
    ReadOnlyStatus,
    /// A read with a 0-byte data descriptor.
    ZeroLength,
    /// A chain through all 16 descriptors whose last points back to the first.
    ChainTooLong,
    /// A read starting at the capacity (one past the last sector).
    SectorOutOfRange,
    /// A valid read, published with `avail.idx` = used.idx + queue size + 5.
    AvailJump,
}

impl Case {
    const ALL: [Case; 8] = [
        Case::DescLoop,
        Case::AddrOutside,
        Case::WriteOnlyHeader,
        Case::ReadOnlyStatus,
        Case::ZeroLength,
        Case::ChainTooLong,
        Case::SectorOutOfRange,
        Case::AvailJump,
    ];

    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Case::DescLoop => "desc-loop",
            Case::AddrOutside => "addr-outside",
            Case::WriteOnlyHeader => "write-only-header",
            Case::ReadOnlyStatus => "read-only-status",
            Case::ZeroLength => "zero-length",
            Case::ChainTooLong => "chain-too-long",
            Case::SectorOutOfRange => "sector-out-of-range",
            Case::AvailJump => "avail-jump",
        }
    }

    /// The case named `name`.
    pub fn parse(name: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Every name, for messages.
    pub fn names() -> &'static str {
        "desc-loop, addr-outside, write-only-header, read-only-status, zero-length, \
         chain-too-long, sector-out-of-range or avail-jump"
    }
}
