//! Parsing a client's virtio-net descriptor chains into what the VMM can trust: TX frames,
//! RX buffers and control commands.
//!
//! Each chain is walked once, with virtio-queue's bounded iterator, and never further than
//! [`MAX_DESCRIPTORS`] descriptors (an indirect table may claim 65,535 entries: at most that
//! many are read). Every buffer must lie in guest memory and be non-empty, and have the
//! direction its queue needs. The outcome is one of three:
//! - the parsed chain;
//! - [`Invalid::Drop`]: the chain is wrong but walkable: it is given back (used, length 0;
//!   a control command gets ERR where it has an ack byte), and counted;
//! - [`Invalid::Unusable`]: the chain cannot be walked (a bad index or indirect table, a
//!   chain that ends while its last descriptor says NEXT): the device stops serving the queue
//!   and sets DEVICE_NEEDS_RESET, as virtio-blk does.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMem;

/// Bytes of the header in front of every frame (`struct virtio_net_hdr_v1`): 12 under
/// VERSION_1, with or without MRG_RXBUF (`num_buffers` is then 1).
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_AT: usize = 10;
/// Most descriptors walked in one chain (indirect tables included).
pub const MAX_DESCRIPTORS: usize = 64;
/// Most command-specific data of one control command (two MAC tables of 5,000 addresses).
pub const MAX_CTRL_DATA: usize = 64 << 10;

/// A run of guest memory: (guest-physical address, length).
pub type Segment = (u64, u32);

/// Why a chain is not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Give it back unserved (used, length 0) and count it.
    Drop(&'static str),
    /// The queue cannot be trusted any more (DEVICE_NEEDS_RESET).
    Unusable(&'static str),
}

/// A chain's buffers: (readable, writable, first problem that still allows giving it back).
struct Walked {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    bad: Option<&'static str>,
}

fn walk<M>(chain: DescriptorChain<M>, mem: &GuestMem) -> Result<Walked, Invalid>
where
    M: Deref<Target = GuestMem>,
{
    let mut w = Walked {
        readable: Vec::new(),
        writable: Vec::new(),
        bad: None,
    };
    let mut last: Option<Descriptor> = None;
    for (i, d) in chain.enumerate() {
        if i == MAX_DESCRIPTORS {
            // Stop here: the head gives back the whole chain whatever its length.
            w.bad
                .get_or_insert("more descriptors than the device walks");
            return Ok(w);
        }
        last = Some(d);
        let (addr, len) = (d.addr().0, d.len());
        if len == 0 {
            w.bad.get_or_insert("zero-length buffer");
        } else if !mem.check_range(GuestAddress(addr), len as usize) {
            w.bad.get_or_insert("buffer outside guest memory");
        } else if d.is_write_only() {
            w.writable.push((addr, len));
        } else if !w.writable.is_empty() {
            w.bad
                .get_or_insert("device-readable buffer after a device-writable one");
        } else {
            w.readable.push((addr, len));
        }
    }
    match last {
        None => Err(Invalid::Unusable("descriptor chain empty or unreadable")),
        // The iterator stops early (a chain longer than its table, a descriptor index out of
        // range, a bad indirect table) while the last descriptor still says NEXT.
        Some(d) if d.has_next() => Err(Invalid::Unusable(
            "descriptor chain cannot be walked (longer than the queue, or bad index)",
        )),
        Some(_) => Ok(w),
    }
}

fn total(segs: &[Segment]) -> usize {
    segs.iter().map(|&(_, n)| n as usize).sum()
}

/// Copies `skip..skip + out.len()` of the bytes of `segs` into `out`.
fn gather(mem: &GuestMem, segs: &[Segment], mut skip: usize, out: &mut [u8]) -> bool {
    let mut pos = 0;
    for &(addr, len) in segs {
        let len = len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - pos);
        if mem
            .read_slice(&mut out[pos..pos + n], GuestAddress(addr + skip as u64))
            .is_err()
        {
            return false;
        }
        pos += n;
        skip = 0;
        if pos == out.len() {
            break;
        }
    }
    pos == out.len()
}

/// Writes `parts`, one after the other, into `segs`; false if they do not fit or a write
/// fails.
pub fn scatter(mem: &GuestMem, segs: &[Segment], parts: &[&[u8]]) -> bool {
    let mut segs = segs.iter().copied();
    let mut cur: Option<Segment> = None;
    for part in parts {
        let mut part: &[u8] = part;
        while !part.is_empty() {
            let (addr, len) = match cur.take().or_else(|| segs.next()) {
                Some(s) => s,
                None => return false,
            };
            let n = (len as usize).min(part.len());
            if mem.write_slice(&part[..n], GuestAddress(addr)).is_err() {
                return false;
            }
            part = &part[n..];
            if n < len as usize {
                cur = Some((addr + n as u64, len - n as u32));
            }
        }
    }
    true
}

/// Parses a TX chain: the header and the frame behind it (both may be split over any
/// descriptors), device-readable only, the frame at most `max_frame` bytes. The frame is
/// copied into `frame`.
pub fn parse_tx<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMem,
    max_frame: usize,
    frame: &mut Vec<u8>,
) -> Result<(), Invalid>
where
    M: Deref<Target = GuestMem>,
{
    let w = walk(chain, mem)?;
    if let Some(why) = w.bad {
        return Err(Invalid::Drop(why));
    }
    if !w.writable.is_empty() {
        return Err(Invalid::Drop("device-writable buffer in a TX chain"));
    }
    let len = total(&w.readable);
    if len < HDR_LEN {
        return Err(Invalid::Drop("TX chain shorter than its header"));
    }
    if len - HDR_LEN > max_frame {
        return Err(Invalid::Drop("TX frame longer than the device's largest"));
    }
    let mut hdr = [0u8; HDR_LEN];
    if !gather(mem, &w.readable, 0, &mut hdr) {
        return Err(Invalid::Drop("TX header unreadable"));
    }
    // flags and gso_type: no offload is offered, so none may be asked for.
    if hdr[0] != 0 || hdr[1] != 0 {
        return Err(Invalid::Drop("TX header asks for an offload not offered"));
    }
    frame.clear();
    frame.resize(len - HDR_LEN, 0);
    if !gather(mem, &w.readable, HDR_LEN, frame) {
        return Err(Invalid::Drop("TX frame unreadable"));
    }
    Ok(())
}

/// Parses an RX chain: device-writable buffers only. Returns them.
pub fn parse_rx<M>(chain: DescriptorChain<M>, mem: &GuestMem) -> Result<Vec<Segment>, Invalid>
where
    M: Deref<Target = GuestMem>,
{
    let w = walk(chain, mem)?;
    if let Some(why) = w.bad {
        return Err(Invalid::Drop(why));
    }
    if !w.readable.is_empty() {
        return Err(Invalid::Drop("device-readable buffer in an RX chain"));
    }
    Ok(w.writable)
}

/// Bytes of the given RX buffers.
pub fn capacity(segs: &[Segment]) -> usize {
    total(segs)
}

/// A control command as the driver sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// `class`.
    pub class: u8,
    /// `command`.
    pub command: u8,
    /// Command-specific data.
    pub data: Vec<u8>,
    /// Address of the ack byte.
    pub ack: u64,
}

/// Why a control chain gets no command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlInvalid {
    /// Answer ERR at this ack byte.
    Err(u64, &'static str),
    /// No usable ack byte (or not walkable): see [`Invalid`].
    Chain(Invalid),
}

/// Parses a control chain: readable `class`, `command` and data, then exactly one writable
/// ack byte.
pub fn parse_ctrl<M>(chain: DescriptorChain<M>, mem: &GuestMem) -> Result<Command, CtrlInvalid>
where
    M: Deref<Target = GuestMem>,
{
    let w = walk(chain, mem).map_err(CtrlInvalid::Chain)?;
    let Some(&(ack, _)) = w.writable.first() else {
        return Err(CtrlInvalid::Chain(Invalid::Drop(
            w.bad.unwrap_or("control command without an ack byte"),
        )));
    };
    if let Some(why) = w.bad {
        return Err(CtrlInvalid::Err(ack, why));
    }
    if total(&w.writable) != 1 {
        return Err(CtrlInvalid::Err(
            ack,
            "control command with more than an ack byte",
        ));
    }
    let len = total(&w.readable);
    if len < 2 {
        return Err(CtrlInvalid::Err(
            ack,
            "control command without class and command",
        ));
    }
    if len - 2 > MAX_CTRL_DATA {
        return Err(CtrlInvalid::Err(ack, "control command data too long"));
    }
    let mut head = [0u8; 2];
    let mut data = vec![0u8; len - 2];
    if !gather(mem, &w.readable, 0, &mut head) || !gather(mem, &w.readable, 2, &mut data) {
        return Err(CtrlInvalid::Err(ack, "control command unreadable"));
    }
    Ok(Command {
        class: head[0],
        command: head[1],
        data,
        ack,
    })
}
