//! The virtio-net device a client guest sees, and the port it shares with the network
//! service.
//!
//! As for virtio-blk, the device on the client's MMIO bus owns only its configuration; the
//! queues go to the [`NetPort`], which the service thread drives: [`NetPort::transmit`] hands
//! the client's frames to a [`TxBackend`], [`NetPort::complete_tx`] gives a chain back once
//! the NIC reported its frame sent (at-least-once: a TX chain stays the device's until then),
//! [`NetPort::receive`] places a frame into the client's RX buffers or drops it (a client
//! without buffers loses its frame, it never holds up the NIC or its neighbours), and
//! [`NetPort::control`] serves the control queue, whose commands update the client's
//! configuration record ([`ClientConfig`], which the switch turns into the NIC's filters).
//!
//! Queues: RX (0), TX (1), control (2, with CTRL_VQ). Every write into the client's memory
//! happens under the port's lock and only while the queues are the ones of the current
//! generation: a device reset takes them away under the lock, so after it returns nothing
//! more is read from or written into the client's buffers for what it abandoned, and a TX
//! completion for a chain of an older generation is ignored.

use std::num::Wrapping;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_net as n;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, CtrlInvalid, Invalid, Segment, HDR_LEN, NUM_BUFFERS_AT};
use super::switch::{is_group, ClientConfig, Mac, MacTable};
use crate::memory::GuestMem;
use crate::virtio::{features, interrupt, ActivateError, Interrupt, VirtioDevice};

/// Virtio device ID of a network device.
pub const DEVICE_ID: u32 = 1;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// The control queue (with CTRL_VQ).
pub const CTRL_QUEUE: usize = 2;
/// Entries of the RX and TX queues.
pub const QUEUE_SIZE: u16 = 256;
/// Entries of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// Bytes of an Ethernet header and an 802.1Q tag, on top of the MTU.
const L2_OVERHEAD: usize = 14 + 4;

/// virtio-net feature bits.
pub mod feature {
    use virtio_bindings::virtio_net as n;

    /// VIRTIO_NET_F_MTU.
    pub const MTU: u64 = 1 << n::VIRTIO_NET_F_MTU;
    /// VIRTIO_NET_F_MAC.
    pub const MAC: u64 = 1 << n::VIRTIO_NET_F_MAC;
    /// VIRTIO_NET_F_MRG_RXBUF.
    pub const MRG_RXBUF: u64 = 1 << n::VIRTIO_NET_F_MRG_RXBUF;
    /// VIRTIO_NET_F_STATUS.
    pub const STATUS: u64 = 1 << n::VIRTIO_NET_F_STATUS;
    /// VIRTIO_NET_F_CTRL_VQ.
    pub const CTRL_VQ: u64 = 1 << n::VIRTIO_NET_F_CTRL_VQ;
    /// VIRTIO_NET_F_CTRL_RX.
    pub const CTRL_RX: u64 = 1 << n::VIRTIO_NET_F_CTRL_RX;
    /// VIRTIO_NET_F_CTRL_VLAN (acknowledged; VLAN filtering is not done).
    pub const CTRL_VLAN: u64 = 1 << n::VIRTIO_NET_F_CTRL_VLAN;
    /// VIRTIO_NET_F_CTRL_RX_EXTRA (ALLUNI, NOMULTI, NOUNI, NOBCAST).
    pub const CTRL_RX_EXTRA: u64 = 1 << n::VIRTIO_NET_F_CTRL_RX_EXTRA;
    /// VIRTIO_NET_F_GUEST_ANNOUNCE.
    pub const GUEST_ANNOUNCE: u64 = 1 << n::VIRTIO_NET_F_GUEST_ANNOUNCE;
    /// VIRTIO_NET_F_CTRL_MAC_ADDR.
    pub const CTRL_MAC_ADDR: u64 = 1 << n::VIRTIO_NET_F_CTRL_MAC_ADDR;
}

/// Every feature the device offers.
pub const FEATURES: u64 = features::VERSION_1
    | features::INDIRECT_DESC
    | features::EVENT_IDX
    | feature::MTU
    | feature::MAC
    | feature::MRG_RXBUF
    | feature::STATUS
    | feature::CTRL_VQ
    | feature::CTRL_RX
    | feature::CTRL_VLAN
    | feature::CTRL_RX_EXTRA
    | feature::GUEST_ANNOUNCE
    | feature::CTRL_MAC_ADDR;

/// Link status bits (`virtio_net_config::status`).
pub mod link {
    /// VIRTIO_NET_S_LINK_UP.
    pub const UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;
    /// VIRTIO_NET_S_ANNOUNCE.
    pub const ANNOUNCE: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_ANNOUNCE as u16;
}

/// Control command answers.
pub mod ack {
    /// VIRTIO_NET_OK.
    pub const OK: u8 = virtio_bindings::virtio_net::VIRTIO_NET_OK as u8;
    /// VIRTIO_NET_ERR.
    pub const ERR: u8 = virtio_bindings::virtio_net::VIRTIO_NET_ERR as u8;
}

/// What the client's device looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The client's static MAC.
    pub mac: Mac,
    /// MTU advertised (the largest frame a client sends is this plus 18 bytes).
    pub mtu: u16,
}

impl NetConfig {
    /// Largest frame accepted from the client (Ethernet header and a VLAN tag included).
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + L2_OVERHEAD
    }
}

/// Counters of one client port.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// TX frames handed to the backend.
    pub tx_frames: AtomicU64,
    /// TX chains given back unsent (malformed, oversized, wrong direction, ...).
    pub tx_dropped: AtomicU64,
    /// TX chains given back after the backend reported them sent.
    pub tx_completed: AtomicU64,
    /// TX completions for chains not in flight (after a reset, or twice): ignored.
    pub tx_stale: AtomicU64,
    /// Frames placed into the client's RX buffers.
    pub rx_frames: AtomicU64,
    /// Frames dropped because the client had no (or not enough) RX buffers.
    pub rx_no_buffers: AtomicU64,
    /// Frames dropped because an RX buffer was too small (without MRG_RXBUF).
    pub rx_too_small: AtomicU64,
    /// RX chains given back empty because they were malformed.
    pub rx_bad_chains: AtomicU64,
    /// Frames dropped because the device was not running.
    pub rx_not_ready: AtomicU64,
    /// Control commands answered OK.
    pub ctrl_ok: AtomicU64,
    /// Control commands answered ERR, or given back without an answer.
    pub ctrl_err: AtomicU64,
    /// Times a queue was found unusable (DEVICE_NEEDS_RESET).
    pub needs_reset: AtomicU64,
    /// Bytes of the TX frames handed to the backend.
    pub tx_bytes: AtomicU64,
    /// Bytes of the frames placed into the client's RX buffers.
    pub rx_bytes: AtomicU64,
}

/// A snapshot of a port's [`NetCounters`], as the service's stats show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// See [`NetCounters::tx_frames`].
    pub tx_frames: u64,
    /// See [`NetCounters::tx_dropped`].
    pub tx_dropped: u64,
    /// See [`NetCounters::tx_completed`].
    pub tx_completed: u64,
    /// See [`NetCounters::tx_stale`].
    pub tx_stale: u64,
    /// See [`NetCounters::rx_frames`].
    pub rx_frames: u64,
    /// See [`NetCounters::rx_no_buffers`].
    pub rx_no_buffers: u64,
    /// See [`NetCounters::rx_too_small`].
    pub rx_too_small: u64,
    /// See [`NetCounters::rx_bad_chains`].
    pub rx_bad_chains: u64,
    /// See [`NetCounters::rx_not_ready`].
    pub rx_not_ready: u64,
    /// See [`NetCounters::ctrl_ok`].
    pub ctrl_ok: u64,
    /// See [`NetCounters::ctrl_err`].
    pub ctrl_err: u64,
    /// See [`NetCounters::needs_reset`].
    pub needs_reset: u64,
}

impl NetCounters {
    /// The counters now.
    pub fn snapshot(&self) -> PortCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PortCounters {
            tx_frames: g(&self.tx_frames),
            tx_dropped: g(&self.tx_dropped),
            tx_completed: g(&self.tx_completed),
            tx_stale: g(&self.tx_stale),
            rx_frames: g(&self.rx_frames),
            rx_no_buffers: g(&self.rx_no_buffers),
            rx_too_small: g(&self.rx_too_small),
            rx_bad_chains: g(&self.rx_bad_chains),
            rx_not_ready: g(&self.rx_not_ready),
            ctrl_ok: g(&self.ctrl_ok),
            ctrl_err: g(&self.ctrl_err),
            needs_reset: g(&self.needs_reset),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A TX chain in flight: what the backend gives back to [`NetPort::complete_tx`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxToken {
    generation: u64,
    head: u16,
}

impl TxToken {
    /// A token for tests of what carries it.
    #[cfg(test)]
    pub(crate) fn for_test(head: u16) -> TxToken {
        TxToken {
            generation: 1,
            head,
        }
    }
}

/// What a [`TxBackend`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxVerdict {
    /// Taken: the backend calls [`NetPort::complete_tx`] with the token once the frame was
    /// sent (or dropped on the way).
    Queued,
    /// Done already (hairpinned only, or dropped by the switch): the chain is given back now.
    Done,
    /// No room: the frame is not taken; its chain stays first in the client's ring.
    Busy,
}

/// Where a client's frames go. Called with the port's lock held: it must not call back into
/// the same port (it may deliver hairpinned copies to other ports).
pub trait TxBackend {
    /// Takes `frame` (Ethernet header first, no virtio header, no CRC).
    fn transmit(&mut self, token: TxToken, frame: &[u8]) -> TxVerdict;
}

/// What became of a frame offered to [`NetPort::receive`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rx {
    /// Placed into this many of the client's RX chains.
    Delivered(u16),
    /// The client has no (or not enough) RX buffers.
    NoBuffers,
    /// The client's buffer is too small (without MRG_RXBUF): the buffer is given back empty.
    TooSmall,
    /// A malformed RX chain: given back empty.
    BadChain,
    /// The device is not running (not set up, reset, or needing a reset).
    NotReady,
}

/// The queues and record as the service sees them.
struct PortState {
    queues: Vec<Option<Queue>>,
    /// `next_used` of each queue when its driver was last signalled (EVENT_IDX).
    signalled: [u16; 3],
    /// Queues with used entries not yet signalled.
    pending: u8,
    generation: u64,
    acked: u64,
    needs_reset: bool,
    /// TX heads in flight.
    tx_heads: Vec<bool>,
    config: ClientConfig,
    config_changed: bool,
    status: u16,
    frame: Vec<u8>,
}

/// One client's virtio-net device as the network service serves it.
pub struct NetPort {
    /// Name (for logs and reports).
    pub name: String,
    /// The client's memory.
    pub mem: GuestMem,
    /// MAC and MTU.
    pub config: NetConfig,
    /// Queue notifications (the QueueNotify ioeventfd); activation also writes it.
    pub notify: EventFd,
    /// The client's interrupt.
    pub interrupt: Interrupt,
    /// Counters.
    pub counters: NetCounters,
    state: Mutex<PortState>,
}

impl NetPort {
    /// A port for a client with memory `mem`; the link starts up.
    pub fn new(
        name: &str,
        mem: GuestMem,
        config: NetConfig,
        interrupt: Interrupt,
    ) -> std::io::Result<Arc<NetPort>> {
        Ok(Arc::new(NetPort {
            name: name.to_string(),
            mem,
            config,
            notify: EventFd::new(libc::EFD_NONBLOCK)?,
            interrupt,
            counters: NetCounters::default(),
            state: Mutex::new(PortState {
                queues: Vec::new(),
                signalled: [0; 3],
                pending: 0,
                generation: 0,
                acked: 0,
                needs_reset: false,
                tx_heads: vec![false; usize::from(QUEUE_SIZE)],
                config: ClientConfig::default(),
                config_changed: false,
                status: link::UP,
                frame: Vec::new(),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, PortState> {
        crate::sync::lock(&self.state)
    }

    /// Whether the device has given up on the driver's queues until a reset.
    pub fn needs_reset(&self) -> bool {
        self.lock().needs_reset
    }

    /// Features the driver accepted (0 while the device is not running).
    pub fn acked_features(&self) -> u64 {
        self.lock().acked
    }

    /// The client's configuration record.
    pub fn config_record(&self) -> ClientConfig {
        self.lock().config.clone()
    }

    /// The record, if it changed since the last call (the switch must then be told).
    pub fn take_config_change(&self) -> Option<ClientConfig> {
        let mut st = self.lock();
        std::mem::take(&mut st.config_changed).then(|| st.config.clone())
    }

    /// The link status word (`link::UP`, `link::ANNOUNCE`).
    pub fn status(&self) -> u16 {
        self.lock().status
    }

    /// Sets the link state; a driver with STATUS gets a configuration interrupt.
    pub fn set_link(&self, up: bool) {
        let mut st = self.lock();
        let old = st.status;
        st.status = if up { st.status | link::UP } else { 0 };
        if st.status != old && st.acked & feature::STATUS != 0 {
            self.interrupt.raise(interrupt::CONFIG);
        }
    }

    /// Asks the driver to announce itself (gratuitous ARP, unsolicited neighbour
    /// advertisements), e.g. after the NIC behind it changed. False when the driver did not
    /// accept GUEST_ANNOUNCE or the link is down.
    pub fn announce(&self) -> bool {
        let mut st = self.lock();
        if st.acked & feature::GUEST_ANNOUNCE == 0 || st.status & link::UP == 0 {
            return false;
        }
        st.status |= link::ANNOUNCE;
        self.interrupt.raise(interrupt::CONFIG);
        true
    }

    fn give_up(&self, st: &mut PortState, why: &str) {
        if !st.needs_reset {
            crate::limited!(
                warn,
                key: self.name,
                "{}: virtio-net queue unusable ({why}); device needs reset",
                self.name
            );
            st.needs_reset = true;
            bump(&self.counters.needs_reset);
            self.interrupt.raise(interrupt::CONFIG);
        }
    }

    /// Puts `entries` (head, length) into queue `q`'s used ring, publishing the used index
    /// once, after all of them (a driver must never see part of a merged frame).
    fn publish(&self, st: &mut PortState, q: usize, entries: &[(u16, u32)]) -> bool {
        let Some((&(last, last_len), first)) = entries.split_last() else {
            return true;
        };
        if st.needs_reset {
            return false;
        }
        let Some(Some(queue)) = st.queues.get_mut(q) else {
            return false;
        };
        let size = queue.size();
        let start = queue.next_used();
        let ring = queue.used_ring();
        let mut ok = true;
        for (k, &(head, len)) in first.iter().enumerate() {
            let slot = u64::from(start.wrapping_add(k as u16) % size);
            let at = GuestAddress(ring + 4 + slot * 8);
            ok &= head < size
                && self.mem.write_obj(u32::from(head), at).is_ok()
                && self.mem.write_obj(len, GuestAddress(at.0 + 4)).is_ok();
        }
        if ok {
            queue.set_next_used(start.wrapping_add(first.len() as u16));
            ok = queue.add_used(&self.mem, last, last_len).is_ok();
        }
        if !ok {
            queue.set_next_used(start);
            self.give_up(st, "used ring not writable");
            return false;
        }
        st.pending |= 1 << q;
        true
    }

    /// Signals the driver for the queues that got used entries, where it asks for it.
    fn signal(&self, st: &mut PortState) {
        let pending = std::mem::take(&mut st.pending);
        let mut raise = false;
        for q in 0..st.queues.len().min(3) {
            if pending >> q & 1 == 0 {
                continue;
            }
            let Some(queue) = st.queues[q].as_ref() else {
                continue;
            };
            let new = queue.next_used();
            let old = std::mem::replace(&mut st.signalled[q], new);
            if !queue.event_idx_enabled() {
                raise = true;
                continue;
            }
            std::sync::atomic::fence(Ordering::SeqCst);
            let at = queue.avail_ring() + 4 + 2 * u64::from(queue.size());
            let Ok(event) = self.mem.read_obj::<u16>(GuestAddress(at)) else {
                raise = true;
                continue;
            };
            let (new, old, event) = (Wrapping(new), Wrapping(old), Wrapping(u16::from_le(event)));
            raise |= new - event - Wrapping(1) < new - old;
        }
        if raise {
            self.interrupt.raise(interrupt::VRING);
        }
    }

    /// Takes up to `budget` TX chains and hands their frames to `backend`. Returns the chains
    /// taken.
    pub fn transmit(&self, backend: &mut dyn TxBackend, budget: usize) -> usize {
        let mut st = self.lock();
        let st = &mut *st;
        let generation = st.generation;
        let max_frame = self.config.max_frame();
        let mut n = 0;
        let mut unusable = None;
        let mut done = Vec::new();
        while n < budget && !st.needs_reset {
            let Some(Some(q)) = st.queues.get_mut(TX_QUEUE) else {
                break;
            };
            let chain = match q.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    unusable = Some("available index moved past the queue size");
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if st.tx_heads.get(usize::from(head)).copied().unwrap_or(true) {
                unusable = Some("a TX head published again while still in flight");
                break;
            }
            match request::parse_tx(chain, &self.mem, max_frame, &mut st.frame) {
                Ok(()) => {
                    let token = TxToken { generation, head };
                    match backend.transmit(token, &st.frame) {
                        TxVerdict::Queued => {
                            st.tx_heads[usize::from(head)] = true;
                            bump(&self.counters.tx_frames);
                            self.counters
                                .tx_bytes
                                .fetch_add(st.frame.len() as u64, Ordering::Relaxed);
                        }
                        TxVerdict::Done => {
                            bump(&self.counters.tx_frames);
                            self.counters
                                .tx_bytes
                                .fetch_add(st.frame.len() as u64, Ordering::Relaxed);
                            bump(&self.counters.tx_completed);
                            done.push((head, 0));
                        }
                        TxVerdict::Busy => {
                            q.go_to_previous_position();
                            break;
                        }
                    }
                }
                Err(Invalid::Drop(why)) => {
                    crate::limited!(debug, key: self.name, "{}: TX chain dropped: {why}", self.name);
                    bump(&self.counters.tx_dropped);
                    done.push((head, 0));
                }
                Err(Invalid::Unusable(why)) => {
                    unusable = Some(why);
                    break;
                }
            }
            n += 1;
        }
        // Given back one by one: each is a whole frame.
        for entry in done {
            self.publish(st, TX_QUEUE, &[entry]);
        }
        if let Some(why) = unusable {
            self.give_up(st, why);
        }
        self.signal(st);
        n
    }

    /// The backend is done with the frame of `token` (sent, or lost on the way): its chain
    /// goes back to the client. False (and counted) when the chain is no longer in flight:
    /// the client reset its device since, or the token was completed already.
    pub fn complete_tx(&self, token: TxToken) -> bool {
        let mut st = self.lock();
        let st = &mut *st;
        let head = usize::from(token.head);
        if token.generation != st.generation || !st.tx_heads.get(head).copied().unwrap_or(false) {
            bump(&self.counters.tx_stale);
            return false;
        }
        st.tx_heads[head] = false;
        bump(&self.counters.tx_completed);
        if self.publish(st, TX_QUEUE, &[(token.head, 0)]) {
            self.signal(st);
        }
        true
    }

    /// TX chains in flight at the backend.
    pub fn tx_in_flight(&self) -> usize {
        self.lock().tx_heads.iter().filter(|&&b| b).count()
    }

    /// Places `frame` (Ethernet header first) into the client's RX buffers, behind a
    /// `virtio_net_hdr_v1`: one chain without MRG_RXBUF, as many as it takes with it
    /// (`num_buffers`). A client without room loses the frame: nothing waits for it.
    pub fn receive(&self, frame: &[u8]) -> Rx {
        let mut st = self.lock();
        let st = &mut *st;
        let outcome = self.receive_locked(st, frame);
        if matches!(outcome, Rx::Delivered(_)) {
            self.counters
                .rx_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
        let counter = match outcome {
            Rx::Delivered(_) => &self.counters.rx_frames,
            Rx::NoBuffers => &self.counters.rx_no_buffers,
            Rx::TooSmall => &self.counters.rx_too_small,
            Rx::BadChain => &self.counters.rx_bad_chains,
            Rx::NotReady => &self.counters.rx_not_ready,
        };
        bump(counter);
        self.signal(st);
        outcome
    }

    fn receive_locked(&self, st: &mut PortState, frame: &[u8]) -> Rx {
        if st.needs_reset {
            return Rx::NotReady;
        }
        let merge = st.acked & feature::MRG_RXBUF != 0;
        let Some(Some(q)) = st.queues.get_mut(RX_QUEUE) else {
            return Rx::NotReady;
        };
        let need = HDR_LEN + frame.len();
        let start = q.next_avail();
        let mut chains: Vec<(u16, Vec<Segment>)> = Vec::new();
        let mut room = 0usize;
        let mut bad = None;
        // With MRG_RXBUF at most the queue size of chains (each at least a byte); without,
        // one.
        let most = if merge { usize::from(q.size()) } else { 1 };
        while room < need && chains.len() < most {
            let chain = match q.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    bad = Some(Invalid::Unusable(
                        "available index moved past the queue size",
                    ));
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match request::parse_rx(chain, &self.mem) {
                Ok(segs) => {
                    room += request::capacity(&segs);
                    chains.push((head, segs));
                }
                Err(e) => {
                    chains.push((head, Vec::new()));
                    bad = Some(e);
                    break;
                }
            }
        }
        match bad {
            Some(Invalid::Unusable(why)) => {
                self.give_up(st, why);
                return Rx::NotReady;
            }
            Some(Invalid::Drop(why)) => {
                crate::limited!(debug, key: self.name, "{}: RX chain given back: {why}", self.name);
                // Every chain taken for this frame goes back empty.
                let empty: Vec<(u16, u32)> = chains.iter().map(|&(h, _)| (h, 0)).collect();
                self.publish(st, RX_QUEUE, &empty);
                return Rx::BadChain;
            }
            None => {}
        }
        if room < need {
            if merge || chains.is_empty() {
                // Not enough buffers: leave them to the next (perhaps smaller) frame.
                q.set_next_avail(start);
                return Rx::NoBuffers;
            }
            // One buffer smaller than a whole frame: the driver's error, the buffer goes back.
            let (head, _) = chains[0];
            self.publish(st, RX_QUEUE, &[(head, 0)]);
            return Rx::TooSmall;
        }
        let used = chains.len() as u16;
        let mut hdr = [0u8; HDR_LEN];
        hdr[NUM_BUFFERS_AT..NUM_BUFFERS_AT + 2].copy_from_slice(&used.to_le_bytes());
        let mut entries = Vec::with_capacity(chains.len());
        let mut at = 0usize;
        let whole = [&hdr[..], frame];
        for (head, segs) in &chains {
            let cap = request::capacity(segs);
            let len = cap.min(need - at);
            if !write_range(&self.mem, segs, &whole, at, len) {
                // A buffer that was in memory when parsed: only a hot-unplug gets here.
                self.give_up(st, "RX buffer not writable");
                return Rx::NotReady;
            }
            entries.push((*head, len as u32));
            at += len;
        }
        if self.publish(st, RX_QUEUE, &entries) {
            Rx::Delivered(used)
        } else {
            Rx::NotReady
        }
    }

    /// Serves up to `budget` control commands. Returns the commands taken.
    pub fn control(&self, budget: usize) -> usize {
        let mut st = self.lock();
        let st = &mut *st;
        let mut n = 0;
        let mut unusable = None;
        while n < budget && !st.needs_reset {
            let Some(Some(q)) = st.queues.get_mut(CTRL_QUEUE) else {
                break;
            };
            let chain = match q.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    unusable = Some("available index moved past the queue size");
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            n += 1;
            let (ack_at, value) = match request::parse_ctrl(chain, &self.mem) {
                Ok(cmd) => (cmd.ack, self.command(st, &cmd)),
                Err(CtrlInvalid::Err(at, why)) => {
                    crate::limited!(debug, key: self.name, "{}: control command refused: {why}", self.name);
                    (at, ack::ERR)
                }
                Err(CtrlInvalid::Chain(Invalid::Drop(_))) => {
                    bump(&self.counters.ctrl_err);
                    self.publish(st, CTRL_QUEUE, &[(head, 0)]);
                    continue;
                }
                Err(CtrlInvalid::Chain(Invalid::Unusable(why))) => {
                    unusable = Some(why);
                    break;
                }
            };
            bump(if value == ack::OK {
                &self.counters.ctrl_ok
            } else {
                &self.counters.ctrl_err
            });
            if self.mem.write_obj(value, GuestAddress(ack_at)).is_err() {
                unusable = Some("ack byte not writable");
                break;
            }
            self.publish(st, CTRL_QUEUE, &[(head, 1)]);
        }
        if let Some(why) = unusable {
            self.give_up(st, why);
        }
        self.signal(st);
        n
    }

    /// Applies one command to the record; the answer.
    fn command(&self, st: &mut PortState, cmd: &request::Command) -> u8 {
        let acked = st.acked;
        let has = |f: u64| acked & f != 0;
        let on = match cmd.data.as_slice() {
            [v @ (0 | 1)] => Some(*v == 1),
            _ => None,
        };
        let mut config = st.config.clone();
        let ok = match (u32::from(cmd.class), u32::from(cmd.command)) {
            (n::VIRTIO_NET_CTRL_RX, c) if has(feature::CTRL_RX) => {
                let extra = has(feature::CTRL_RX_EXTRA);
                let rx = &mut config.rx;
                let flag = match c {
                    n::VIRTIO_NET_CTRL_RX_PROMISC => Some(&mut rx.promisc),
                    n::VIRTIO_NET_CTRL_RX_ALLMULTI => Some(&mut rx.allmulti),
                    n::VIRTIO_NET_CTRL_RX_ALLUNI if extra => Some(&mut rx.alluni),
                    n::VIRTIO_NET_CTRL_RX_NOMULTI if extra => Some(&mut rx.nomulti),
                    n::VIRTIO_NET_CTRL_RX_NOUNI if extra => Some(&mut rx.nouni),
                    n::VIRTIO_NET_CTRL_RX_NOBCAST if extra => Some(&mut rx.nobcast),
                    _ => None,
                };
                match (flag, on) {
                    (Some(flag), Some(on)) => {
                        *flag = on;
                        true
                    }
                    _ => false,
                }
            }
            (n::VIRTIO_NET_CTRL_MAC, n::VIRTIO_NET_CTRL_MAC_TABLE_SET) if has(feature::CTRL_RX) => {
                match mac_tables(&cmd.data) {
                    Some((uni, multi)) => {
                        config.unicast = MacTable::new(uni);
                        config.multicast = MacTable::new(multi);
                        true
                    }
                    None => false,
                }
            }
            // The MAC is the VMM's: a driver may set only the one it has.
            (n::VIRTIO_NET_CTRL_MAC, n::VIRTIO_NET_CTRL_MAC_ADDR_SET)
                if has(feature::CTRL_MAC_ADDR) =>
            {
                cmd.data == self.config.mac
            }
            (
                n::VIRTIO_NET_CTRL_VLAN,
                n::VIRTIO_NET_CTRL_VLAN_ADD | n::VIRTIO_NET_CTRL_VLAN_DEL,
            ) if has(feature::CTRL_VLAN) => {
                // Acknowledged and ignored (no VLAN filtering), if well formed.
                cmd.data.len() == 2 && u16::from_le_bytes([cmd.data[0], cmd.data[1]]) < 4096
            }
            (n::VIRTIO_NET_CTRL_ANNOUNCE, n::VIRTIO_NET_CTRL_ANNOUNCE_ACK)
                if has(feature::GUEST_ANNOUNCE) && cmd.data.is_empty() =>
            {
                st.status &= !link::ANNOUNCE;
                true
            }
            _ => false,
        };
        if !ok {
            return ack::ERR;
        }
        if config != st.config {
            st.config = config;
            st.config_changed = true;
        }
        ack::OK
    }

    /// Asks for notifications on the TX and control queues (EVENT_IDX: avail_event); true
    /// when the driver published work meanwhile (do not sleep).
    pub fn arm(&self) -> bool {
        let mut st = self.lock();
        if st.needs_reset {
            return false;
        }
        let mut ready = false;
        for q in [TX_QUEUE, CTRL_QUEUE] {
            if let Some(Some(q)) = st.queues.get_mut(q) {
                ready |= q.enable_notification(&self.mem).unwrap_or(true);
            }
        }
        ready
    }

    /// Stops asking for notifications (the service is polling).
    pub fn disarm(&self) {
        let mut st = self.lock();
        for q in [TX_QUEUE, CTRL_QUEUE] {
            if let Some(Some(q)) = st.queues.get_mut(q) {
                let _ = q.disable_notification(&self.mem);
            }
        }
    }
}

/// Writes bytes `[from, from + len)` of the concatenation `whole` into `segs`.
fn write_range(
    mem: &GuestMem,
    segs: &[Segment],
    whole: &[&[u8]; 2],
    from: usize,
    len: usize,
) -> bool {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2);
    let (mut skip, mut left) = (from, len);
    for p in whole {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let take = (p.len() - skip).min(left);
        parts.push(&p[skip..skip + take]);
        left -= take;
        skip = 0;
        if left == 0 {
            break;
        }
    }
    request::scatter(mem, segs, &parts)
}

/// Parses MAC_TABLE_SET data: two tables of `entries: u32` and 6-byte addresses, exactly.
/// Unicast entries must be unicast addresses, multicast entries group addresses.
fn mac_tables(data: &[u8]) -> Option<(Vec<Mac>, Vec<Mac>)> {
    let mut rest = data;
    let mut table = |group: bool| -> Option<Vec<Mac>> {
        let (count, tail) = rest.split_first_chunk::<4>()?;
        let count = u32::from_le_bytes(*count) as usize;
        let bytes = count.checked_mul(6).filter(|&b| b <= tail.len())?;
        let macs: Vec<Mac> = tail[..bytes]
            .chunks_exact(6)
            .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
            .collect();
        rest = &tail[bytes..];
        macs.iter().all(|m| is_group(m) == group).then_some(macs)
    };
    let uni = table(false)?;
    let multi = table(true)?;
    rest.is_empty().then_some((uni, multi))
}

/// The virtio-net device on the client's transport.
pub struct VirtioNet {
    port: Arc<NetPort>,
    queue_sizes: [u16; 3],
}

impl VirtioNet {
    /// The device for `port`.
    pub fn new(port: Arc<NetPort>) -> Self {
        VirtioNet {
            port,
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE],
        }
    }

    /// The configuration space (`struct virtio_net_config`, little endian): MAC, status,
    /// max_virtqueue_pairs (1), MTU; the rest zero.
    fn config_bytes(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..6].copy_from_slice(&self.port.config.mac);
        c[6..8].copy_from_slice(&self.port.status().to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.port.config.mtu.to_le_bytes());
        c
    }
}

impl VirtioDevice for VirtioNet {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config_bytes();
        let start = offset as usize;
        if let Some(src) = start
            .checked_add(data.len())
            .and_then(|end| bytes.get(start..end))
        {
            data.copy_from_slice(src);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only under VERSION_1 (the MAC is set through the control queue).
    }

    fn activate(
        &mut self,
        acked: u64,
        mut queues: Vec<Option<Queue>>,
    ) -> Result<(), ActivateError> {
        if queues.len() > self.queue_sizes.len() {
            return Err(ActivateError::TooManyQueues {
                given: queues.len(),
                offered: self.queue_sizes.len(),
            });
        }
        if let Some(index) = queues
            .iter()
            .position(|q| q.as_ref().is_some_and(|q| !q.ready()))
        {
            return Err(ActivateError::QueueNotReady { index });
        }
        if acked & feature::CTRL_VQ == 0 {
            // Without CTRL_VQ the third queue is not the control queue: never served.
            queues.truncate(CTRL_QUEUE);
        }
        if queues.iter().flatten().next().is_none() {
            return Err(ActivateError::NoQueue);
        }
        {
            let mut st = self.port.lock();
            st.signalled = [0; 3];
            for (i, q) in queues.iter().enumerate() {
                if let Some(q) = q {
                    st.signalled[i] = q.next_used();
                }
            }
            st.queues = queues;
            st.generation += 1;
            st.acked = acked;
            st.needs_reset = false;
            st.pending = 0;
            st.tx_heads.fill(false);
        }
        let _ = self.port.notify.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        let mut st = self.port.lock();
        st.queues.clear();
        st.generation += 1;
        st.acked = 0;
        st.needs_reset = false;
        st.pending = 0;
        st.tx_heads.fill(false);
        st.status &= !link::ANNOUNCE;
        if st.config != ClientConfig::default() {
            st.config = ClientConfig::default();
            st.config_changed = true;
        }
    }

    fn needs_reset(&self) -> bool {
        self.port.needs_reset()
    }
}
