//! The network class of the reincarnation engine ([`crate::reincarnation`]): a NIC served by a
//! driver domain, with the recovery semantics of a network.
//!
//! - **The link stays up at the clients** through every restart: nothing here ever takes a
//!   client's virtio STATUS down; the service asks drivers that negotiated GUEST_ANNOUNCE to
//!   announce themselves once a new domain serves ([`NetBackend::serving_epoch`]).
//! - **Configuration first.** Every domain that becomes ready gets a CONFIG with the filter set
//!   the VMM computed from its clients before anything else, and again whenever a client's
//!   record changes the set ([`NetBackend::config_changed`]).
//! - **TX at-least-once.** A client's frame is the VMM's copy from the moment it is queued;
//!   its chain is given back only when a domain's TRANSMIT of it completes OK. Transmits in
//!   flight when a domain dies are requeued in place and sent to the next one after its
//!   CONFIG (the peer may see a frame twice, never lose one to a restart). A transmit that
//!   completes with an error is sent again, at most [`TX_ATTEMPTS`] times in all.
//! - **RX buffers are the VMM's** (empty channel slots, never a client's descriptors): those
//!   posted to a dead domain are dropped (a frame it received and did not report is lost, as
//!   a network may lose it), and fresh ones are posted to the next domain.
//! - **Detection**: a receive buffer waits for the world outside, so the request deadline
//!   applies to TRANSMIT and CONFIG only ([`NetOp`]'s `deadline_bound`).
//!
//! - **The domain's link word** is watched, not obeyed ([`LinkWatch`]): changes are counted,
//!   and a domain whose word changes more than [`LINK_FLAP_LIMIT`] times within
//!   [`LINK_FLAP_WINDOW`] is failed as misbehaving.
//!
//! Warm standbys, backoff, give-up, hooks and operator commands are the engine's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ddvm_abi::channel::net::{op, DeviceInfo, FilterSet};
use ddvm_abi::channel::{status as cstatus, ChannelHeader};
use ddvm_recovery::policy::Policy;
use ddvm_recovery::reason::{FailureReason, ProtocolViolation};
use ddvm_recovery::shadow::ShadowQueue;
use ddvm_recovery::supervisor::{Admission, Supervisor};

use super::channel::{NetChannel, NetDone};
use super::device::TxToken;
use super::replay::{Carried, NetOp};
use crate::blk::class::violation;
use crate::host_channel::SubmitError;
use crate::memory::GuestMem;
use crate::reincarnation::{
    DeviceClass, DomainHandle, Engine, EngineError, Launcher, RecoveryHandle,
};

/// Times a frame is handed to domains, at most, when each TRANSMIT completes with an error
/// (a domain that refuses every frame must not keep one for ever).
pub const TX_ATTEMPTS: u32 = 3;
/// Receive buffers kept posted, at most (the e1000 ring holds 64; the rest of the slots are
/// for transmits and the configuration).
pub const RX_POSTED: usize = 24;
/// Client frames queued (not yet posted) at most; beyond, clients keep theirs in their rings.
pub const TX_QUEUED_LIMIT: usize = 128;
/// Changes of a domain's link word within [`LINK_FLAP_WINDOW`] beyond which the domain is
/// failed as flapping. A domain reads its NIC's link every 100 ms
/// (`ddvm_abi::channel::net::offset::LINK`): a real cable can make it report at most ten
/// changes a second, so twice that is the domain's own doing.
pub const LINK_FLAP_LIMIT: usize = 20;
/// The window of [`LINK_FLAP_LIMIT`].
pub const LINK_FLAP_WINDOW: Duration = Duration::from_secs(1);

/// The domain's link word as the VMM samples it (once per service pass): changes are
/// counted, and too many of them within [`LINK_FLAP_WINDOW`] are misbehaviour. The clients'
/// links never follow it (they stay up through everything; see the module documentation).
#[derive(Debug, Default)]
pub struct LinkWatch {
    up: bool,
    /// When the last changes were seen, oldest first, within the window.
    changes: std::collections::VecDeque<Instant>,
}

impl LinkWatch {
    /// A new domain reported `up` in its device info.
    pub fn reset(&mut self, up: bool) {
        self.up = up;
        self.changes.clear();
    }

    /// The link as last seen.
    pub fn up(&self) -> bool {
        self.up
    }

    /// The link word reads `up` at `now`: `Ok(true)` if that is a change, `Err(n)` when it
    /// is the change that makes `n` (over [`LINK_FLAP_LIMIT`]) within the window.
    pub fn observe(&mut self, up: bool, now: Instant) -> Result<bool, usize> {
        if up == self.up {
            return Ok(false);
        }
        self.up = up;
        while self
            .changes
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= LINK_FLAP_WINDOW)
        {
            self.changes.pop_front();
        }
        self.changes.push_back(now);
        if self.changes.len() > LINK_FLAP_LIMIT {
            return Err(self.changes.len());
        }
        Ok(true)
    }
}

/// What the class needs of a domain beyond the engine's [`DomainHandle`]: its channel.
pub trait NetDomain: DomainHandle {
    /// The channel's guest-physical base and the header the VMM wrote there.
    fn net_channel(&self) -> Option<(u64, ChannelHeader)>;
    /// The domain's memory.
    fn net_memory(&self) -> &GuestMem;
    /// Wakes it (requests were published while it waits).
    fn net_kick(&self);
    /// The eventfd written when it notifies completions or stops.
    fn net_notify_fd(&self) -> Option<std::os::fd::RawFd>;
    /// Reads that eventfd (the service is awake).
    fn net_clear_notify(&self);
    /// Its vCPU's VM exits so far, where the platform counts them.
    fn net_exits(&self) -> Option<u64> {
        None
    }
}

impl NetDomain for crate::domain::Domain {
    fn net_channel(&self) -> Option<(u64, ChannelHeader)> {
        Some((self.channel()?, self.channel_header()?))
    }

    fn net_memory(&self) -> &GuestMem {
        self.memory()
    }

    fn net_kick(&self) {
        self.kick();
    }

    fn net_notify_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.notify_eventfd().as_raw_fd())
    }

    fn net_exits(&self) -> Option<u64> {
        self.vcpu_stat("exits")
    }

    fn net_clear_notify(&self) {
        let _ = self.notify_eventfd().read();
    }
}

/// What the class did, for tests and reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassCounters {
    /// Client frames a domain reported sent.
    pub tx_sent: u64,
    /// Client frames posted again to a later domain (they may reach the peer twice).
    pub tx_resent: u64,
    /// Client frames given back unsent after [`TX_ATTEMPTS`] errors, or after a give-up.
    pub tx_failed: u64,
    /// Frames received from the NIC.
    pub rx_frames: u64,
    /// Receive buffers lost with their domain.
    pub rx_lost: u64,
    /// Filter sets posted.
    pub configs: u64,
    /// Filter sets a domain refused.
    pub config_refused: u64,
    /// Changes of the domain's link word the VMM saw (never passed on to the clients).
    pub link_changes: u64,
    /// Domains failed for flapping their link word (over [`LINK_FLAP_LIMIT`] changes within
    /// [`LINK_FLAP_WINDOW`]).
    pub link_flapping: u64,
    /// The NIC's link as its domain last reported it.
    pub link_up: bool,
}

/// What a pass of [`NetBackend::collect`] hands the service.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// A client's frame is done with: give its chain back.
    TxDone {
        /// Port index.
        port: usize,
        /// Chain.
        token: TxToken,
    },
    /// A frame from the NIC, for the switch.
    Frame(Vec<u8>),
}

/// What the class keeps beside the engine.
struct NetState {
    name: String,
    channel: Option<NetChannel>,
    mem: Option<GuestMem>,
    /// The first domain's device info: later ones must report the same MAC and largest frame.
    info: Option<DeviceInfo>,
    config_owed: bool,
    /// Frames of queued and in-flight transmits, by shadow sequence number.
    frames: HashMap<u64, Vec<u8>>,
    rx_posted: usize,
    /// Transmits the last lost domain had in flight: the replay is over once they completed.
    replayed: std::collections::HashSet<u64>,
    link: LinkWatch,
    counters: ClassCounters,
}

/// The class as the engine sees it.
struct NetClass<'a> {
    s: &'a mut NetState,
    shadow: &'a mut ShadowQueue<NetOp, Carried>,
}

impl<D: NetDomain> DeviceClass<D> for NetClass<'_> {
    fn ready(&mut self, domain: &D) -> Result<(), FailureReason> {
        let Some((base, header)) = domain.net_channel() else {
            let message = "the domain has no channel".into();
            return Err(FailureReason::BootFailed { message });
        };
        if header.class != ddvm_abi::channel::class::NET {
            let message = format!(
                "a NIC domain's channel names class {} ({})",
                header.class,
                ddvm_abi::channel::class::name(header.class)
            );
            return Err(FailureReason::BootFailed { message });
        }
        let mem = domain.net_memory().clone();
        let mut channel = NetChannel::new(base, header);
        let info = channel
            .device_info(&mem)
            .map_err(|e| FailureReason::Protocol(violation(e)))?;
        match &self.s.info {
            None => self.s.info = Some(info),
            Some(first) if first.mac != info.mac || first.max_frame != info.max_frame => {
                let what = "the NIC's MAC or largest frame changed across a restart".into();
                return Err(FailureReason::Protocol(ProtocolViolation::BadDeviceInfo {
                    what,
                }));
            }
            Some(_) => {}
        }
        // The configuration goes first to every domain that comes up, then the transmits
        // the last one did not report, in order, then fresh receive buffers.
        self.s.config_owed = true;
        self.s.rx_posted = 0;
        self.s
            .link
            .reset(info.link == ddvm_abi::channel::net::link::UP);
        self.s.counters.link_up = self.s.link.up();
        self.s.channel = Some(channel);
        self.s.mem = Some(mem);
        Ok(())
    }

    #[cfg(feature = "fault-injection")]
    fn forget_tags(&mut self) {
        self.shadow.forget_tags();
    }

    fn lost(&mut self) {
        let (_, dropped) = self.shadow.domain_lost();
        // Requeued transmits (posted before) are the replay.
        self.s.replayed.extend(
            self.shadow
                .iter()
                .filter(|e| e.op == NetOp::Transmit && e.attempts > 0)
                .map(|e| e.seq),
        );
        // Receive buffers come back; a frame the domain had in them is lost.
        self.s.counters.rx_lost += dropped.len() as u64;
        // A configuration in flight is not replayed as it was: the next domain gets the
        // current set first.
        let configs: Vec<u64> = self
            .shadow
            .iter()
            .filter(|e| e.op == NetOp::Config)
            .map(|e| e.seq)
            .collect();
        for seq in configs {
            self.shadow.remove(seq);
        }
        self.s.config_owed = true;
        self.s.rx_posted = 0;
        self.s.channel = None;
        self.s.mem = None;
    }

    fn oldest_deadline_bound(&self) -> Option<(u32, Instant)> {
        self.shadow.oldest_deadline_bound()
    }

    fn owed(&self) -> (usize, usize) {
        (self.shadow.in_flight(), self.shadow.queued())
    }

    fn replay_fault(&self) -> Option<(u32, u32)> {
        None
    }

    fn gave_up(&mut self) {
        tracing::error!(
            "NIC {}: gave up; {} client frame(s) queued are given back unsent (nothing durable \
             is lost)",
            self.s.name,
            self.shadow
                .iter()
                .filter(|e| e.op == NetOp::Transmit)
                .count()
        );
    }
}

/// A NIC served by a driver domain, with reincarnation.
pub struct NetBackend<L: Launcher>
where
    L::Domain: NetDomain,
{
    engine: Engine<L>,
    s: NetState,
    shadow: ShadowQueue<NetOp, Carried>,
    done: Vec<NetDone>,
    frame: Vec<u8>,
}

impl<L: Launcher> NetBackend<L>
where
    L::Domain: NetDomain,
{
    /// Boots the first domain through `launcher` and waits until it is ready.
    pub fn start(name: &str, launcher: L, policy: Policy) -> Result<Self, StartError> {
        let engine = Engine::new(name, launcher, policy)?;
        let mut b = NetBackend {
            engine,
            s: NetState {
                name: name.to_string(),
                channel: None,
                mem: None,
                info: None,
                config_owed: true,
                frames: HashMap::new(),
                rx_posted: 0,
                replayed: Default::default(),
                link: LinkWatch::default(),
                counters: ClassCounters::default(),
            },
            shadow: ShadowQueue::new(),
            done: Vec::new(),
            frame: vec![0; 1 << 16],
        };
        b.engine
            .start(&mut NetClass {
                s: &mut b.s,
                shadow: &mut b.shadow,
            })
            .map_err(|reason| StartError::Failed {
                name: name.to_string(),
                reason,
            })?;
        Ok(b)
    }

    /// The handle for commands, events and status.
    pub fn handle(&self) -> RecoveryHandle {
        self.engine.handle()
    }

    /// The supervisor.
    pub fn supervisor(&self) -> &Supervisor {
        self.engine.supervisor()
    }

    /// The device info of the first domain (MAC, largest frame).
    pub fn info(&self) -> Option<DeviceInfo> {
        self.s.info
    }

    /// The class's counters.
    pub fn counters(&self) -> &ClassCounters {
        &self.s.counters
    }

    /// The epoch of the domain serving now (its channel open), if one is.
    pub fn serving_epoch(&self) -> Option<u64> {
        self.s.channel.as_ref()?;
        self.engine.live().map(|l| l.epoch)
    }

    /// The live domain, if one is up.
    pub fn live_domain(&self) -> Option<&L::Domain> {
        self.engine.live().map(|l| &l.domain)
    }

    /// Requests owed: (in flight, queued).
    pub fn owed(&self) -> (usize, usize) {
        (self.shadow.in_flight(), self.shadow.queued())
    }

    /// A client's record changed the filter set: a CONFIG is owed.
    pub fn config_changed(&mut self) {
        self.s.config_owed = true;
    }

    /// Takes a client's frame for the NIC: `Some(true)` queued (its chain comes back through
    /// [`Delivered::TxDone`]), `Some(false)` given back now (the policy gave up on the NIC: the
    /// frame is lost, as on a dead link), `None` no room (the client keeps it).
    pub fn queue_tx(&mut self, port: usize, token: TxToken, frame: &[u8]) -> Option<bool> {
        if self.engine.admission() == Admission::Fail {
            self.s.counters.tx_failed += 1;
            return Some(false);
        }
        if self.s.frames.len() >= TX_QUEUED_LIMIT + self.shadow.in_flight() {
            return None;
        }
        let seq = self
            .shadow
            .push(NetOp::Transmit, Carried::Tx { port, token }, Instant::now());
        self.s.frames.insert(seq, frame.to_vec());
        Some(true)
    }

    /// Client frames the class holds (queued or in flight at the domain) of `port`.
    pub fn held_by(&self, port: usize) -> usize {
        self.shadow
            .iter()
            .filter(|e| matches!(e.client, Carried::Tx { port: p, .. } if p == port))
            .count()
    }

    /// The engine's turn: detection, commands, restarts.
    pub fn tend(&mut self) {
        self.engine.tend(&mut NetClass {
            s: &mut self.s,
            shadow: &mut self.shadow,
        });
    }

    fn fail(&mut self, reason: FailureReason) {
        self.engine.fail(
            reason,
            &mut NetClass {
                s: &mut self.s,
                shadow: &mut self.shadow,
            },
        );
    }

    /// Gives back every transmit the class holds when the policy gave up.
    fn drain_given_up(&mut self, out: &mut Vec<Delivered>) {
        if self.engine.admission() != Admission::Fail {
            return;
        }
        for e in self.shadow.drain() {
            if let Carried::Tx { port, token } = e.client {
                self.s.counters.tx_failed += 1;
                out.push(Delivered::TxDone { port, token });
            }
        }
        self.s.frames.clear();
    }

    /// Posts, in this order, the filter set `filters` if one is owed, queued transmits, and
    /// receive buffers up to [`RX_POSTED`], while the channel has room. Returns requests
    /// posted.
    pub fn post(&mut self, filters: &FilterSet) -> usize {
        self.tend();
        if self.engine.has_deferred() {
            return 0;
        }
        let Some(live) = self.engine.live() else {
            return 0;
        };
        let epoch = live.epoch;
        let (Some(channel), Some(mem)) = (self.s.channel.as_mut(), self.s.mem.as_ref()) else {
            return 0;
        };
        let up = channel.link_up(mem);
        match self.s.link.observe(up, Instant::now()) {
            Ok(changed) => {
                self.s.counters.link_changes += u64::from(changed);
                self.s.counters.link_up = up;
            }
            Err(changes) => {
                self.s.counters.link_changes += 1;
                self.s.counters.link_flapping += 1;
                crate::limited!(
                    warn,
                    key: self.s.name,
                    "NIC {}: the domain's link word changed {changes} times within {:?}",
                    self.s.name,
                    LINK_FLAP_WINDOW
                );
                let what = format!(
                    "link word changed {changes} times within {} ms",
                    LINK_FLAP_WINDOW.as_millis()
                );
                self.fail(FailureReason::Protocol(ProtocolViolation::BadDeviceInfo {
                    what,
                }));
                return 0;
            }
        }
        let now = self.engine.service_time(Instant::now());
        let mut n = 0;
        let mut broken = false;
        let mut invariant = None;
        if self.s.config_owed {
            match channel.config(mem, filters) {
                Ok(tag) => {
                    let seq = self
                        .shadow
                        .push(NetOp::Config, Carried::Own, Instant::now());
                    self.shadow.posted(seq, tag, epoch, now);
                    self.s.config_owed = false;
                    self.s.counters.configs += 1;
                    n += 1;
                }
                Err(SubmitError::Full) => {}
                Err(SubmitError::RingInvariant) => {
                    invariant.get_or_insert(format!(
                        "posting the configuration: {}",
                        SubmitError::RingInvariant
                    ));
                    broken = true;
                }
                Err(_) => broken = true,
            }
        }
        // Transmits go only behind the configuration (ring order is the domain's order).
        let mut passed = None;
        while !broken && !self.s.config_owed && channel.free_slots() > RX_POSTED - self.s.rx_posted
        {
            let next = match passed {
                None => self.shadow.next_queued(),
                Some(seq) => self.shadow.next_queued_after(seq),
            };
            let Some(e) = next else { break };
            let (seq, attempts) = (e.seq, e.attempts);
            let Some(frame) = self.s.frames.get(&seq) else {
                // Not a transmit (nothing else is queued): never posted.
                passed = Some(seq);
                continue;
            };
            match channel.transmit(mem, frame) {
                Ok(tag) => {
                    self.shadow.posted(seq, tag, epoch, now);
                    if attempts > 0 {
                        self.s.counters.tx_resent += 1;
                    }
                    n += 1;
                }
                Err(SubmitError::Full) => break,
                // Larger than a slot (the switch caps frames below it), or a ring that took no
                // entry although one was free: the VMM's bookkeeping is broken. The frame stays
                // owed (the give-up hands it back).
                Err(e @ (SubmitError::TooLarge { .. } | SubmitError::RingInvariant)) => {
                    invariant
                        .get_or_insert(format!("posting a frame of {} bytes: {e}", frame.len()));
                    broken = true;
                }
                Err(SubmitError::Broken) => broken = true,
            }
        }
        while !broken && !self.s.config_owed && self.s.rx_posted < RX_POSTED {
            match channel.receive(mem) {
                Ok(tag) => {
                    let seq = self
                        .shadow
                        .push(NetOp::Receive, Carried::Own, Instant::now());
                    self.shadow.posted(seq, tag, epoch, now);
                    self.s.rx_posted += 1;
                    n += 1;
                }
                Err(SubmitError::Full) => break,
                Err(SubmitError::RingInvariant) => {
                    invariant.get_or_insert(format!(
                        "posting a receive buffer: {}",
                        SubmitError::RingInvariant
                    ));
                    broken = true;
                }
                Err(_) => broken = true,
            }
        }
        if n > 0 && channel.publish(mem) {
            live.domain.net_kick();
        }
        if let Some(what) = invariant {
            self.engine.invariant_broken(what);
        } else if broken {
            let reason = channel
                .broken()
                .map(|e| FailureReason::Protocol(violation(e)))
                .unwrap_or(FailureReason::BootFailed {
                    message: "channel refused service".into(),
                });
            self.fail(reason);
        }
        n
    }

    /// Takes the domain's completions: frames sent (their chains go back), frames received
    /// (for the switch), configurations. Returns completions taken.
    pub fn collect(&mut self, out: &mut Vec<Delivered>) -> usize {
        self.drain_given_up(out);
        if self.engine.has_deferred() {
            return 0;
        }
        let Some(live) = self.engine.live() else {
            return 0;
        };
        let epoch = live.epoch;
        let (Some(channel), Some(mem)) = (self.s.channel.as_mut(), self.s.mem.as_ref()) else {
            return 0;
        };
        self.done.clear();
        let polled = channel.poll(mem, &mut self.done);
        let now = (!self.done.is_empty()).then(Instant::now);
        let service_now = now.map(|t| self.engine.service_time(t));
        if !self.done.is_empty() {
            if let Some(reason) = self.engine.dma_refused() {
                self.fail(reason);
                return 0;
            }
        }
        let Some(channel) = self.s.channel.as_mut() else {
            return 0;
        };
        let mut served = 0;
        let mut taken = 0;
        for d in std::mem::take(&mut self.done) {
            taken += 1;
            let ok = d.status == cstatus::OK;
            let Ok(entry) = self.shadow.complete(d.request.tag, epoch) else {
                // The channel checked the tag against its own table, which the shadow queue
                // mirrors: a miss is a broken invariant of the VMM's (the device is given up).
                self.engine.invariant_broken(format!(
                    "completion for tag {} has no shadow entry",
                    d.request.tag
                ));
                channel.finish(&d);
                continue;
            };
            if let (ddvm_recovery::shadow::State::InFlight { posted, .. }, Some(t)) =
                (entry.state, service_now)
            {
                if entry.op != NetOp::Receive {
                    self.engine
                        .request_completed(t.saturating_duration_since(posted));
                }
            }
            match (entry.op, entry.client) {
                (NetOp::Transmit, Carried::Tx { port, token }) => {
                    if ok {
                        self.s.frames.remove(&entry.seq);
                        self.s.counters.tx_sent += 1;
                        out.push(Delivered::TxDone { port, token });
                        served += 1;
                    } else if entry.attempts >= TX_ATTEMPTS {
                        self.s.frames.remove(&entry.seq);
                        self.s.counters.tx_failed += 1;
                        out.push(Delivered::TxDone { port, token });
                    } else if let Some(frame) = self.s.frames.remove(&entry.seq) {
                        // Sent again, at the back of the queue, with its attempts so far.
                        let seq = self.shadow.push(entry.op, entry.client, entry.accepted);
                        self.shadow.set_attempts(seq, entry.attempts);
                        self.s.frames.insert(seq, frame);
                        if self.s.replayed.remove(&entry.seq) {
                            self.s.replayed.insert(seq);
                        }
                    }
                }
                (NetOp::Receive, _) => {
                    self.s.rx_posted = self.s.rx_posted.saturating_sub(1);
                    if ok && d.request.op == op::RECEIVE {
                        let n = channel.read_frame(mem, &d, &mut self.frame);
                        self.s.counters.rx_frames += 1;
                        out.push(Delivered::Frame(self.frame[..n].to_vec()));
                        served += 1;
                    }
                }
                (NetOp::Config, _) => {
                    if !ok {
                        self.s.counters.config_refused += 1;
                        crate::limited!(
                            warn,
                            key: self.s.name,
                            "NIC {}: the domain refused the filter set (status {})",
                            self.s.name,
                            d.status
                        );
                    }
                }
                (NetOp::Transmit, Carried::Own) => {}
            }
            channel.finish(&d);
        }
        if let Some(now) = now {
            // The replay is over once the configuration and every transmit the last domain
            // had not reported have completed.
            let shadow = &self.shadow;
            self.s.replayed.retain(|&seq| shadow.contains(seq));
            let replay_done = !self.s.config_owed
                && self.s.replayed.is_empty()
                && !shadow.iter().any(|e| e.op == NetOp::Config);
            self.engine.served(served, now, replay_done);
        }
        if let Err(e) = polled {
            self.fail(FailureReason::Protocol(violation(e)));
        }
        taken
    }

    /// Asks for (or stops asking for) a notification when completions arrive; true when
    /// some already did (or the engine has work), so the service must not sleep.
    pub fn arm(&mut self, on: bool) -> bool {
        if self.engine.has_deferred() {
            return true;
        }
        let Some(live) = self.engine.live() else {
            return false;
        };
        let (Some(channel), Some(mem)) = (self.s.channel.as_mut(), self.s.mem.as_ref()) else {
            return true;
        };
        channel.set_notify(mem, on);
        if !on {
            live.domain.net_clear_notify();
            return false;
        }
        live.domain.has_stopped().is_some() || channel.poll_pending(mem).unwrap_or(true)
    }

    /// Eventfds that wake the service: completions and the domain stopping, commands.
    pub fn wait_fds(&self) -> Vec<std::os::fd::RawFd> {
        let mut v = vec![self.engine.wake_fd()];
        if let Some(l) = self.engine.live() {
            v.extend(l.domain.net_notify_fd());
        }
        v
    }

    /// How long the service may sleep: until the next check while a domain runs, the
    /// restart time while it is down.
    pub fn sleep_limit(&self) -> Duration {
        let now = Instant::now();
        match (self.engine.live(), self.engine.restart_at()) {
            (None, Some(t)) => t.saturating_duration_since(now),
            (Some(_), _) => Duration::from_millis(5),
            (None, None) => Duration::from_millis(50),
        }
    }

    /// The orderly stop: a SHUTDOWN through the channel (the domain completes what it holds
    /// and stops the NIC), waited for at most `timeout`; then the vCPU is stopped. Returns
    /// whether the domain completed it.
    pub fn shut_down(&mut self, timeout: Duration) -> bool {
        let mut ok = false;
        if let (Some(live), Some(channel), Some(mem)) = (
            self.engine.live(),
            self.s.channel.as_mut(),
            self.s.mem.as_ref(),
        ) {
            if let Ok(tag) = channel.shutdown(mem) {
                if channel.publish(mem) {
                    live.domain.net_kick();
                }
                let t0 = Instant::now();
                let mut done = Vec::new();
                'wait: while t0.elapsed() < timeout {
                    done.clear();
                    if channel.poll(mem, &mut done).is_err() {
                        break;
                    }
                    for d in &done {
                        channel.finish(d);
                        if d.request.tag == tag {
                            ok = d.status == cstatus::OK;
                            break 'wait;
                        }
                    }
                    if live.domain.has_stopped().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        if let Some(live) = self.engine.live_mut() {
            live.domain.stop_vcpu();
        }
        self.engine.drop_standbys();
        ok
    }
}

/// Why the first boot failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The device could not be created.
    #[error(transparent)]
    Domain(#[from] crate::domain::DomainError),
    /// The domain failed to come up.
    #[error("domain {name}: {reason}")]
    Failed {
        /// Domain.
        name: String,
        /// Why.
        reason: FailureReason,
    },
    /// The engine could not be set up (an invalid policy, the host).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_changes_are_counted_and_too_many_within_the_window_are_flapping() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut w = LinkWatch::default();
        w.reset(true);
        assert_eq!(w.observe(true, t0), Ok(false));
        // A real cable read every 100 ms: ten changes a second, for ten seconds, never flaps.
        for k in 1..=100u64 {
            assert_eq!(w.observe(k % 2 == 0, ms(100 * k)), Ok(true), "change {k}");
        }
        assert!(w.up());
        // A change every 10 ms: the one over the limit within the window is flapping.
        let start = 100 * 100 + 1000;
        let mut verdict = Ok(true);
        let mut k = 0;
        while verdict.is_ok() {
            k += 1;
            verdict = w.observe(k % 2 == 0, ms(start + 10 * k));
        }
        assert_eq!(verdict, Err(LINK_FLAP_LIMIT + 1));
        assert_eq!(k as usize, LINK_FLAP_LIMIT + 1);
        // A new domain starts afresh.
        w.reset(false);
        assert_eq!(w.observe(false, ms(start + 10 * k + 1)), Ok(false));
        assert_eq!(w.observe(true, ms(start + 10 * k + 2)), Ok(true));
    }
}
