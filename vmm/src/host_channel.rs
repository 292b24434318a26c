//! The VMM's side of a driver domain's channel: post requests, take completions, and hold the
//! domain to the protocol.
//!
//! The VMM keeps the truth: its own ring indices, the geometry it wrote, and a table of the
//! requests in flight. Everything read back from the channel — the domain's ring indices, each
//! completion, the device info — is copied out and checked against that truth. A completion for
//! a tag not in flight, from another epoch, or longer than its request is a protocol violation:
//! it is counted, reported as a [`DomainProtocolError`], and the channel refuses further use
//! (recovery restarts the domain; a violation is never "fixed up").

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::Instant;

use ddvm_abi::channel::blk::{op, DeviceInfo, Request};
use ddvm_abi::channel::ring::{Consumer, IndexError, Producer, SharedMemory};
use ddvm_abi::channel::{
    class, domain_flags, offset, vmm_flags, ChannelHeader, Completion, Entry, DEVICE_INFO_OFFSET,
};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// The channel's memory, addressed by offset from its start.
pub struct ChannelMemory<'a> {
    mem: &'a GuestMem,
    base: u64,
}

impl<'a> ChannelMemory<'a> {
    /// The channel at guest-physical `base` of `mem`.
    pub fn new(mem: &'a GuestMem, base: u64) -> Self {
        ChannelMemory { mem, base }
    }
}

impl SharedMemory for ChannelMemory<'_> {
    fn load_u32(&self, offset: u64) -> u32 {
        // Offsets come from the VMM's own geometry, inside the channel; a failure would be a
        // VMM bug, and an all-ones index is then refused by the ring validation.
        self.mem
            .load(GuestAddress(self.base + offset), Ordering::Acquire)
            .unwrap_or(u32::MAX)
    }
    fn store_u32(&self, offset: u64, value: u32) {
        let _ = self
            .mem
            .store(value, GuestAddress(self.base + offset), Ordering::Release);
    }
    fn read(&self, offset: u64, buf: &mut [u8]) {
        if self
            .mem
            .read_slice(buf, GuestAddress(self.base + offset))
            .is_err()
        {
            buf.fill(0);
        }
    }
    fn write(&self, offset: u64, buf: &[u8]) {
        let _ = self.mem.write_slice(buf, GuestAddress(self.base + offset));
    }
    fn release(&self) {
        fence(Ordering::Release);
    }
    fn acquire(&self) {
        fence(Ordering::Acquire);
    }
}

/// A driver domain broke the channel protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainProtocolError {
    /// A ring index that cannot be right.
    #[error("ring index violation: {0:?}")]
    Index(IndexError),
    /// A completion for a tag that is not in flight.
    #[error("completion for unknown tag {tag}")]
    UnknownTag {
        /// The tag.
        tag: u32,
    },
    /// A completion stamped with another epoch.
    #[error("completion for tag {tag} from epoch {epoch}, expected {expected}")]
    StaleEpoch {
        /// The tag.
        tag: u32,
        /// Epoch in the completion.
        epoch: u32,
        /// Current epoch (low 32 bits).
        expected: u32,
    },
    /// A completion claiming more bytes than the request had.
    #[error("completion for tag {tag} reports {len} bytes, the request had {max}")]
    LengthOverRequest {
        /// The tag.
        tag: u32,
        /// Length claimed.
        len: u32,
        /// Length of the request.
        max: u32,
    },
    /// A completion whose length is not what its operation allows (network: a transmit's
    /// must be the frame's, a received frame's at least a header and at most its buffer).
    #[error("completion for tag {tag} reports {len} bytes, expected {min} to {max}")]
    LengthInvalid {
        /// The tag.
        tag: u32,
        /// Length claimed.
        len: u32,
        /// Least allowed.
        min: u32,
        /// Most allowed.
        max: u32,
    },
    /// Device info that cannot be right.
    #[error("device info invalid: {0}")]
    DeviceInfo(&'static str),
}

/// The checks every class makes on a completion `c` of a request in flight whose length was
/// `request_len`: the current epoch (low 32 bits `epoch`), and a length at most the
/// request's.
pub fn check_completion(
    c: &Completion,
    epoch: u32,
    request_len: u32,
) -> Result<(), DomainProtocolError> {
    if c.epoch != epoch {
        return Err(DomainProtocolError::StaleEpoch {
            tag: c.tag,
            epoch: c.epoch,
            expected: epoch,
        });
    }
    if c.len > request_len {
        return Err(DomainProtocolError::LengthOverRequest {
            tag: c.tag,
            len: c.len,
            max: request_len,
        });
    }
    Ok(())
}

/// Why a request could not be posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No free ring entry or bounce slot: wait for completions.
    #[error("channel full")]
    Full,
    /// Data larger than a bounce slot.
    #[error("request of {len} bytes, at most {max} per request")]
    TooLarge {
        /// Requested.
        len: u64,
        /// Limit.
        max: u32,
    },
    /// The channel refused service after a protocol violation.
    #[error("channel broken by a protocol violation")]
    Broken,
    /// The VMM's own request ring took no entry although it had a free one: its bookkeeping
    /// is broken (the caller gives the device up).
    #[error("VMM bug: the request ring took no entry although one was free")]
    RingInvariant,
}

/// Counters of a channel (VMM side).
#[derive(Debug, Default)]
pub struct ChannelCounters {
    /// Requests posted.
    pub submitted: AtomicU64,
    /// Completions accepted.
    pub completed: AtomicU64,
    /// Completions or indices refused.
    pub violations: AtomicU64,
    /// Kicks sent to a waiting domain.
    pub kicks: AtomicU64,
}

/// What the generic half of a channel ([`ChannelCore`]) needs of a class's request entry.
pub trait ClassRequest: Entry + Copy {
    /// The request's tag.
    fn tag(&self) -> u32;
    /// Its data length: a completion may report at most this many bytes.
    fn data_len(&self) -> u32;
}

impl ClassRequest for Request {
    fn tag(&self) -> u32 {
        self.tag
    }
    fn data_len(&self) -> u32 {
        self.len
    }
}

impl ClassRequest for ddvm_abi::channel::net::Request {
    fn tag(&self) -> u32 {
        self.tag
    }
    fn data_len(&self) -> u32 {
        self.len
    }
}

/// A request in flight (of the block class unless named).
#[derive(Clone, Copy, Debug)]
pub struct InFlight<R = Request> {
    /// The request as posted.
    pub request: R,
    /// Slot index (none for a request without data).
    slot: Option<u32>,
    /// When it was posted.
    pub submitted: Instant,
}

/// A completion accepted by the VMM (of the block class unless named).
#[derive(Clone, Copy, Debug)]
pub struct Done<R = Request> {
    /// The request it completes.
    pub request: R,
    /// Channel status.
    pub status: u16,
    /// Device detail.
    pub detail: u16,
    /// Bytes transferred.
    pub len: u32,
    /// When it was posted.
    pub submitted: Instant,
    slot: Option<u32>,
}

/// What every class's channel does the same way, VMM side: its own ring indices, the bounce
/// slots (one per request entry at most, each `max_transfer` bytes), tags, the table of
/// requests in flight, publication, notification, and the completion checks every class makes
/// (tag in flight, epoch, length at most the request's) before the class's own.
pub struct ChannelCore<R: ClassRequest> {
    base: u64,
    header: ChannelHeader,
    req: Producer<R>,
    cpl: Consumer<Completion>,
    free_slots: Vec<u32>,
    inflight: HashMap<u32, InFlight<R>>,
    next_tag: u32,
    broken: Option<DomainProtocolError>,
    /// Counters.
    pub counters: ChannelCounters,
}

impl<R: ClassRequest> ChannelCore<R> {
    /// The channel at `base` whose header the VMM wrote as `header`, which must name `class`
    /// (anything else is a VMM bug and panics, saying `what` the channel serves).
    pub fn new(base: u64, header: ChannelHeader, class: u32, what: &str) -> Self {
        assert_eq!(
            header.class,
            class,
            "{what}, the header names class {} ({})",
            header.class,
            class::name(header.class)
        );
        let slots = (header.data_size / header.max_transfer.max(1)).min(header.req_entries);
        ChannelCore {
            base,
            header,
            req: Producer::new(u64::from(header.req_ring), header.req_entries),
            cpl: Consumer::new(u64::from(header.cpl_ring), header.cpl_entries),
            free_slots: (0..slots).rev().collect(),
            inflight: HashMap::new(),
            next_tag: 1,
            broken: None,
            counters: ChannelCounters::default(),
        }
    }

    /// The geometry.
    pub fn header(&self) -> &ChannelHeader {
        &self.header
    }

    /// Guest-physical address of the channel in the domain.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Slots free.
    pub fn free_slots(&self) -> usize {
        self.free_slots.len()
    }

    /// Whether a slot is free (the ring itself is checked when posting, which reads the
    /// domain's consumer index when the ring looks full).
    pub fn has_room(&self) -> bool {
        self.broken.is_none() && !self.free_slots.is_empty()
    }

    /// The violation that broke the channel, if any.
    pub fn broken(&self) -> Option<DomainProtocolError> {
        self.broken
    }

    /// The domain's epoch this channel was set up for.
    pub fn epoch(&self) -> u64 {
        self.header.epoch
    }

    /// Counts a violation and breaks the channel for good.
    pub fn violation(&mut self, e: DomainProtocolError) -> DomainProtocolError {
        self.counters.violations.fetch_add(1, Ordering::Relaxed);
        self.broken.get_or_insert(e);
        e
    }

    /// Reads the device info the domain wrote (the class checks it; a failed check is a
    /// [`ChannelCore::violation`]).
    pub fn read_device_info<T: vm_memory::ByteValued>(
        &self,
        mem: &GuestMem,
    ) -> Result<T, DomainProtocolError> {
        mem.read_obj(GuestAddress(self.base + DEVICE_INFO_OFFSET))
            .map_err(|_| DomainProtocolError::DeviceInfo("unreadable"))
    }

    /// Posts a request (not yet published): takes a ring entry and, if `with_slot`, a slot,
    /// whose guest-physical address `fill` gets to put the request's data in before the
    /// request is visible to the domain; `make(tag, data)` builds the entry (`data`: the
    /// slot's offset from the channel start, 0 without a slot). Returns the tag.
    pub fn post(
        &mut self,
        mem: &GuestMem,
        with_slot: bool,
        fill: impl FnOnce(&GuestMem, u64),
        make: impl FnOnce(u32, u64) -> R,
    ) -> Result<u32, SubmitError> {
        if self.broken.is_some() {
            return Err(SubmitError::Broken);
        }
        if self.req.free() == 0 {
            let m = ChannelMemory::new(mem, self.base);
            if let Err(e) = self.req.refresh(&m) {
                self.violation(DomainProtocolError::Index(e));
                return Err(SubmitError::Broken);
            }
        }
        if self.req.free() == 0 || (with_slot && self.free_slots.is_empty()) {
            return Err(SubmitError::Full);
        }
        let slot = if with_slot {
            self.free_slots.pop()
        } else {
            None
        };
        let data = slot.map_or(0, |s| {
            u64::from(self.header.data) + u64::from(s) * u64::from(self.header.max_transfer)
        });
        if slot.is_some() {
            fill(mem, self.base + data);
        }
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        let request = make(tag, data);
        let m = ChannelMemory::new(mem, self.base);
        if !self.req.push(&m, &request) {
            if let Some(s) = slot {
                self.free_slots.push(s);
            }
            return Err(SubmitError::RingInvariant);
        }
        self.inflight.insert(
            tag,
            InFlight {
                request,
                slot,
                submitted: Instant::now(),
            },
        );
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        Ok(tag)
    }

    /// Publishes posted requests; returns whether the domain waits and needs a kick.
    pub fn publish(&self, mem: &GuestMem) -> bool {
        let m = ChannelMemory::new(mem, self.base);
        self.req.publish(&m);
        fence(Ordering::SeqCst);
        let flags: u32 = mem
            .load(
                GuestAddress(self.base + offset::DOMAIN_FLAGS),
                Ordering::Acquire,
            )
            .unwrap_or(domain_flags::WAITING);
        let waiting = flags & domain_flags::WAITING != 0;
        if waiting {
            self.counters.kicks.fetch_add(1, Ordering::Relaxed);
        }
        waiting
    }

    /// Asks the domain to notify (or not) when it publishes completions.
    pub fn set_notify(&self, mem: &GuestMem, on: bool) {
        let v = if on { vmm_flags::NOTIFY_ME } else { 0 };
        let _ = mem.store(
            v,
            GuestAddress(self.base + offset::VMM_FLAGS),
            Ordering::Release,
        );
        fence(Ordering::SeqCst);
    }

    /// Takes the completions the domain published, each checked (tag in flight, epoch, length
    /// at most the request's, then the class's own `check`); accepted ones are appended to
    /// `out`. A violation breaks the channel.
    pub fn poll_checked(
        &mut self,
        mem: &GuestMem,
        out: &mut Vec<Done<R>>,
        check: impl Fn(&Completion, &R) -> Result<(), DomainProtocolError>,
    ) -> Result<usize, DomainProtocolError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        let m = ChannelMemory::new(mem, self.base);
        let available = match self.cpl.refresh(&m) {
            Ok(n) => n,
            Err(e) => return Err(self.violation(DomainProtocolError::Index(e))),
        };
        let epoch = self.header.epoch as u32;
        let mut taken = 0;
        for _ in 0..available {
            let Some(c) = self.cpl.pop(&m) else { break };
            let Some(f) = self.inflight.get(&c.tag).copied() else {
                return Err(self.violation(DomainProtocolError::UnknownTag { tag: c.tag }));
            };
            if let Err(e) = check_completion(&c, epoch, f.request.data_len())
                .and_then(|()| check(&c, &f.request))
            {
                return Err(self.violation(e));
            }
            self.inflight.remove(&c.tag);
            out.push(Done {
                request: f.request,
                status: c.status,
                detail: c.detail,
                len: c.len,
                submitted: f.submitted,
                slot: f.slot,
            });
            taken += 1;
        }
        self.cpl.release(&m);
        self.counters
            .completed
            .fetch_add(taken as u64, Ordering::Relaxed);
        Ok(taken)
    }

    /// Whether the domain has published completions not yet taken (checks the index; a
    /// violation breaks the channel).
    pub fn poll_pending(&mut self, mem: &GuestMem) -> Result<bool, DomainProtocolError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        let m = ChannelMemory::new(mem, self.base);
        match self.cpl.refresh(&m) {
            Ok(n) => Ok(n > 0),
            Err(e) => Err(self.violation(DomainProtocolError::Index(e))),
        }
    }

    /// Copies up to `buf.len()` bytes of a completion's data (`done.len`) out of its slot;
    /// returns the bytes copied (zeros if the slot is unreadable). Call before freeing the
    /// slot.
    pub fn read_slot(&self, mem: &GuestMem, done: &Done<R>, data: u64, buf: &mut [u8]) -> usize {
        let n = buf.len().min(done.len as usize);
        if mem
            .read_slice(&mut buf[..n], GuestAddress(self.base + data))
            .is_err()
        {
            buf[..n].fill(0);
        }
        n
    }

    /// Frees a completed request's slot.
    pub fn free_slot(&mut self, done: &Done<R>) {
        if let Some(slot) = done.slot {
            self.free_slots.push(slot);
        }
    }

    /// Requests in flight, oldest first (for replay after a crash).
    pub fn in_flight_requests(&self) -> Vec<InFlight<R>> {
        let mut v: Vec<InFlight<R>> = self.inflight.values().copied().collect();
        v.sort_by_key(|f| f.submitted);
        v
    }
}

/// The VMM's side of a block channel ([`ChannelCore`] with the block class's requests and
/// device info; the core's accessors through `Deref`).
pub struct HostChannel {
    core: ChannelCore<Request>,
}

impl std::ops::Deref for HostChannel {
    type Target = ChannelCore<Request>;
    fn deref(&self) -> &Self::Target {
        &self.core
    }
}

impl std::ops::DerefMut for HostChannel {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.core
    }
}

impl HostChannel {
    /// The VMM side of the channel at `base` whose header the VMM wrote as `header`, a block
    /// channel ([`class::BLK`]): the requests it posts and the device info it checks are
    /// block's. Any other class is a VMM bug and panics.
    pub fn new(base: u64, header: ChannelHeader) -> Self {
        HostChannel {
            core: ChannelCore::new(
                base,
                header,
                class::BLK,
                "a host channel serves the block class",
            ),
        }
    }

    /// Largest data of one request.
    pub fn max_transfer(&self) -> u32 {
        self.core.header().max_transfer
    }

    /// Reads and checks the device info the domain wrote before it became ready.
    pub fn device_info(&mut self, mem: &GuestMem) -> Result<DeviceInfo, DomainProtocolError> {
        let info: DeviceInfo = self.core.read_device_info(mem)?;
        let problem = if info.capacity_sectors == 0 {
            Some("zero capacity")
        } else if info.block_size != 512 && info.block_size != 4096 {
            Some("block size is neither 512 nor 4096")
        } else if !info
            .capacity_sectors
            .is_multiple_of(u64::from(info.block_size / 512))
        {
            Some("capacity not a whole number of blocks")
        } else if info.max_transfer == 0
            || !info.max_transfer.is_multiple_of(info.block_size)
            || info.max_transfer > self.max_transfer()
        {
            Some("max transfer zero, unaligned or over the channel's")
        } else {
            None
        };
        match problem {
            Some(p) => Err(self.core.violation(DomainProtocolError::DeviceInfo(p))),
            None => Ok(info),
        }
    }

    /// Posts a request (not yet published). For writes, `data` is copied into a bounce slot.
    pub fn submit(
        &mut self,
        mem: &GuestMem,
        operation: u16,
        sector: u64,
        sectors: u32,
        data: Option<&[u8]>,
    ) -> Result<u32, SubmitError> {
        self.submit_with(mem, operation, sector, sectors, |mem, gpa, len| {
            if let (op::WRITE, Some(bytes)) = (operation, data) {
                let n = bytes.len().min(len);
                let _ = mem.write_slice(&bytes[..n], GuestAddress(gpa));
            }
        })
    }

    /// Posts a request (not yet published); `fill(mem, gpa, len)` puts a write's data into its
    /// bounce slot at guest-physical `gpa` of the domain (called before the request is visible
    /// to the domain; not called for other operations).
    pub fn submit_with(
        &mut self,
        mem: &GuestMem,
        operation: u16,
        sector: u64,
        sectors: u32,
        fill: impl FnOnce(&GuestMem, u64, usize),
    ) -> Result<u32, SubmitError> {
        let len = match operation {
            op::READ | op::WRITE => u64::from(sectors) * 512,
            _ => 0,
        };
        let max = self.max_transfer();
        if len > u64::from(max) && self.core.broken().is_none() {
            return Err(SubmitError::TooLarge { len, max });
        }
        self.core.post(
            mem,
            true,
            |mem, gpa| {
                if operation == op::WRITE {
                    fill(mem, gpa, len as usize);
                }
            },
            |tag, data| Request {
                tag,
                op: operation,
                flags: 0,
                sector,
                sectors,
                len: len as u32,
                data,
            },
        )
    }

    /// Takes the completions the domain published, checking each; accepted ones are appended
    /// to `out`. A violation breaks the channel.
    pub fn poll(
        &mut self,
        mem: &GuestMem,
        out: &mut Vec<Done>,
    ) -> Result<usize, DomainProtocolError> {
        self.core.poll_checked(mem, out, |_, _| Ok(()))
    }

    /// Copies the data of a completed read out of its bounce slot and frees the slot.
    pub fn finish(&mut self, mem: &GuestMem, done: &Done, read_into: Option<&mut [u8]>) {
        if let Some(buf) = read_into {
            self.core.read_slot(mem, done, done.request.data, buf);
        }
        self.core.free_slot(done);
    }

    /// Guest-physical address (in the domain) of a completed request's bounce slot, valid
    /// until [`HostChannel::finish`].
    pub fn slot_address(&self, done: &Done) -> u64 {
        self.core.base + done.request.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddvm_abi::channel::ring::{Consumer as DConsumer, Producer as DProducer};
    use ddvm_abi::channel::{status, Entry};

    const BASE: u64 = 0x10_0000;

    fn setup() -> (GuestMem, HostChannel, ChannelHeader) {
        let mem = crate::memory::create(4 << 20, 1 << 30).unwrap();
        let header = crate::domain::channel_header("t", class::BLK, 3, 1 << 20).unwrap();
        mem.write_obj(header, GuestAddress(BASE)).unwrap();
        (mem, HostChannel::new(BASE, header), header)
    }

    /// The domain's side, played by the test.
    struct Domain {
        req: DConsumer<Request>,
        cpl: DProducer<Completion>,
    }

    impl Domain {
        fn new(h: &ChannelHeader) -> Self {
            Domain {
                req: DConsumer::new(u64::from(h.req_ring), h.req_entries),
                cpl: DProducer::new(u64::from(h.cpl_ring), h.cpl_entries),
            }
        }
        fn take(&mut self, mem: &GuestMem) -> Vec<Request> {
            let m = ChannelMemory::new(mem, BASE);
            self.req.refresh(&m).unwrap();
            let mut v = Vec::new();
            while let Some(r) = self.req.pop(&m) {
                v.push(r);
            }
            self.req.release(&m);
            v
        }
        fn complete(&mut self, mem: &GuestMem, c: Completion) {
            let m = ChannelMemory::new(mem, BASE);
            self.cpl.refresh(&m).unwrap();
            assert!(self.cpl.push(&m, &c));
            self.cpl.publish(&m);
        }
    }

    fn ok(r: &Request, epoch: u32) -> Completion {
        Completion {
            tag: r.tag,
            status: status::OK,
            detail: 0,
            len: r.len,
            epoch,
        }
    }

    #[test]
    fn write_then_read_round_trips_through_bounce_slots() {
        let (mem, mut ch, h) = setup();
        let mut d = Domain::new(&h);
        let data = vec![0x5a; 4096];
        ch.submit(&mem, op::WRITE, 8, 8, Some(&data)).unwrap();
        ch.publish(&mem);
        let reqs = d.take(&mem);
        assert_eq!(reqs.len(), 1);
        let mut slot = vec![0u8; 4096];
        mem.read_slice(&mut slot, GuestAddress(BASE + reqs[0].data))
            .unwrap();
        assert_eq!(slot, data, "write data is in the bounce slot");
        d.complete(&mem, ok(&reqs[0], 3));
        let mut out = Vec::new();
        assert_eq!(ch.poll(&mem, &mut out), Ok(1));
        ch.finish(&mem, &out[0], None);
        assert_eq!(ch.in_flight(), 0);

        ch.submit(&mem, op::READ, 8, 8, None).unwrap();
        ch.publish(&mem);
        let r = d.take(&mem)[0];
        mem.write_slice(&[7u8; 4096], GuestAddress(BASE + r.data))
            .unwrap();
        d.complete(&mem, ok(&r, 3));
        out.clear();
        ch.poll(&mem, &mut out).unwrap();
        let mut buf = vec![0u8; 4096];
        ch.finish(&mem, &out[0], Some(&mut buf));
        assert_eq!(buf, vec![7u8; 4096]);
    }

    #[test]
    fn unknown_tag_is_a_violation_and_breaks_the_channel() {
        let (mem, mut ch, h) = setup();
        let mut d = Domain::new(&h);
        ch.submit(&mem, op::FLUSH, 0, 0, None).unwrap();
        ch.publish(&mem);
        let r = d.take(&mem)[0];
        let mut bogus = ok(&r, 3);
        bogus.tag = 999;
        d.complete(&mem, bogus);
        let mut out = Vec::new();
        assert_eq!(
            ch.poll(&mem, &mut out),
            Err(DomainProtocolError::UnknownTag { tag: 999 })
        );
        assert_eq!(ch.counters.violations.load(Ordering::Relaxed), 1);
        assert_eq!(
            ch.submit(&mem, op::FLUSH, 0, 0, None),
            Err(SubmitError::Broken)
        );
        assert_eq!(ch.in_flight(), 1, "the request stays for replay");
    }

    #[test]
    fn stale_epoch_and_overlong_completions_are_violations() {
        let (mem, mut ch, h) = setup();
        let mut d = Domain::new(&h);
        ch.submit(&mem, op::READ, 0, 8, None).unwrap();
        ch.publish(&mem);
        let r = d.take(&mem)[0];
        d.complete(&mem, ok(&r, 2));
        assert!(matches!(
            ch.poll(&mem, &mut Vec::new()),
            Err(DomainProtocolError::StaleEpoch { epoch: 2, .. })
        ));

        let (mem, mut ch, h) = setup();
        let mut d = Domain::new(&h);
        ch.submit(&mem, op::READ, 0, 8, None).unwrap();
        ch.publish(&mem);
        let r = d.take(&mem)[0];
        let mut c = ok(&r, 3);
        c.len = 4097;
        d.complete(&mem, c);
        assert!(matches!(
            ch.poll(&mem, &mut Vec::new()),
            Err(DomainProtocolError::LengthOverRequest { len: 4097, .. })
        ));
    }

    #[test]
    fn completion_index_moving_backwards_or_too_far_is_a_violation() {
        let (mem, mut ch, h) = setup();
        let m = ChannelMemory::new(&mem, BASE);
        m.store_u32(u64::from(h.cpl_ring), h.cpl_entries + 1);
        assert!(matches!(
            ch.poll(&mem, &mut Vec::new()),
            Err(DomainProtocolError::Index(
                IndexError::ProducerTooFar { .. }
            ))
        ));
        // Consumer index of the request ring past what the VMM produced.
        let (mem, mut ch, h) = setup();
        let m = ChannelMemory::new(&mem, BASE);
        for _ in 0..h.req_entries {
            ch.submit(&mem, op::FLUSH, 0, 0, None).unwrap();
        }
        ch.publish(&mem);
        m.store_u32(u64::from(h.req_ring) + 64, h.req_entries + 5);
        assert_eq!(
            ch.submit(&mem, op::FLUSH, 0, 0, None),
            Err(SubmitError::Broken)
        );
        assert_eq!(ch.counters.violations.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn full_channel_refuses_then_recovers_after_completions() {
        let (mem, mut ch, h) = setup();
        let mut d = Domain::new(&h);
        let mut n = 0;
        while ch.submit(&mem, op::READ, 0, 8, None).is_ok() {
            n += 1;
        }
        assert_eq!(n, h.req_entries.min(h.data_size / h.max_transfer) as usize);
        assert_eq!(
            ch.submit(&mem, op::READ, 0, 8, None),
            Err(SubmitError::Full)
        );
        ch.publish(&mem);
        for r in d.take(&mem) {
            d.complete(&mem, ok(&r, 3));
        }
        let mut out = Vec::new();
        ch.poll(&mem, &mut out).unwrap();
        for done in &out {
            ch.finish(&mem, done, None);
        }
        assert!(ch.submit(&mem, op::READ, 0, 8, None).is_ok());
        let big = (h.max_transfer / 512) + 1;
        assert!(matches!(
            ch.submit(&mem, op::READ, 0, big, None),
            Err(SubmitError::TooLarge { .. })
        ));
        let _ = Completion::SIZE;
    }

    #[test]
    #[should_panic(expected = "a host channel serves the block class")]
    fn a_host_channel_opens_only_a_block_header() {
        let mut header = crate::domain::channel_header("t", class::BLK, 3, 1 << 20).unwrap();
        assert_eq!(header.class, class::BLK, "the VMM writes the block class");
        header.class = class::NET;
        let _ = HostChannel::new(BASE, header);
    }

    #[test]
    fn device_info_is_validated() {
        let (mem, mut ch, _) = setup();
        let mut info = DeviceInfo {
            capacity_sectors: 2048,
            block_size: 512,
            max_transfer: 4096,
            ..Default::default()
        };
        mem.write_obj(info, GuestAddress(BASE + DEVICE_INFO_OFFSET))
            .unwrap();
        assert_eq!(ch.device_info(&mem).unwrap().capacity_sectors, 2048);
        info.block_size = 1000;
        mem.write_obj(info, GuestAddress(BASE + DEVICE_INFO_OFFSET))
            .unwrap();
        assert!(ch.device_info(&mem).is_err());
    }
}
