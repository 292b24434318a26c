//! Parsing a client's virtio-blk descriptor chain into a request the VMM can trust.
//!
//! The chain is walked once, with virtio-queue's bounded iterator, and never further than
//! SEG_MAX data descriptors and [`FRAMING_DESCRIPTORS`] more (an indirect table may claim
//! 65,535 entries: at most that many are read, and the segments kept are as few); slicing the
//! data into parts is linear in its descriptors. Every descriptor's buffer
//! must lie in guest memory and be non-empty, readable descriptors must come before writable
//! ones, and the request's framing is free (virtio 1.x: a header or the status byte may share
//! or span descriptors). The outcome is one of three:
//! - a [`Request`] with its data as guest-physical segments, checked against the client's range;
//! - [`Invalid::Status`]: the request is wrong but the status byte is usable, so the client gets
//!   `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`;
//! - [`Invalid::Unusable`]: the chain cannot be walked (a loop, a chain longer than the queue or
//!   than the descriptor cap, a bad index or indirect table) or has no writable status byte; nothing can be answered, so the
//!   device stops serving the queue and sets DEVICE_NEEDS_RESET.

use std::ops::Deref;

use virtio_bindings::virtio_blk as b;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMem;

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
    /// I/O error (also: a malformed request).
    pub const IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
    /// Request type not supported.
    pub const UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
}

/// Bytes of a request header (type, reserved, sector).
const HEADER: u64 = 16;
/// Bytes of one discard / write-zeroes segment.
const DWZ_SEGMENT: u64 = 16;
/// Bytes of the device ID answer.
pub const ID_BYTES: usize = b::VIRTIO_BLK_ID_BYTES as usize;

/// A run of guest memory: (guest-physical address, length).
pub type Segment = (u64, u32);

/// Segments in order, with their total length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments {
    /// The runs.
    pub runs: Vec<Segment>,
    /// Total bytes.
    pub len: u64,
}

impl Segments {
    fn push(&mut self, addr: u64, len: u32) {
        self.runs.push((addr, len));
        self.len += u64::from(len);
    }

    /// Removes the first `n` bytes and returns them as their own segments (in time linear in
    /// the runs moved: the rest is shifted down once).
    fn take_front(&mut self, n: u64) -> Segments {
        let mut front = Segments::default();
        let mut left = n;
        let mut whole = 0;
        for &(addr, len) in &self.runs {
            if left == 0 {
                break;
            }
            if u64::from(len) <= left {
                front.push(addr, len);
                left -= u64::from(len);
                whole += 1;
            } else {
                front.push(addr, left as u32);
                break;
            }
        }
        self.runs.drain(..whole);
        if left > 0 {
            if let Some(first) = self.runs.first_mut() {
                // `left` < this run's length (else the run was taken whole above).
                *first = (first.0 + left, first.1 - left as u32);
            }
        }
        self.len -= front.len;
        front
    }

    /// Removes the last `n` bytes and returns them.
    fn take_back(&mut self, n: u64) -> Segments {
        let keep = self.len.saturating_sub(n);
        let mut all = std::mem::take(self);
        *self = all.take_front(keep);
        all
    }

    /// The sub-range `[offset, offset + len)` as segments (one pass over the runs, copying
    /// only those in the range).
    pub fn slice(&self, offset: u64, len: u64) -> Segments {
        let mut out = Segments::default();
        let end = offset.saturating_add(len);
        let mut at = 0u64;
        for &(addr, n) in &self.runs {
            let next = at + u64::from(n);
            let (from, to) = (offset.max(at), end.min(next));
            if from < to {
                out.push(addr + (from - at), (to - from) as u32);
            }
            if next >= end {
                break;
            }
            at = next;
        }
        out
    }

    /// Copies the bytes of these segments into `buf` (as many as fit).
    pub fn read_into(
        &self,
        mem: &GuestMem,
        buf: &mut [u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut pos = 0usize;
        for &(addr, len) in &self.runs {
            let n = (len as usize).min(buf.len() - pos);
            mem.read_slice(&mut buf[pos..pos + n], GuestAddress(addr))?;
            pos += n;
        }
        Ok(())
    }

    /// Runs `f` on these segments of `mem` as vm-memory slices, in order (for I/O straight
    /// between a file and the client's buffers); an error if a segment is not in `mem`.
    pub fn with_slices<R>(
        &self,
        mem: &GuestMem,
        f: impl FnOnce(&[vm_memory::VolatileSlice<'_>]) -> R,
    ) -> Result<R, vm_memory::GuestMemoryError> {
        let slices = self
            .runs
            .iter()
            .map(|&(addr, len)| mem.get_slice(GuestAddress(addr), len as usize))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(f(&slices))
    }

    /// Copies `buf` into these segments (as much as fits).
    pub fn write_from(
        &self,
        mem: &GuestMem,
        buf: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut pos = 0usize;
        for &(addr, len) in &self.runs {
            let n = (len as usize).min(buf.len() - pos);
            mem.write_slice(&buf[pos..pos + n], GuestAddress(addr))?;
            pos += n;
        }
        Ok(())
    }
}

/// What the client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
}

/// A request that passed every check, in the client's sector numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Kind.
    pub kind: Kind,
    /// First sector in the client's view (discard / write zeroes: from their segment).
    pub sector: u64,
    /// Sectors covered (0 for flush and get-id).
    pub sectors: u64,
    /// Data buffers: readable for writes, writable for reads and get-id; empty otherwise.
    pub data: Segments,
    /// Address of the status byte.
    pub status: u64,
}

/// A request that cannot be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Answer with this status byte at `status`.
    Status {
        /// Address of the status byte.
        status: u64,
        /// `status::IOERR` or `status::UNSUPP`.
        value: u8,
        /// Why, for logs and counters.
        why: &'static str,
    },
    /// The queue cannot be trusted any more (DEVICE_NEEDS_RESET).
    Unusable(&'static str),
}

/// What the parser needs to know about the device.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sectors in the client's range.
    pub capacity: u64,
    /// Largest data of one read or write.
    pub max_data: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Discard is offered.
    pub discard: bool,
    /// Write zeroes is offered.
    pub write_zeroes: bool,
    /// Largest discard / write-zeroes range in sectors.
    pub max_dwz_sectors: u32,
    /// Sectors per logical block: requests must be aligned to it.
    pub block_sectors: u64,
    /// Most data descriptors in one request (SEG_MAX).
    pub max_segments: u32,
}

/// Descriptors a chain may hold beyond its data descriptors: the header and the status byte,
/// which a driver may split over several descriptors. The walk stops at
/// `max_segments + FRAMING_DESCRIPTORS`, so however long a chain or indirect table a client
/// builds (up to 65,535 entries), at most that many descriptors are read and kept.
pub const FRAMING_DESCRIPTORS: u32 = 16;

/// Parses the chain at the head of `chain`.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMem,
    limits: &Limits,
) -> Result<Request, Invalid>
where
    M: Deref<Target = GuestMem>,
{
    let cap = limits.max_segments as usize + FRAMING_DESCRIPTORS as usize;
    let (readable, mut writable, bad) = walk(chain, mem, cap)?;
    // The status byte: the last writable byte.
    if writable.len == 0 {
        return Err(Invalid::Unusable("no writable status byte"));
    }
    let status_seg = writable.take_back(1);
    let status = status_seg.runs[0].0;
    let fail = |value, why| Err(Invalid::Status { status, value, why });
    if let Some(why) = bad {
        return fail(status::IOERR, why);
    }
    let mut readable = readable;
    if readable.len < HEADER {
        return fail(
            status::IOERR,
            "request header missing or not device-readable",
        );
    }
    let mut header = [0u8; HEADER as usize];
    if readable
        .take_front(HEADER)
        .read_into(mem, &mut header)
        .is_err()
    {
        return fail(status::IOERR, "request header unreadable");
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let kind = match kind {
        b::VIRTIO_BLK_T_IN => Kind::Read,
        b::VIRTIO_BLK_T_OUT => Kind::Write,
        b::VIRTIO_BLK_T_FLUSH => Kind::Flush,
        b::VIRTIO_BLK_T_GET_ID => Kind::GetId,
        b::VIRTIO_BLK_T_DISCARD if limits.discard => Kind::Discard,
        b::VIRTIO_BLK_T_WRITE_ZEROES if limits.write_zeroes => Kind::WriteZeroes,
        _ => return fail(status::UNSUPP, "request type not supported"),
    };
    let writes = matches!(kind, Kind::Write | Kind::Discard | Kind::WriteZeroes);
    if writes && limits.read_only {
        return fail(status::IOERR, "write to a read-only device");
    }
    let (data, sector, sectors) = match kind {
        Kind::Read | Kind::Write => {
            let (data, wrong) = if kind == Kind::Read {
                (writable, readable.len)
            } else {
                (readable, writable.len)
            };
            if wrong != 0 {
                return fail(status::IOERR, "data buffer of the wrong direction");
            }
            if data.len == 0 || data.len % 512 != 0 {
                return fail(status::IOERR, "data length not a non-zero multiple of 512");
            }
            if data.len > limits.max_data {
                return fail(status::IOERR, "data longer than the device's limit");
            }
            if data.runs.len() > limits.max_segments as usize {
                return fail(status::IOERR, "more data descriptors than SEG_MAX");
            }
            (data.clone(), sector, data.len / 512)
        }
        Kind::Flush => {
            if readable.len != 0 || writable.len != 0 {
                return fail(status::IOERR, "flush with data");
            }
            (Segments::default(), 0, 0)
        }
        Kind::GetId => {
            if writable.len < ID_BYTES as u64 || readable.len != 0 {
                return fail(status::IOERR, "get-id buffer too small");
            }
            (writable, 0, 0)
        }
        Kind::Discard | Kind::WriteZeroes => {
            // One segment {sector, num_sectors, flags} (max_discard_seg = max_write_zeroes_seg = 1).
            if readable.len != DWZ_SEGMENT || writable.len != 0 {
                return fail(
                    status::IOERR,
                    "expected exactly one discard/write-zeroes segment",
                );
            }
            let mut seg = [0u8; DWZ_SEGMENT as usize];
            if readable.read_into(mem, &mut seg).is_err() {
                return fail(status::IOERR, "segment unreadable");
            }
            let start = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            let allowed = if kind == Kind::WriteZeroes {
                b::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return fail(status::UNSUPP, "unknown discard/write-zeroes flags");
            }
            if num == 0 || num > limits.max_dwz_sectors {
                return fail(
                    status::IOERR,
                    "discard/write-zeroes range empty or too long",
                );
            }
            (Segments::default(), start, u64::from(num))
        }
    };
    if sector
        .checked_add(sectors)
        .is_none_or(|end| end > limits.capacity)
    {
        return fail(status::IOERR, "sector range beyond the device");
    }
    let align = limits.block_sectors.max(1);
    if sector % align != 0 || sectors % align != 0 {
        return fail(status::IOERR, "sector range not aligned to the block size");
    }
    Ok(Request {
        kind,
        sector,
        sectors,
        data,
        status,
    })
}

/// Walks the chain: (readable, writable, first problem that still allows a status answer).
/// A chain of more than `cap` descriptors is unusable: the walk stops at descriptor `cap + 1`,
/// so its work and memory are bounded by `cap` whatever the chain (an indirect table is read
/// one descriptor at a time by virtio-queue, which allocates nothing for it).
fn walk<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMem,
    cap: usize,
) -> Result<(Segments, Segments, Option<&'static str>), Invalid>
where
    M: Deref<Target = GuestMem>,
{
    let mut readable = Segments::default();
    let mut writable = Segments::default();
    let mut bad = None;
    let mut last: Option<Descriptor> = None;
    for (i, d) in chain.enumerate() {
        if i == cap {
            return Err(Invalid::Unusable(
                "descriptor chain longer than SEG_MAX data descriptors and its framing",
            ));
        }
        last = Some(d);
        let (addr, len) = (d.addr().0, d.len());
        if len == 0 {
            bad.get_or_insert("zero-length buffer");
            continue;
        }
        if !mem.check_range(GuestAddress(addr), len as usize) {
            bad.get_or_insert("buffer outside guest memory");
            // The status byte must still be findable: keep a writable run's last byte only if
            // it is in memory, else the chain is unusable (checked below). The address is the
            // guest's: it may be anywhere, up to the top of the address space.
            if d.is_write_only() {
                let last = addr
                    .checked_add(u64::from(len) - 1)
                    .filter(|&b| mem.check_range(GuestAddress(b), 1));
                match last {
                    Some(b) => writable.push(b, 1),
                    None => writable = Segments::default(),
                }
            }
            continue;
        }
        if d.is_write_only() {
            writable.push(addr, len);
        } else if writable.len != 0 {
            bad.get_or_insert("device-readable buffer after a device-writable one");
            // Keep it out of the status search: it is not writable.
        } else {
            readable.push(addr, len);
        }
    }
    match last {
        None => Err(Invalid::Unusable("descriptor chain empty or unreadable")),
        // The iterator stops early (on a loop, a chain longer than its table, a descriptor
        // index out of range or a bad indirect table) while the last descriptor still says
        // NEXT.
        Some(d) if d.has_next() => Err(Invalid::Unusable(
            "descriptor chain cannot be walked (loop, longer than the queue, or bad index)",
        )),
        Some(d) if !d.is_write_only() || d.len() == 0 => Err(Invalid::Unusable(
            "last descriptor is not a device-writable status byte",
        )),
        Some(_) => Ok((readable, writable, bad)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_anywhere() {
        let mut s = Segments::default();
        s.push(0x1000, 100);
        s.push(0x2000, 50);
        assert_eq!(s.slice(90, 20).runs, vec![(0x1000 + 90, 10), (0x2000, 10)]);
        let back = s.take_back(1);
        assert_eq!(back.runs, vec![(0x2000 + 49, 1)]);
        assert_eq!(s.len, 149);
        let front = s.take_front(100);
        assert_eq!(front.runs, vec![(0x1000, 100)]);
        assert_eq!(s.runs, vec![(0x2000, 49)]);
    }

    #[test]
    fn slices_cover_exactly_their_range() {
        let mut s = Segments::default();
        for i in 0..8u64 {
            s.push(0x10000 * (i + 1), 512);
        }
        assert_eq!(s.slice(0, 0).runs, vec![]);
        assert_eq!(s.slice(512, 0).runs, vec![]);
        assert_eq!(s.slice(512, 512).runs, vec![(0x20000, 512)]);
        assert_eq!(s.slice(511, 2).runs, vec![(0x10000 + 511, 1), (0x20000, 1)]);
        assert_eq!(s.slice(4000, 1000).len, 96);
        assert_eq!(s.slice(4096, 10).runs, vec![]);
        // Parts of any size put back together are the whole.
        for part in [1u64, 100, 512, 1000, 4096] {
            let mut runs = Vec::new();
            let mut off = 0;
            while off < s.len {
                let p = s.slice(off, part);
                assert_eq!(p.len, part.min(s.len - off));
                runs.extend(p.runs);
                off += part;
            }
            let total: u64 = runs.iter().map(|&(_, n)| u64::from(n)).sum();
            assert_eq!(total, s.len, "part {part}");
        }
    }

    /// Taking a chain's header off the front of 100,000 one-byte segments at a time costs one
    /// shift, not one per segment (quadratic: about 5e9 element moves, many seconds).
    #[test]
    fn taking_the_front_is_linear() {
        let mut s = Segments::default();
        for i in 0..100_000u64 {
            s.push(0x1000 + 2 * i, 1);
        }
        let t = std::time::Instant::now();
        let mut taken = 0;
        while s.len > 0 {
            taken += s.take_front(50_000).len;
        }
        assert_eq!(taken, 100_000);
        let mut s2 = Segments::default();
        for i in 0..100_000u64 {
            s2.push(0x1000 + 2 * i, 1);
        }
        let front = s2.take_front(99_999);
        assert_eq!(front.runs.len(), 99_999);
        assert_eq!(s2.runs, vec![(0x1000 + 2 * 99_999, 1)]);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
    }
}
