//! The network class ([`crate::net::class`]) under the engine, with fake NIC domains whose
//! side of the channel the test plays: the configuration goes first to every domain, transmits
//! in flight when a domain dies go to the next one after its configuration, receive buffers
//! are posted fresh and never count against the request deadline.

use ddvm_abi::channel::net::{link, op, DeviceInfo, FilterSet, Request};
use ddvm_abi::channel::ring::{Consumer, Producer};
use ddvm_abi::channel::{class, status, ChannelHeader, Completion, DEVICE_INFO_OFFSET};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::host_channel::ChannelMemory;
use crate::memory::GuestMem;
use crate::net::class::{Delivered, NetBackend, NetDomain, RX_POSTED};
use crate::net::device::TxToken;

const BASE: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 1];

/// A NIC domain's memory with its channel header and device info written.
pub(super) fn channel(epoch: u64, info: DeviceInfo) -> (GuestMem, ChannelHeader) {
    let mem = crate::memory::create(4 << 20, 1 << 30).unwrap();
    let header = crate::domain::channel_header("fake", class::NET, epoch, 1 << 20).unwrap();
    mem.write_obj(header, GuestAddress(BASE)).unwrap();
    mem.write_obj(info, GuestAddress(BASE + DEVICE_INFO_OFFSET))
        .unwrap();
    (mem, header)
}

fn info(mac: [u8; 6]) -> DeviceInfo {
    DeviceInfo {
        mac,
        max_frame: 1514,
        link: link::UP,
        rx_buffer: 2048,
        ..DeviceInfo::default()
    }
}

impl NetDomain for FakeDomain {
    fn net_channel(&self) -> Option<(u64, ChannelHeader)> {
        self.seen.net.as_ref().map(|(_, h)| (BASE, *h))
    }

    fn net_memory(&self) -> &GuestMem {
        &self.seen.net.as_ref().expect("a NIC domain").0
    }

    fn net_kick(&self) {}

    fn net_notify_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    fn net_clear_notify(&self) {}
}

/// The domain's side of one fake NIC's channel, played by the test.
struct Side {
    mem: GuestMem,
    epoch: u32,
    req: Consumer<Request>,
    cpl: Producer<Completion>,
}

impl Side {
    fn of(world: &World, epoch: u64) -> Side {
        let seen = lock(&world.domains).get(&epoch).cloned().expect("booted");
        let (mem, h) = seen.net.clone().expect("a NIC domain");
        Side {
            mem,
            epoch: epoch as u32,
            req: Consumer::new(u64::from(h.req_ring), h.req_entries),
            cpl: Producer::new(u64::from(h.cpl_ring), h.cpl_entries),
        }
    }

    /// Takes every request published so far.
    fn take(&mut self) -> Vec<Request> {
        let m = ChannelMemory::new(&self.mem, BASE);
        self.req.refresh(&m).unwrap();
        let mut v = Vec::new();
        while let Some(r) = self.req.pop(&m) {
            v.push(r);
        }
        self.req.release(&m);
        v
    }

    /// The frame of a transmit.
    fn frame(&self, r: &Request) -> Vec<u8> {
        let mut buf = vec![0u8; r.len as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(BASE + r.data))
            .unwrap();
        buf
    }

    /// Completes `r` with `st`; a receive gets `frame`.
    fn complete(&mut self, r: &Request, st: u16, frame: Option<&[u8]>) {
        let len = match frame {
            Some(f) => {
                self.mem
                    .write_slice(f, GuestAddress(BASE + r.data))
                    .unwrap();
                f.len() as u32
            }
            None if r.op == op::TRANSMIT && st == status::OK => r.len,
            None => 0,
        };
        let m = ChannelMemory::new(&self.mem, BASE);
        assert!(self.cpl.push(
            &m,
            &Completion {
                tag: r.tag,
                status: st,
                detail: 0,
                len,
                epoch: self.epoch,
            }
        ));
        self.cpl.publish(&m);
    }
}

fn frame(n: u8) -> Vec<u8> {
    let mut f = vec![n; 60];
    f[..6].copy_from_slice(&[0x02, 0xee, 0, 0, 0, 9]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f
}

fn net_backend(p: Policy) -> (NetBackend<FakeLauncher>, Arc<World>) {
    let world = Arc::new(World::default());
    *lock(&world.image) = "nic.elf".into();
    *lock(&world.net) = Some(info(MAC));
    let b = NetBackend::start("nic0", FakeLauncher(world.clone()), p).unwrap();
    (b, world)
}

/// Passes (post, collect) until the domain of `epoch` serves.
fn until_serving(b: &mut NetBackend<FakeLauncher>, epoch: u64) {
    let t0 = Instant::now();
    while b.serving_epoch() != Some(epoch) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "epoch {epoch} never served"
        );
        b.tend();
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn ops(reqs: &[Request]) -> Vec<u16> {
    reqs.iter().map(|r| r.op).collect()
}

#[test]
fn the_configuration_goes_first_and_transmits_a_dead_domain_held_go_to_the_next() {
    let (mut b, world) = net_backend(policy(|_| {}));
    let filters = FilterSet::default();
    for n in 0..3u8 {
        assert_eq!(
            b.queue_tx(0, TxToken::for_test(u16::from(n)), &frame(n)),
            Some(true)
        );
    }
    assert!(b.post(&filters) > 0);
    let mut side = Side::of(&world, 1);
    let reqs = side.take();
    // CONFIG, the three frames in order, then receive buffers.
    assert_eq!(
        ops(&reqs[..4]),
        [op::CONFIG, op::TRANSMIT, op::TRANSMIT, op::TRANSMIT]
    );
    assert_eq!(reqs.len(), 4 + RX_POSTED);
    assert!(reqs[4..].iter().all(|r| r.op == op::RECEIVE));
    assert_eq!(side.frame(&reqs[1]), frame(0));
    // The first frame is sent; one frame arrives; the domain dies with the rest.
    side.complete(&reqs[0], status::OK, None);
    side.complete(&reqs[1], status::OK, None);
    let arriving = frame(7);
    side.complete(&reqs[4], status::OK, Some(&arriving));
    let mut out = Vec::new();
    b.collect(&mut out);
    assert_eq!(
        out,
        [
            Delivered::TxDone {
                port: 0,
                token: TxToken::for_test(0)
            },
            Delivered::Frame(arriving)
        ]
    );
    world.crash(1);
    until_serving(&mut b, 2);
    assert_eq!(b.counters().rx_lost, RX_POSTED as u64 - 1);
    b.post(&filters);
    let mut side = Side::of(&world, 2);
    let reqs = side.take();
    assert_eq!(ops(&reqs[..3]), [op::CONFIG, op::TRANSMIT, op::TRANSMIT]);
    assert_eq!(side.frame(&reqs[1]), frame(1));
    assert_eq!(side.frame(&reqs[2]), frame(2));
    // Receive buffers are posted fresh, as many as before.
    assert_eq!(reqs.len(), 3 + RX_POSTED);
    for r in &reqs[..3] {
        side.complete(r, status::OK, None);
    }
    out.clear();
    b.collect(&mut out);
    let tokens: Vec<_> = out
        .iter()
        .map(|d| match d {
            Delivered::TxDone { token, .. } => *token,
            Delivered::Frame(_) => panic!("no frame arrived"),
        })
        .collect();
    assert_eq!(tokens, [TxToken::for_test(1), TxToken::for_test(2)]);
    assert_eq!(b.counters().tx_resent, 2);
    assert_eq!(b.counters().tx_sent, 3);
    assert_eq!(b.owed(), (RX_POSTED, 0));
}

#[test]
fn a_frame_is_given_back_only_once_a_transmit_of_it_completed_ok() {
    let (mut b, world) = net_backend(policy(|_| {}));
    let filters = FilterSet::default();
    b.queue_tx(3, TxToken::for_test(5), &frame(5));
    b.post(&filters);
    let mut side = Side::of(&world, 1);
    let reqs = side.take();
    side.complete(&reqs[0], status::OK, None);
    // An error: sent again (at most TX_ATTEMPTS times in all), not given back.
    side.complete(&reqs[1], status::IO_ERROR, None);
    let mut out = Vec::new();
    b.collect(&mut out);
    assert!(out.is_empty(), "{out:?}");
    b.post(&filters);
    let again = side.take();
    assert_eq!(ops(&again), [op::TRANSMIT]);
    assert_eq!(side.frame(&again[0]), frame(5));
    side.complete(&again[0], status::OK, None);
    b.collect(&mut out);
    assert_eq!(
        out,
        [Delivered::TxDone {
            port: 3,
            token: TxToken::for_test(5)
        }]
    );
}

#[test]
fn posted_receive_buffers_are_never_late_and_a_late_transmit_is() {
    let (mut b, world) = net_backend(policy(|c| c.request_deadline_ms = 20));
    let filters = FilterSet::default();
    b.post(&filters);
    let mut side = Side::of(&world, 1);
    let reqs = side.take();
    side.complete(&reqs[0], status::OK, None);
    b.collect(&mut Vec::new());
    // Receive buffers wait far past the deadline: no failure.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(150) {
        b.post(&filters);
        b.collect(&mut Vec::new());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(b.serving_epoch(), Some(1));
    // A transmit the domain never completes is a deadline failure.
    b.queue_tx(0, TxToken::for_test(1), &frame(1));
    b.post(&filters);
    let t0 = Instant::now();
    while b.serving_epoch() == Some(1) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the late transmit was not seen"
        );
        b.post(&filters);
        b.collect(&mut Vec::new());
        std::thread::sleep(Duration::from_millis(1));
    }
    let detections = b.handle().with(|o| o.detections.clone());
    assert!(
        detections.iter().any(|(name, _)| *name == "deadline"),
        "{detections:?}"
    );
}

#[test]
fn a_nic_whose_mac_changed_across_a_restart_fails_before_ready() {
    let (mut b, world) = net_backend(policy(|_| {}));
    *lock(&world.net) = Some(info([0x02, 0xdd, 0, 0, 0, 2]));
    world.crash(1);
    // Epoch 2 reports another MAC and fails; so does every later one until it is right.
    let t0 = Instant::now();
    while lock(&world.boots).len() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no retries");
        b.tend();
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(b.serving_epoch(), None);
    *lock(&world.net) = Some(info(MAC));
    let t0 = Instant::now();
    while b.serving_epoch().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(5), "never served again");
        b.tend();
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(b.info().map(|i| i.mac), Some(MAC));
}

#[test]
fn frames_queued_when_the_policy_gives_up_are_given_back() {
    let (mut b, world) = net_backend(policy(|c| {
        c.max_restarts = 1;
        c.window_ms = 60_000;
    }));
    world.crash(1);
    until_serving(&mut b, 2);
    b.queue_tx(1, TxToken::for_test(9), &frame(9));
    world.crash(2);
    let mut out = Vec::new();
    let t0 = Instant::now();
    while out.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5), "never given back");
        b.tend();
        b.collect(&mut out);
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(
        out,
        [Delivered::TxDone {
            port: 1,
            token: TxToken::for_test(9)
        }]
    );
    assert_eq!(
        b.queue_tx(1, TxToken::for_test(10), &frame(10)),
        Some(false)
    );
}

#[test]
fn link_changes_are_counted_and_a_flapping_domain_is_failed() {
    use ddvm_abi::channel::net::offset;
    let (mut b, world) = net_backend(policy(|_| {}));
    until_serving(&mut b, 1);
    let filters = FilterSet::default();
    let set_link = |epoch: u64, word: u32| {
        let seen = lock(&world.domains).get(&epoch).cloned().expect("booted");
        let (mem, _) = seen.net.clone().expect("a NIC domain");
        mem.write_obj(word, GuestAddress(BASE + offset::LINK))
            .unwrap();
    };
    b.post(&filters);
    assert!(b.counters().link_up);
    // A cable pulled and put back: two changes, counted, the domain serves on.
    set_link(1, link::DOWN);
    b.post(&filters);
    assert!(!b.counters().link_up);
    set_link(1, link::UP);
    b.post(&filters);
    assert_eq!(b.counters().link_changes, 2);
    assert_eq!(b.counters().link_flapping, 0);
    assert_eq!(b.serving_epoch(), Some(1));
    // Flapping: the change over the limit within the window (the two above included) fails
    // the domain.
    let mut up = true;
    for _ in 2..crate::net::class::LINK_FLAP_LIMIT {
        up = !up;
        set_link(1, if up { link::UP } else { link::DOWN });
        b.post(&filters);
    }
    assert_eq!(b.serving_epoch(), Some(1), "not over the limit yet");
    set_link(1, if up { link::DOWN } else { link::UP });
    b.post(&filters);
    assert_eq!(b.counters().link_flapping, 1);
    assert_ne!(b.serving_epoch(), Some(1));
    // The next domain serves, its link as its device info says.
    until_serving(&mut b, 2);
    b.post(&filters);
    assert!(b.counters().link_up);
    assert_eq!(b.counters().link_flapping, 1);
}
