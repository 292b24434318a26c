//! The VMM's side of a network channel (`ddvm_abi::channel::net`): post transmits, receive
//! buffers, filter sets and the orderly stop into bounce slots, take completions, read the
//! device info and the link word, and hold the domain to the protocol.
//!
//! As the block channel ([`crate::host_channel`], whose memory access, errors, counters,
//! publication and generic completion checks it shares), the VMM keeps the truth: its own
//! ring indices, the geometry it wrote, the requests in flight by tag. Every completion is
//! checked: its tag in flight, the current epoch, and a length its operation allows — a
//! transmit's exactly the frame's when it succeeded, a received frame's at least an Ethernet
//! header and at most its buffer, any other at most its request's. A violation is counted,
//! returned as a [`DomainProtocolError`], and breaks the channel for good.

use std::sync::atomic::Ordering;

use ddvm_abi::channel::net::{self, op, DeviceInfo, FilterSet, Request, MAX_FILTER_SET_LEN};
use ddvm_abi::channel::{class, status, ChannelHeader, Completion};
use vm_memory::{Bytes, GuestAddress};

use crate::host_channel::{ChannelCore, DomainProtocolError, Done, SubmitError};
use crate::memory::GuestMem;

/// Shortest frame a receive may complete with: an Ethernet header.
pub const MIN_FRAME: u32 = 14;
/// Shortest frame a NIC must take (without its FCS), below which a device info's
/// `max_frame` is refused.
const MIN_MAX_FRAME: u32 = 60;

/// A completion accepted by the VMM: `len` is a transmit's frame length or the received
/// frame's.
pub type NetDone = Done<Request>;

/// The VMM's side of a network channel ([`ChannelCore`] with the network class's requests,
/// device info and completion checks; the core's accessors through `Deref`).
pub struct NetChannel {
    core: ChannelCore<Request>,
}

impl std::ops::Deref for NetChannel {
    type Target = ChannelCore<Request>;
    fn deref(&self) -> &Self::Target {
        &self.core
    }
}

impl std::ops::DerefMut for NetChannel {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.core
    }
}

impl NetChannel {
    /// The VMM side of the channel at `base` whose header the VMM wrote as `header`, a
    /// network channel ([`class::NET`]). Any other class is a VMM bug and panics.
    pub fn new(base: u64, header: ChannelHeader) -> Self {
        NetChannel {
            core: ChannelCore::new(
                base,
                header,
                class::NET,
                "a net channel serves the network class",
            ),
        }
    }

    /// Bytes of one slot: the largest frame or receive buffer.
    pub fn slot_size(&self) -> u32 {
        self.core.header().max_transfer
    }

    /// Reads and checks the device info the domain wrote before it became ready: a valid
    /// unicast MAC, a largest frame from 60 bytes up to a slot, a receive buffer at least
    /// the largest frame and at most a slot, a link word of [`net::link`].
    pub fn device_info(&mut self, mem: &GuestMem) -> Result<DeviceInfo, DomainProtocolError> {
        let info: DeviceInfo = self.core.read_device_info(mem)?;
        let slot = self.slot_size();
        let problem = if info.mac[0] & 1 != 0 || info.mac == [0; net::MAC_LEN] {
            Some("MAC is not a unicast address")
        } else if !(MIN_MAX_FRAME..=slot).contains(&info.max_frame) {
            Some("largest frame under 60 bytes or over the channel's slot")
        } else if info.rx_buffer < info.max_frame || info.rx_buffer > slot {
            Some("receive buffer under the largest frame or over the channel's slot")
        } else if info.link != net::link::UP && info.link != net::link::DOWN {
            Some("link word neither up nor down")
        } else {
            None
        };
        match problem {
            Some(p) => Err(self.core.violation(DomainProtocolError::DeviceInfo(p))),
            None => Ok(info),
        }
    }

    /// Whether the domain says the link is up (the device info's link word, read now; any
    /// value but [`net::link::UP`] is down).
    pub fn link_up(&self, mem: &GuestMem) -> bool {
        let base = self.core.base();
        let word: u32 = mem
            .load(GuestAddress(base + net::offset::LINK), Ordering::Acquire)
            .unwrap_or(net::link::DOWN);
        word == net::link::UP
    }

    /// Posts a transmit of `frame` (copied into a slot; not yet published). Returns its tag.
    pub fn transmit(&mut self, mem: &GuestMem, frame: &[u8]) -> Result<u32, SubmitError> {
        let len = frame.len() as u64;
        if len > u64::from(self.slot_size()) {
            return Err(SubmitError::TooLarge {
                len,
                max: self.slot_size(),
            });
        }
        self.post(mem, op::TRANSMIT, len as u32, Some(frame))
    }

    /// Posts an empty receive buffer of a whole slot (not yet published). Returns its tag.
    pub fn receive(&mut self, mem: &GuestMem) -> Result<u32, SubmitError> {
        self.post(mem, op::RECEIVE, self.slot_size(), None)
    }

    /// Posts a filter set (encoded into a slot; not yet published). Returns its tag.
    pub fn config(&mut self, mem: &GuestMem, set: &FilterSet) -> Result<u32, SubmitError> {
        let mut buf = [0u8; MAX_FILTER_SET_LEN];
        let n = set.encode(&mut buf);
        self.post(mem, op::CONFIG, n as u32, Some(&buf[..n]))
    }

    /// Posts the orderly stop (no slot; not yet published). Returns its tag.
    pub fn shutdown(&mut self, mem: &GuestMem) -> Result<u32, SubmitError> {
        self.post(mem, op::SHUTDOWN, 0, None)
    }

    /// Posts a request of `len` bytes, with a slot holding `data` unless it is a stop.
    fn post(
        &mut self,
        mem: &GuestMem,
        operation: u16,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<u32, SubmitError> {
        self.core.post(
            mem,
            operation != op::SHUTDOWN,
            |mem, gpa| {
                if let Some(bytes) = data {
                    let _ = mem.write_slice(bytes, GuestAddress(gpa));
                }
            },
            |tag, data| Request {
                tag,
                op: operation,
                flags: 0,
                len,
                data,
            },
        )
    }

    /// Takes the completions the domain published, checking each; accepted ones are appended
    /// to `out`. A violation breaks the channel.
    pub fn poll(
        &mut self,
        mem: &GuestMem,
        out: &mut Vec<NetDone>,
    ) -> Result<usize, DomainProtocolError> {
        self.core.poll_checked(mem, out, check_length)
    }

    /// Copies a received frame (`done.len` bytes) out of its slot into `buf`; returns the bytes
    /// copied (at most `buf.len()`). Call before [`NetChannel::finish`].
    pub fn read_frame(&self, mem: &GuestMem, done: &NetDone, buf: &mut [u8]) -> usize {
        self.core.read_slot(mem, done, done.request.data, buf)
    }

    /// Frees a completed request's slot.
    pub fn finish(&mut self, done: &NetDone) {
        self.core.free_slot(done);
    }
}

/// The operation-specific length rule (the generic one, at most the request's, is checked
/// first): a transmit that succeeded reports exactly its frame, a received frame is at least
/// an Ethernet header.
fn check_length(c: &Completion, request: &Request) -> Result<(), DomainProtocolError> {
    let ok = c.status == status::OK;
    let (min, max) = match request.op {
        op::TRANSMIT if ok => (request.len, request.len),
        op::RECEIVE if ok => (MIN_FRAME, request.len),
        _ => (0, request.len),
    };
    if (min..=max).contains(&c.len) {
        Ok(())
    } else {
        Err(DomainProtocolError::LengthInvalid {
            tag: c.tag,
            len: c.len,
            min,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_channel::ChannelMemory;
    use ddvm_abi::channel::ring::{Consumer as DConsumer, Producer as DProducer};

    const BASE: u64 = 0x10_0000;

    fn setup() -> (GuestMem, NetChannel, ChannelHeader) {
        let mem = crate::memory::create(4 << 20, 1 << 30).unwrap();
        let header = crate::domain::channel_header("t", class::NET, 3, 1 << 20).unwrap();
        mem.write_obj(header, GuestAddress(BASE)).unwrap();
        (mem, NetChannel::new(BASE, header), header)
    }

    /// The domain's side, played by the test: takes every request and completes it as told.
    fn answer(mem: &GuestMem, h: &ChannelHeader, f: impl Fn(&Request) -> Completion) {
        let m = ChannelMemory::new(mem, BASE);
        let mut req = DConsumer::<Request>::new(u64::from(h.req_ring), h.req_entries);
        let mut cpl = DProducer::<Completion>::new(u64::from(h.cpl_ring), h.cpl_entries);
        req.refresh(&m).unwrap();
        while let Some(r) = req.pop(&m) {
            assert!(cpl.push(&m, &f(&r)));
        }
        req.release(&m);
        cpl.publish(&m);
    }

    fn ok(r: &Request, len: u32) -> Completion {
        Completion {
            tag: r.tag,
            status: status::OK,
            detail: 0,
            len,
            epoch: 3,
        }
    }

    #[test]
    fn a_frame_goes_out_and_one_comes_back_in_its_slot() {
        let (mem, mut ch, h) = setup();
        let frame: Vec<u8> = (0..100u8).collect();
        ch.transmit(&mem, &frame).unwrap();
        ch.receive(&mem).unwrap();
        ch.publish(&mem);
        answer(&mem, &h, |r| {
            if r.op == op::RECEIVE {
                mem.write_slice(&[7u8; 64], GuestAddress(BASE + r.data))
                    .unwrap();
                ok(r, 64)
            } else {
                ok(r, r.len)
            }
        });
        let mut done = Vec::new();
        assert_eq!(ch.poll(&mem, &mut done).unwrap(), 2);
        let rx = done.iter().find(|d| d.request.op == op::RECEIVE).unwrap();
        let mut buf = [0u8; 2048];
        assert_eq!(ch.read_frame(&mem, rx, &mut buf), 64);
        assert!(buf[..64].iter().all(|b| *b == 7));
        for d in &done {
            ch.finish(d);
        }
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn lengths_each_operation_forbids_break_the_channel() {
        for (op_, len) in [
            (op::TRANSMIT, 99),
            (op::RECEIVE, 13),
            (op::RECEIVE, 1 << 20),
        ] {
            let (mem, mut ch, h) = setup();
            match op_ {
                op::TRANSMIT => ch.transmit(&mem, &[0u8; 100]).map(|_| ()),
                _ => ch.receive(&mem).map(|_| ()),
            }
            .unwrap();
            ch.publish(&mem);
            answer(&mem, &h, |r| ok(r, len));
            let e = ch.poll(&mem, &mut Vec::new()).unwrap_err();
            assert!(
                matches!(
                    e,
                    DomainProtocolError::LengthInvalid { .. }
                        | DomainProtocolError::LengthOverRequest { .. }
                ),
                "{e:?}"
            );
            assert_eq!(ch.broken(), Some(e));
            assert_eq!(ch.receive(&mem), Err(SubmitError::Broken));
        }
    }

    #[test]
    fn unknown_tags_and_stale_epochs_break_the_channel() {
        let (mem, mut ch, h) = setup();
        ch.shutdown(&mem).unwrap();
        ch.publish(&mem);
        answer(&mem, &h, |r| Completion {
            tag: r.tag + 100,
            ..ok(r, 0)
        });
        let e = ch.poll(&mem, &mut Vec::new()).unwrap_err();
        assert_eq!(e, DomainProtocolError::UnknownTag { tag: 101 });

        let (mem, mut ch, h) = setup();
        ch.config(&mem, &FilterSet::default()).unwrap();
        ch.publish(&mem);
        answer(&mem, &h, |r| Completion {
            epoch: 2,
            ..ok(r, 0)
        });
        let e = ch.poll(&mem, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, DomainProtocolError::StaleEpoch { .. }), "{e:?}");
    }

    #[test]
    fn a_block_header_is_refused() {
        let header = crate::domain::channel_header("t", class::BLK, 3, 1 << 20).unwrap();
        let r = std::panic::catch_unwind(|| NetChannel::new(BASE, header));
        assert!(r.is_err());
    }
}
