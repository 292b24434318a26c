//! The channel service of the network class (`ddvm_abi::channel::net`): requests from the VMM
//! become buffers of the domain's [`NetDriver`] (e1000: descriptors whose buffer addresses are
//! the requests' slots in the channel, identity mapped: the channel's base plus
//! `Request::data`; nothing is copied); their completions go back on the completion ring. As
//! the block service, it knows the channel and the class, not the device.
//!
//! - `TRANSMIT`: the slot is the frame; it completes `OK` with the frame's length when the NIC
//!   wrote the descriptor back (DD), `IO_ERROR` when the NIC reported an error.
//! - `RECEIVE`: the slot is posted as a receive buffer; it completes `OK` with the frame's
//!   length when a frame landed in it. Buffers beyond what the NIC's ring holds wait in the
//!   service, in order, and go to the NIC as its ring drains; transmits wait the same way in
//!   a queue of their own, so posted receive buffers never hold up a transmit.
//! - `CONFIG`: the slot holds a [`FilterSet`]; a malformed one completes `BAD_REQUEST`. It
//!   becomes the NIC's receive filters: its own address (RAR0) always, the set's unicast
//!   addresses, its multicast addresses, its broadcast, promiscuous and all-multicast flags.
//!   Until the first one the NIC receives its own address and broadcast.
//! - `SHUTDOWN`: buffers not yet on the NIC complete `IO_ERROR` at once; once the transmits
//!   on the NIC are done the NIC is stopped (receiver and transmitter off), the receive
//!   buffers still posted complete `IO_ERROR`, then the request itself `OK`. Requests after
//!   it complete `IO_ERROR`.
//!
//! Flow control: a request is taken only when the completion ring has room for its completion
//! and for those of every request in flight (on the NIC, waiting for the NIC's ring, or held
//! back by fault injection). The link is read every [`LINK_CHECK_US`] (one register access)
//! and a change rewrites the device info's link word.
//!
//! The 8254x raises no MSI-X. With an INTx line the VMM routes to the domain's wake-up (a VFIO
//! NIC, `nic_intx`) the causes are acknowledged (ICR read clear: no exit, the registers are a
//! memory slot) before the service looks for work and waits, so the line is deasserted unless
//! a cause was raised since, and the VMM unmasks it when the domain waits: a cause raised
//! after the acknowledgement ends the wait. Without one the driver reports no interrupts, so
//! the main loop waits with a short timeout while transmits are on the NIC; a receive buffer
//! may wait for ever and does not shorten the wait. The emulated e1000 writes the domain's
//! wake eventfd when a cause enabled in IMS is raised (RXT0, TXDW), which ends the wait at
//! once.
//!
//! Fault injection hooks in where the block service's does ([`Sabotage`]): a request taken
//! (`taken`, `redirect` of a transmit's or receive buffer's address), a completion pushed
//! (`complete`), each pass (held-back completions, a bogus tag).

#![forbid(unsafe_code)]

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;

use ddvm_abi::channel::net::{
    filter_flags, link, op, DeviceInfo, FilterSet, Request, MAX_FILTER_SET_LEN,
};
use ddvm_abi::channel::ring::{Consumer, Producer, SharedMemory, CONSUMER, PRODUCER};
use ddvm_abi::channel::{status, Completion};
use guest_kernel::println;
use guest_kernel::shared::SharedRegion;
use guest_kernel::time::Instant;

use crate::driver::{
    Direction, DriverError, LinkState, MacAddress, NetCompleted, NetDriver, NetProperties,
    RxFilters, SubmitError,
};
use crate::faults::{Sabotage, Taken};
use crate::service::{fail, ChannelService};
use crate::vmm_channel::Channel;

/// How often the link is read (one register access) to notice a change.
pub const LINK_CHECK_US: u64 = 100_000;

/// The shortest frame the service hands the NIC: an Ethernet header.
const MIN_FRAME: u32 = 14;

/// What the service tells the VMM about the NIC.
pub fn device_info(nic: &NetProperties, link: LinkState, model: &str) -> DeviceInfo {
    let mut info = DeviceInfo {
        mac: nic.mac.0,
        max_frame: nic.max_frame,
        link: link_word(link),
        speed_mbps: if link.up {
            u32::from(link.speed_mbps)
        } else {
            0
        },
        unicast_filters: nic.unicast_filters,
        rx_buffer: nic.rx_buffer_len,
        ..DeviceInfo::default()
    };
    let n = model.len().min(info.model.len());
    info.model[..n].copy_from_slice(&model.as_bytes()[..n]);
    info
}

fn link_word(l: LinkState) -> u32 {
    if l.up {
        link::UP
    } else {
        link::DOWN
    }
}

/// A request in flight on the NIC, packed into the driver's per-buffer token: tag and the
/// request's length.
fn token(tag: u32, len: u32) -> u64 {
    u64::from(tag) | u64::from(len) << 32
}

/// A buffer taken from the ring and not yet on the NIC.
#[derive(Clone, Copy, Debug)]
struct Buffer {
    tag: u32,
    addr: u64,
    len: u32,
}

/// Where an orderly stop (`op::SHUTDOWN`) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Transmits on the NIC are still to complete.
    Draining { tag: u32 },
    /// The NIC is told to stop; waiting for it to read back stopped.
    Stopping { tag: u32 },
    /// Stopped: nothing more reaches the NIC.
    Done,
}

/// The service over one network channel.
pub struct NetService {
    channel: Channel,
    region: SharedRegion,
    requests: Consumer<Request>,
    completions: Producer<Completion>,
    nic: Option<Box<dyn NetDriver>>,
    info: DeviceInfo,
    epoch: u32,
    unpublished: bool,
    sabotage: Sabotage,
    /// Transmits taken, waiting for room on the NIC's ring, in order.
    tx_waiting: VecDeque<Buffer>,
    /// Receive buffers taken, waiting for room on the NIC's ring, in order.
    rx_waiting: VecDeque<Buffer>,
    /// Tags of the receive buffers on the NIC (a stop completes them).
    rx_on_nic: Vec<u32>,
    stop: Option<Stop>,
    /// The link word as last written.
    link: u32,
    link_checked: Instant,
}

impl NetService {
    /// Serves `channel` (geometry checked, device info written, ready marked) with `nic`
    /// (none: every request completes `UNSUPPORTED`). Resumes at the ring indices the VMM left
    /// in shared memory.
    pub fn new(channel: Channel, nic: Option<Box<dyn NetDriver>>, info: DeviceInfo) -> Self {
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
        NetService {
            channel,
            region,
            requests: Consumer::starting_at(req, h.req_entries, req_index),
            completions: Producer::starting_at(cpl, h.cpl_entries, cpl_index),
            nic,
            link: info.link,
            info,
            epoch: h.epoch as u32,
            unpublished: false,
            sabotage: Sabotage::default(),
            tx_waiting: VecDeque::new(),
            rx_waiting: VecDeque::new(),
            rx_on_nic: Vec::new(),
            stop: None,
            link_checked: Instant::now(),
        }
    }

    fn on_nic(&self, ring: Direction) -> usize {
        self.nic.as_ref().map_or(0, |n| n.in_flight(ring))
    }

    /// Requests taken and not yet completed on the ring.
    fn taken(&self) -> usize {
        let stopping = matches!(
            self.stop,
            Some(Stop::Draining { .. } | Stop::Stopping { .. })
        );
        self.on_nic(Direction::Transmit)
            + self.on_nic(Direction::Receive)
            + self.tx_waiting.len()
            + self.rx_waiting.len()
            + self.sabotage.held()
            + usize::from(stopping)
    }

    /// Posts the completions the NIC has; returns how many.
    fn reap(&mut self) -> usize {
        if self.stop == Some(Stop::Done) {
            return 0;
        }
        let Some(nic) = self.nic.as_mut() else {
            return 0;
        };
        let completions = &mut self.completions;
        let region = &self.region;
        let epoch = self.epoch;
        let channel = &self.channel;
        let sabotage = &mut self.sabotage;
        let rx_on_nic = &mut self.rx_on_nic;
        let mut posted = 0;
        let result = nic.poll(&mut |d: NetCompleted| {
            let tag = d.token as u32;
            let ok = d.status.is_success();
            let len = match d.direction {
                Direction::Receive => {
                    if let Some(at) = rx_on_nic.iter().position(|t| *t == tag) {
                        rx_on_nic.swap_remove(at);
                    }
                    d.len
                }
                Direction::Transmit => (d.token >> 32) as u32,
            };
            let c = Completion {
                tag,
                status: if ok { status::OK } else { status::IO_ERROR },
                detail: d.status.detail(),
                len: if ok { len } else { 0 },
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
        posted
    }

    /// Posts what fault injection has ready (see the block service's).
    fn post_injected(&mut self) -> usize {
        let mut posted = 0;
        while let Some(c) = self.sabotage.due() {
            self.push(&c);
            posted += 1;
        }
        if let Some(tag) = self.sabotage.bogus_tag {
            if self.has_room_for(self.taken() as u32 + 1) {
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

    /// Takes as many requests as the completion ring has room for.
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
            let need = self.taken() as u32 + u32::from(self.sabotage.bogus_tag.is_some()) + 1;
            if !self.has_room_for(need) {
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
        }
        taken
    }

    /// Whether the completion ring has `need` free entries.
    fn has_room_for(&mut self, need: u32) -> bool {
        if self.completions.free() >= need {
            return true;
        }
        match self.completions.refresh(&self.region) {
            Ok(free) => free >= need,
            Err(e) => self.vmm_broke(e),
        }
    }

    /// Validates `req` and queues it for the NIC, or completes it at once.
    fn serve(&mut self, req: &Request) {
        if self.sabotage.taken(req.tag, req.len, Taken::Other) {
            return self.complete(req.tag, status::IO_ERROR, 0);
        }
        if self.stop.is_some() {
            return self.complete(req.tag, status::IO_ERROR, 0);
        }
        if req.flags != 0 {
            return self.complete(req.tag, status::BAD_REQUEST, 0);
        }
        let slot_ok = |len: u32| {
            self.channel
                .header()
                .data_range_ok(req.data, u64::from(len))
        };
        match req.op {
            op::TRANSMIT | op::RECEIVE => {
                let len_ok = if req.op == op::TRANSMIT {
                    (MIN_FRAME..=self.info.max_frame).contains(&req.len)
                } else {
                    req.len >= self.info.rx_buffer
                };
                if !len_ok || !slot_ok(req.len) {
                    return self.complete(req.tag, status::BAD_REQUEST, 0);
                }
                if self.nic.is_none() {
                    return self.complete(req.tag, status::UNSUPPORTED, 0);
                }
                let mut addr = self.region.base() + req.data;
                if let Some(outside) = self.sabotage.redirect(req.tag) {
                    addr = outside;
                }
                let b = Buffer {
                    tag: req.tag,
                    addr,
                    len: req.len,
                };
                if req.op == op::TRANSMIT {
                    self.tx_waiting.push_back(b);
                } else {
                    self.rx_waiting.push_back(b);
                }
            }
            op::CONFIG => {
                let len = req.len as usize;
                if len > MAX_FILTER_SET_LEN || !slot_ok(req.len) {
                    return self.complete(req.tag, status::BAD_REQUEST, 0);
                }
                let mut bytes = [0u8; MAX_FILTER_SET_LEN];
                self.region.read_bytes(req.data, &mut bytes[..len]);
                let code = match FilterSet::decode(&bytes[..len]) {
                    Ok(set) => self.configure(&set),
                    Err(e) => {
                        println!("net: filter set refused: {e:?}");
                        status::BAD_REQUEST
                    }
                };
                self.complete(req.tag, code, 0);
            }
            op::SHUTDOWN => {
                if req.len != 0 || req.data != 0 {
                    return self.complete(req.tag, status::BAD_REQUEST, 0);
                }
                if self.nic.is_none() {
                    return self.complete(req.tag, status::UNSUPPORTED, 0);
                }
                let waiting: Vec<Buffer> = self
                    .tx_waiting
                    .drain(..)
                    .chain(self.rx_waiting.drain(..))
                    .collect();
                for b in waiting {
                    self.complete(b.tag, status::IO_ERROR, 0);
                }
                self.stop = Some(Stop::Draining { tag: req.tag });
            }
            _ => self.complete(req.tag, status::UNSUPPORTED, 0),
        }
    }

    /// Applies a filter set; returns the completion's status.
    fn configure(&mut self, set: &FilterSet) -> u16 {
        let Some(nic) = self.nic.as_mut() else {
            return status::UNSUPPORTED;
        };
        let unicast: Vec<MacAddress> = set
            .unicast
            .as_slice()
            .iter()
            .map(|m| MacAddress(*m))
            .collect();
        let multicast: Vec<MacAddress> = set
            .multicast
            .as_slice()
            .iter()
            .map(|m| MacAddress(*m))
            .collect();
        let filters = RxFilters {
            mac: MacAddress(self.info.mac),
            unicast: &unicast,
            multicast: &multicast,
            broadcast: set.flags & filter_flags::BROADCAST != 0,
            all_unicast: set.flags & filter_flags::PROMISCUOUS != 0,
            all_multicast: set.flags & filter_flags::ALL_MULTICAST != 0,
        };
        match nic.set_filters(&filters) {
            Ok(()) => {
                println!(
                    "net: filters: {} unicast, {} multicast, flags {:#x}",
                    unicast.len(),
                    multicast.len(),
                    set.flags
                );
                status::OK
            }
            Err(_) => status::BAD_REQUEST,
        }
    }

    /// Hands waiting buffers to the NIC as its rings have room, then tells it. Returns how
    /// many went.
    fn feed(&mut self) -> usize {
        let mut fed = 0;
        for ring in [Direction::Transmit, Direction::Receive] {
            loop {
                let queue = match ring {
                    Direction::Transmit => &mut self.tx_waiting,
                    Direction::Receive => &mut self.rx_waiting,
                };
                let Some(b) = queue.front().copied() else {
                    break;
                };
                let Some(nic) = self.nic.as_mut() else {
                    break;
                };
                let t = token(b.tag, b.len);
                let r = match ring {
                    Direction::Transmit => nic.transmit(b.addr, b.len, t),
                    Direction::Receive => nic.post_receive(b.addr, b.len, t),
                };
                match r {
                    Ok(()) => {
                        queue.pop_front();
                        if ring == Direction::Receive {
                            self.rx_on_nic.push(b.tag);
                        }
                        fed += 1;
                    }
                    Err(SubmitError::Full) => break,
                    Err(SubmitError::Invalid | SubmitError::Unsupported) => {
                        queue.pop_front();
                        self.complete(b.tag, status::BAD_REQUEST, 0);
                    }
                }
            }
        }
        if fed > 0 {
            if let Some(nic) = self.nic.as_mut() {
                nic.ring();
            }
        }
        fed
    }

    /// Moves an orderly stop along. Returns 1 when it moved.
    fn stop_step(&mut self) -> usize {
        let Some(stop) = self.stop else {
            return 0;
        };
        let held = self.sabotage.held();
        let Some(nic) = self.nic.as_mut() else {
            return 0;
        };
        match stop {
            Stop::Draining { tag } => {
                if nic.in_flight(Direction::Transmit) > 0 || held > 0 {
                    return 0;
                }
                nic.begin_shutdown();
                self.stop = Some(Stop::Stopping { tag });
                1
            }
            Stop::Stopping { tag } => {
                let code = match nic.shutdown_done() {
                    Ok(false) => return 0,
                    Ok(true) => status::OK,
                    Err(e) => {
                        println!("stop: {e}");
                        status::IO_ERROR
                    }
                };
                self.stop = Some(Stop::Done);
                for t in core::mem::take(&mut self.rx_on_nic) {
                    self.complete(t, status::IO_ERROR, 0);
                }
                if code == status::OK {
                    println!("stop: NIC stopped");
                }
                self.complete(tag, code, 0);
                1
            }
            Stop::Done => 0,
        }
    }

    /// Every [`LINK_CHECK_US`]: reads the link, rewrites the link word when it changed.
    fn check_link(&mut self) {
        match self.sabotage.flap() {
            Some(Some(up)) => {
                self.channel
                    .write_link(if up { link::UP } else { link::DOWN });
                return;
            }
            Some(None) => self.channel.write_link(self.link),
            None => {}
        }
        if self.link_checked.elapsed_us() < LINK_CHECK_US || self.stop.is_some() {
            return;
        }
        self.link_checked = Instant::now();
        let Some(nic) = self.nic.as_ref() else {
            return;
        };
        let now = link_word(nic.link());
        if now != self.link {
            println!("net: link {}", if now == link::UP { "up" } else { "down" });
            self.link = now;
            self.channel.write_link(now);
        }
    }

    /// Completes a request at once (room was reserved).
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

    /// Publishes pushed completions and notifies the VMM if it asked.
    fn publish(&mut self) {
        if !self.unpublished {
            return;
        }
        self.unpublished = false;
        self.completions.publish(&self.region);
        if self.channel.vmm_wants_notify() {
            guest_kernel::vmm::notify();
        }
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

impl ChannelService for NetService {
    fn channel(&self) -> &Channel {
        &self.channel
    }

    fn channel_mut(&mut self) -> &mut Channel {
        &mut self.channel
    }

    fn pass(&mut self) -> bool {
        let completed = self.reap();
        let injected = self.post_injected();
        let taken = self.take_requests();
        let fed = self.feed();
        let stopped = self.stop_step();
        self.check_link();
        self.publish();
        completed + injected + taken + fed + stopped > 0
    }

    fn in_flight(&self) -> usize {
        self.taken()
    }

    /// Only transmits (and a stop) end without a frame from outside: a wait with receive
    /// buffers alone posted may be long.
    fn polled_wait(&self) -> bool {
        let interrupts = self.nic.as_ref().is_some_and(|n| n.interrupts());
        let tx = self.on_nic(Direction::Transmit) + self.tx_waiting.len();
        !interrupts && (tx > 0 || self.sabotage.held() > 0 || self.sabotage.flapping())
    }

    fn prepare_wait(&mut self) -> bool {
        self.channel.set_waiting(true);
        let requests = match self.requests.refresh(&self.region) {
            Ok(n) => n,
            Err(e) => self.vmm_broke(e),
        };
        // Before the descriptors are looked at: a frame that lands after this raises a cause
        // the wait sees (see the module documentation).
        if let Some(nic) = self.nic.as_mut().filter(|n| n.interrupts()) {
            nic.acknowledge();
        }
        let device = self.stop != Some(Stop::Done)
            && self.nic.as_ref().is_some_and(|n| n.completion_pending());
        let stopping = matches!(self.stop, Some(Stop::Stopping { .. }));
        if requests > 0 || device || self.sabotage.ready() || stopping {
            self.channel.set_waiting(false);
            return false;
        }
        true
    }

    fn woke(&mut self) {
        self.channel.set_waiting(false);
    }

    #[cfg(feature = "fault-injection")]
    fn sabotage(&mut self) -> &mut Sabotage {
        &mut self.sabotage
    }

    #[cfg(feature = "fault-injection")]
    fn skip_completion_producer(&mut self, by: u32) {
        let h = self.channel.header();
        let index = self.completions.index().wrapping_add(by);
        self.completions = Producer::starting_at(u64::from(h.cpl_ring), h.cpl_entries, index);
        self.unpublished = true;
    }
}
