//! The channel service of the block class: requests from the VMM become commands of the
//! domain's [`BlockDriver`] (NVMe: commands whose PRPs point straight at the request's bounce
//! slot in the channel, identity mapped: the slot's address is the channel's base plus
//! `Request::data`); their completions go back on the completion ring. The service knows the
//! channel and the block class, not the device: everything it asks of the device goes through
//! the trait.
//!
//! Flow control: a request is taken off the request ring only when the device has a free
//! command slot and the completion ring has room for its completion and for those of every
//! request already in flight, so posting a completion never has to wait. Requests the domain
//! cannot serve (unknown op, malformed range or slot, unsupported by the device) complete at
//! once with `BAD_REQUEST` or `UNSUPPORTED`.
//!
//! Event suppression (the channel's flags): completions are published in batches and the
//! notify port is written only while the VMM sets `NOTIFY_ME`; before waiting the domain sets
//! `WAITING`, then re-checks the request ring and the device's completion queue so no wake-up
//! is lost. Where the VMM's waits take the completions (`wait_collects`) and the domain does
//! not poll (`poll_us=0 poll_busy_us=0`, what the VMM asks on one CPU), the wait that follows
//! a publication stands for the notification: one exit instead of two; the port is written
//! only if the domain finds work and does not wait after all.
//!
//! A VMM that breaks the ring protocol (an impossible index) and a device its driver gives up
//! on (NVMe: timeout, bogus completion) are fatal: the domain marks the channel failed and
//! panics with the reason, and the supervisor restarts it.
//!
//! Orderly stop (`op::SHUTDOWN`): the service takes no more work, lets every request taken
//! before it complete, sends the device a Flush, then starts the driver's shutdown (NVMe: the
//! shutdown notification, CC.SHN = 01b) and polls until the driver reports it complete (NVMe:
//! CSTS.SHST, within RTD3E, at least 5 s); the SHUTDOWN request completes `OK` only if both succeeded. The main
//! loop keeps running meanwhile (heartbeat, completions), so the VMM sees a live domain.
//! Requests that arrive after it complete `IO_ERROR`: the device is shut down.
//!
//! Fault injection (`faults`) hooks in at four points, each through the service's
//! [`Sabotage`]: a request taken ([`Sabotage::taken`], [`Sabotage::redirect`]), a completion
//! about to be pushed ([`Sabotage::complete`], which may hold it back), each pass (held-back
//! completions that are due, a bogus completion), and the ring room reserved for completions
//! held back.

#![forbid(unsafe_code)]

use ddvm_abi::channel::blk::{device_flags, op, DeviceInfo, Request};
use ddvm_abi::channel::ring::SharedMemory;
use ddvm_abi::channel::ring::{Consumer, Producer, CONSUMER, PRODUCER};
use ddvm_abi::channel::{status, Completion};
use guest_kernel::println;
use guest_kernel::shared::SharedRegion;

use alloc::boxed::Box;

use crate::driver::{
    BlockDriver, BlockProperties, Completed, DriverError, IoKind, IoRequest, SubmitError,
};
use crate::faults::{Sabotage, Taken};
use crate::vmm_channel::Channel;

/// What the main loop and fault injection need of a channel service, whatever its class
/// (block: [`Service`]; network: `net_service::NetService`).
pub trait ChannelService {
    /// The channel header.
    fn channel(&self) -> &Channel;
    /// The channel header, to heartbeat and take faults.
    fn channel_mut(&mut self) -> &mut Channel;
    /// One pass: device completions, new requests, publication. Returns whether anything
    /// happened.
    fn pass(&mut self) -> bool;
    /// Requests taken and not yet completed on the ring.
    fn in_flight(&self) -> usize;
    /// Whether a wait now must be short: the device has work whose end only polling sees
    /// (it does not interrupt).
    fn polled_wait(&self) -> bool;
    /// Before waiting: sets `WAITING` and re-checks. True when the domain may wait.
    fn prepare_wait(&mut self) -> bool;
    /// After a wait.
    fn woke(&mut self);
    /// From now on the VMM learns of what the service publishes from the wait that follows
    /// rather than from the notify port (the VMM's waits take the completions: its
    /// `wait_collects`; the domain does not poll, so a wait follows at once). A class that
    /// does not know this keeps notifying.
    fn leave_notify_to_wait(&mut self) {}
    /// Fault injection armed on this service.
    #[cfg(feature = "fault-injection")]
    fn sabotage(&mut self) -> &mut Sabotage;
    /// Fault injection: the completion ring's producer index jumps `by` entries ahead (see
    /// [`Service::skip_completion_producer`]).
    #[cfg(feature = "fault-injection")]
    fn skip_completion_producer(&mut self, by: u32);
}

impl ChannelService for Service {
    fn channel(&self) -> &Channel {
        Service::channel(self)
    }
    fn channel_mut(&mut self) -> &mut Channel {
        Service::channel_mut(self)
    }
    fn pass(&mut self) -> bool {
        Service::pass(self)
    }
    fn in_flight(&self) -> usize {
        Service::in_flight(self)
    }
    fn polled_wait(&self) -> bool {
        Service::in_flight(self) > 0 && !self.device_interrupts()
    }
    fn prepare_wait(&mut self) -> bool {
        Service::prepare_wait(self)
    }
    fn woke(&mut self) {
        Service::woke(self)
    }
    fn leave_notify_to_wait(&mut self) {
        self.notify_in_wait = true;
    }
    #[cfg(feature = "fault-injection")]
    fn sabotage(&mut self) -> &mut Sabotage {
        Service::sabotage(self)
    }
    #[cfg(feature = "fault-injection")]
    fn skip_completion_producer(&mut self, by: u32) {
        Service::skip_completion_producer(self, by)
    }
}

/// Bytes of a channel sector.
const SECTOR: u64 = 512;

/// What the service tells the VMM about the device.
pub fn device_info(disk: &BlockProperties, channel_max_transfer: u32) -> DeviceInfo {
    let mut flags = 0;
    if disk.volatile_write_cache {
        flags |= device_flags::VOLATILE_WRITE_CACHE;
    }
    if disk.discard {
        flags |= device_flags::DISCARD;
    }
    if disk.write_zeroes {
        flags |= device_flags::WRITE_ZEROES;
    }
    let block = disk.block_size;
    let sectors_per_block = u64::from(block) / SECTOR;
    DeviceInfo {
        // Clamped to a whole number of blocks (a capacity over 2^64 sectors cannot be told).
        capacity_sectors: disk
            .blocks
            .min(u64::MAX / sectors_per_block)
            .saturating_mul(sectors_per_block),
        block_size: block,
        flags,
        max_transfer: disk.max_transfer.min(channel_max_transfer) / block * block,
        serial: disk.serial,
        model: disk.model,
        ..DeviceInfo::default()
    }
}

/// A request in flight, packed into the driver's per-command token: tag and completion length.
fn token(tag: u32, len: u32) -> u64 {
    u64::from(tag) | u64::from(len) << 32
}

/// The token of the Flush an orderly stop sends: no request's (a length of `u32::MAX` is
/// never a request's).
const STOP_FLUSH: u64 = u64::MAX;

/// Where an orderly stop (`op::SHUTDOWN`) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Requests taken before it are still on the device.
    Draining { tag: u32 },
    /// The device's Flush is in flight.
    Flushing { tag: u32 },
    /// The shutdown notification is given; waiting for CSTS.SHST (`flushed`: the Flush
    /// succeeded).
    Notifying { tag: u32, flushed: bool },
    /// The device is shut down (or the stop failed): nothing more reaches it.
    Done,
}

/// The service over one channel.
pub struct Service {
    channel: Channel,
    region: SharedRegion,
    requests: Consumer<Request>,
    completions: Producer<Completion>,
    disk: Option<Box<dyn BlockDriver>>,
    info: DeviceInfo,
    epoch: u32,
    /// Completions pushed but not yet published.
    unpublished: bool,
    /// The wait that follows a publication notifies the VMM (see
    /// [`ChannelService::leave_notify_to_wait`]).
    notify_in_wait: bool,
    /// Completions were published while the VMM asked to be notified, and no wait has
    /// followed yet: owed to the VMM if the domain does not wait after all.
    notify_owed: bool,
    /// Misbehaviour armed by fault injection.
    sabotage: Sabotage,
    /// The orderly stop the VMM asked for, if it did.
    stop: Option<Stop>,
}

impl Service {
    /// Serves `channel` (geometry checked, device info written, ready marked) with `disk`
    /// (none: every request completes `UNSUPPORTED`). Resumes at the ring indices the VMM left
    /// in shared memory.
    pub fn new(channel: Channel, disk: Option<Box<dyn BlockDriver>>, info: DeviceInfo) -> Self {
        let region = channel.region();
        let h = *channel.header();
        let (req, cpl) = (u64::from(h.req_ring), u64::from(h.cpl_ring));
        let req_index = region.load_u32(req + CONSUMER);
        let cpl_index = region.load_u32(cpl + PRODUCER);
        let cpl_consumer = region.load_u32(cpl + CONSUMER);
        if cpl_consumer != cpl_index {
            fail(
                &channel,
                format_args!(
                    "channel: completion ring starts with producer {cpl_index} != consumer \
                     {cpl_consumer}"
                ),
            );
        }
        Service {
            channel,
            region,
            requests: Consumer::starting_at(req, h.req_entries, req_index),
            completions: Producer::starting_at(cpl, h.cpl_entries, cpl_index),
            disk,
            info,
            epoch: h.epoch as u32,
            unpublished: false,
            notify_in_wait: false,
            notify_owed: false,
            sabotage: Sabotage::default(),
            stop: None,
        }
    }

    /// The channel header.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The channel header, to heartbeat and take faults.
    pub fn channel_mut(&mut self) -> &mut Channel {
        &mut self.channel
    }

    /// Whether the device wakes the domain when it completes commands.
    pub fn device_interrupts(&self) -> bool {
        self.disk.as_ref().is_some_and(|d| d.interrupts())
    }

    /// Requests taken and not yet completed on the ring: commands in flight on the device and
    /// completions held back by fault injection.
    pub fn in_flight(&self) -> usize {
        let stopping = matches!(
            self.stop,
            Some(Stop::Draining { .. } | Stop::Flushing { .. } | Stop::Notifying { .. })
        );
        self.disk.as_ref().map_or(0, |d| d.in_flight())
            + self.sabotage.held()
            + usize::from(stopping)
    }

    /// Fault injection armed on this service.
    #[cfg(feature = "fault-injection")]
    pub fn sabotage(&mut self) -> &mut Sabotage {
        &mut self.sabotage
    }

    /// Fault injection: the completion ring's producer index jumps `by` entries ahead, as if
    /// a wild write had hit both the shared index and the service's own copy of it; later
    /// completions are counted from there. Published at the end of the next pass.
    #[cfg(feature = "fault-injection")]
    pub fn skip_completion_producer(&mut self, by: u32) {
        let h = self.channel.header();
        let index = self.completions.index().wrapping_add(by);
        self.completions = Producer::starting_at(u64::from(h.cpl_ring), h.cpl_entries, index);
        self.unpublished = true;
    }

    /// One pass: device completions, new requests, publication. Returns whether anything
    /// happened.
    pub fn pass(&mut self) -> bool {
        let completed = self.reap();
        let injected = self.post_injected();
        let taken = self.take_requests();
        let stopped = self.stop_step();
        self.publish();
        completed + injected + taken + stopped > 0
    }

    /// Before waiting: sets `WAITING` and re-checks. Returns true when the domain may wait;
    /// false (flag cleared again) when work arrived meanwhile.
    pub fn prepare_wait(&mut self) -> bool {
        self.channel.set_waiting(true);
        let requests = match self.requests.refresh(&self.region) {
            Ok(n) => n,
            Err(e) => self.vmm_broke(e),
        };
        let device = self.disk.as_ref().is_some_and(|d| d.completion_pending());
        // A shutdown in progress is polled (CSTS.SHST), not waited for.
        let shutting_down = matches!(self.stop, Some(Stop::Notifying { .. }));
        if requests > 0 || device || self.sabotage.ready() || shutting_down {
            self.channel.set_waiting(false);
            // No wait after all: the VMM must hear of the completions now.
            if core::mem::take(&mut self.notify_owed) {
                guest_kernel::vmm::notify();
            }
            return false;
        }
        true
    }

    /// After a wait: the domain polls again, the VMM need not kick it. The wait's exit took
    /// whatever the domain published before it.
    pub fn woke(&mut self) {
        self.channel.set_waiting(false);
        self.notify_owed = false;
    }

    /// Posts the completions the device has; returns how many.
    fn reap(&mut self) -> usize {
        let Some(disk) = self.disk.as_mut() else {
            return 0;
        };
        let completions = &mut self.completions;
        let region = &self.region;
        let epoch = self.epoch;
        let channel = &self.channel;
        let sabotage = &mut self.sabotage;
        let mut posted = 0;
        let mut stop_flush = None;
        let result = disk.poll(&mut |d: Completed| {
            if d.token == STOP_FLUSH {
                stop_flush = Some(d.status);
                return;
            }
            let st = d.status;
            let (code, len) = if st.is_success() {
                (status::OK, (d.token >> 32) as u32)
            } else if st.is_unsupported() {
                (status::UNSUPPORTED, 0)
            } else {
                (status::IO_ERROR, 0)
            };
            let c = Completion {
                tag: d.token as u32,
                status: code,
                detail: st.detail(),
                len,
                epoch,
            };
            let Some(c) = sabotage.complete(c) else {
                return;
            };
            if !completions.push(region, &c) {
                fail(
                    channel,
                    format_args!("channel: completion ring full despite reservation"),
                );
            }
            posted += 1;
        });
        if let Err(e) = result {
            self.device_broke(e);
        }
        if posted > 0 {
            self.unpublished = true;
        }
        if let (Some(st), Some(Stop::Flushing { tag })) = (stop_flush, self.stop) {
            if !st.is_success() {
                println!("stop: the device's Flush failed: {st}");
            }
            // The shutdown notification also writes the cache back: give it even so.
            self.notify_shutdown(tag, st.is_success());
            posted += 1;
        }
        posted
    }

    /// Posts what fault injection has ready: held-back completions now due (their room was
    /// reserved), a completion for a bogus tag (when the ring has room beyond what requests
    /// taken need). Returns how many.
    fn post_injected(&mut self) -> usize {
        let mut posted = 0;
        while let Some(c) = self.sabotage.due() {
            self.push(&c);
            posted += 1;
        }
        if let Some(tag) = self.sabotage.bogus_tag {
            if self.has_room_for(self.in_flight() as u32 + 1) {
                self.sabotage.bogus_tag = None;
                let c = Completion {
                    tag,
                    status: status::OK,
                    detail: 0,
                    len: 0,
                    epoch: self.epoch,
                };
                self.push(&c);
                posted += 1;
            }
        }
        posted
    }

    /// Takes as many requests as the device and the completion ring have room for.
    fn take_requests(&mut self) -> usize {
        let available = match self.requests.refresh(&self.region) {
            Ok(n) => n,
            Err(e) => self.vmm_broke(e),
        };
        if available == 0 {
            return 0;
        }
        let mut taken = 0;
        loop {
            if !self.has_room() {
                break;
            }
            let Some(req) = self.requests.pop(&self.region) else {
                break;
            };
            taken += 1;
            self.serve(&req);
        }
        if taken > 0 {
            self.requests.release(&self.region);
            if let Some(disk) = self.disk.as_mut() {
                disk.ring();
            }
        }
        taken
    }

    /// Whether one more request can be taken: a free device slot, and completion ring room
    /// for it and for everything in flight.
    fn has_room(&mut self) -> bool {
        if let Some(disk) = &self.disk {
            if disk.in_flight() >= disk.capacity() {
                return false;
            }
        }
        let need = self.in_flight() as u32 + u32::from(self.sabotage.bogus_tag.is_some()) + 1;
        self.has_room_for(need)
    }

    /// Whether the completion ring has `need` free entries (refreshing the VMM's index only
    /// when the last one seen is not enough).
    fn has_room_for(&mut self, need: u32) -> bool {
        if self.completions.free() >= need {
            return true;
        }
        match self.completions.refresh(&self.region) {
            Ok(free) => free >= need,
            Err(e) => self.vmm_broke(e),
        }
    }

    /// Validates `req` and submits it, or completes it at once.
    fn serve(&mut self, req: &Request) {
        let what = match req.op {
            op::FLUSH => Taken::Flush,
            op::WRITE => Taken::Write { sector: req.sector },
            _ => Taken::Other,
        };
        if self.sabotage.taken(req.tag, req.len, what) {
            return self.complete(req.tag, status::IO_ERROR, 0);
        }
        if self.stop.is_some() {
            // The device is shut down, or is being: nothing more goes to it.
            return self.complete(req.tag, status::IO_ERROR, 0);
        }
        if req.op == op::SHUTDOWN {
            if req.flags != 0 || req.len != 0 || req.sectors != 0 {
                return self.complete(req.tag, status::BAD_REQUEST, 0);
            }
            if self.disk.is_none() {
                return self.complete(req.tag, status::UNSUPPORTED, 0);
            }
            self.stop = Some(Stop::Draining { tag: req.tag });
            return;
        }
        let mut io = match self.validate(req) {
            Ok(io) => io,
            Err(code) => return self.complete(req.tag, code, 0),
        };
        let len = if matches!(io.kind, IoKind::Read | IoKind::Write) {
            if let Some(addr) = self.sabotage.redirect(req.tag) {
                io.buf = addr;
            }
            req.len
        } else {
            0
        };
        let Some(disk) = self.disk.as_mut() else {
            return self.complete(req.tag, status::UNSUPPORTED, 0);
        };
        match disk.submit(&io, token(req.tag, len)) {
            Ok(()) => {}
            Err(SubmitError::Unsupported) => self.complete(req.tag, status::UNSUPPORTED, 0),
            Err(SubmitError::Invalid) => self.complete(req.tag, status::BAD_REQUEST, 0),
            // `has_room` checked for a free slot.
            Err(SubmitError::Full) => fail(
                &self.channel,
                format_args!("driver: queue full despite a free slot"),
            ),
        }
    }

    /// The driver's work for `req`, or the status it completes with at once.
    fn validate(&self, req: &Request) -> Result<IoRequest, u16> {
        let kind = match req.op {
            op::READ => IoKind::Read,
            op::WRITE => IoKind::Write,
            op::FLUSH => IoKind::Flush,
            op::WRITE_ZEROES => IoKind::WriteZeroes,
            op::DISCARD => IoKind::Deallocate,
            _ => return Err(status::UNSUPPORTED),
        };
        if req.flags != 0 || self.disk.is_none() {
            return Err(status::UNSUPPORTED);
        }
        let info = &self.info;
        if kind == IoKind::Flush {
            if req.len != 0 || req.sectors != 0 {
                return Err(status::BAD_REQUEST);
            }
            return Ok(IoRequest {
                kind,
                lba: 0,
                blocks: 0,
                buf: 0,
                len: 0,
            });
        }
        let supported = match kind {
            IoKind::WriteZeroes => info.flags & device_flags::WRITE_ZEROES != 0,
            IoKind::Deallocate => info.flags & device_flags::DISCARD != 0,
            _ => true,
        };
        if !supported {
            return Err(status::UNSUPPORTED);
        }
        let per_block = u64::from(info.block_size) / SECTOR;
        let (sector, sectors) = (req.sector, u64::from(req.sectors));
        let range_ok = sectors > 0
            && sector % per_block == 0
            && sectors % per_block == 0
            && sector
                .checked_add(sectors)
                .is_some_and(|end| end <= info.capacity_sectors);
        if !range_ok {
            return Err(status::BAD_REQUEST);
        }
        let mut io = IoRequest {
            kind,
            lba: sector / per_block,
            blocks: (sectors / per_block) as u32,
            buf: 0,
            len: 0,
        };
        if matches!(kind, IoKind::Read | IoKind::Write) {
            let len = u64::from(req.len);
            let addr = self.region.base().checked_add(req.data);
            let data_ok = len == sectors * SECTOR
                && len <= u64::from(info.max_transfer)
                && self.channel.header().data_range_ok(req.data, len)
                && addr.is_some_and(|a| a % 4 == 0);
            if !data_ok {
                return Err(status::BAD_REQUEST);
            }
            io.buf = self.region.base() + req.data;
            io.len = req.len;
        } else if req.len != 0 {
            return Err(status::BAD_REQUEST);
        }
        Ok(io)
    }

    /// Completes a request at once (room was reserved by `has_room`).
    fn complete(&mut self, tag: u32, code: u16, len: u32) {
        let c = Completion {
            tag,
            status: code,
            detail: 0,
            len,
            epoch: self.epoch,
        };
        if let Some(c) = self.sabotage.complete(c) {
            self.push(&c);
        }
    }

    /// Pushes a completion (room was reserved).
    fn push(&mut self, c: &Completion) {
        if !self.completions.push(&self.region, c) {
            fail(
                &self.channel,
                format_args!("channel: completion ring full despite reservation"),
            );
        }
        self.unpublished = true;
    }

    /// Publishes pushed completions and notifies the VMM if it asked (or leaves that to the
    /// wait that follows: [`ChannelService::leave_notify_to_wait`]).
    fn publish(&mut self) {
        if !self.unpublished {
            return;
        }
        self.unpublished = false;
        self.completions.publish(&self.region);
        if self.channel.vmm_wants_notify() {
            if self.notify_in_wait {
                self.notify_owed = true;
            } else {
                guest_kernel::vmm::notify();
            }
        }
    }

    /// Moves an orderly stop along: once nothing taken before it is on the device, the Flush;
    /// after the shutdown started, its end. Returns 1 when it moved.
    fn stop_step(&mut self) -> usize {
        let Some(disk) = self.disk.as_mut() else {
            return 0;
        };
        match self.stop {
            Some(Stop::Draining { tag }) => {
                if disk.in_flight() > 0 || self.sabotage.held() > 0 {
                    return 0;
                }
                let flush = IoRequest::FLUSH;
                match disk.submit(&flush, STOP_FLUSH) {
                    Ok(()) => {
                        disk.ring();
                        self.stop = Some(Stop::Flushing { tag });
                    }
                    Err(e) => {
                        println!("stop: the device's Flush not sent: {e}");
                        self.notify_shutdown(tag, false);
                    }
                }
                1
            }
            Some(Stop::Notifying { tag, flushed }) => {
                let code = match disk.shutdown_done() {
                    Ok(false) => return 0,
                    Ok(true) if flushed => status::OK,
                    Ok(true) => status::IO_ERROR,
                    Err(e) => {
                        println!("stop: {e}");
                        status::IO_ERROR
                    }
                };
                if code == status::OK {
                    println!("stop: device flushed and shut down");
                }
                self.stop = Some(Stop::Done);
                self.complete(tag, code, 0);
                1
            }
            _ => 0,
        }
    }

    /// Starts the device's shutdown for the stop request `tag`.
    fn notify_shutdown(&mut self, tag: u32, flushed: bool) {
        if let Some(disk) = self.disk.as_mut() {
            disk.begin_shutdown();
        }
        self.stop = Some(Stop::Notifying { tag, flushed });
    }

    fn vmm_broke(&self, e: ddvm_abi::channel::ring::IndexError) -> ! {
        fail(
            &self.channel,
            format_args!("channel: the VMM broke the ring protocol: {e:?}"),
        )
    }

    fn device_broke(&self, e: DriverError) -> ! {
        fail(&self.channel, format_args!("{e}"))
    }
}

/// Marks the channel failed and panics with `why`.
pub fn fail(channel: &Channel, why: core::fmt::Arguments<'_>) -> ! {
    channel.mark_failed();
    panic!("{why}")
}
