//! The virtio-net device against a scripted driver: split rings written by hand into a
//! client's memory (as `blk/tests.rs` does), a recording TX backend, frames offered to the
//! RX side. Minimal drivers (MAC and STATUS only, as virtio-drivers' `VirtIONet`) and full
//! ones; hostile chains of every kind; control commands and garbage; resets in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio as r;
use virtio_bindings::virtio_net as n;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    ack, feature, link, NetConfig, NetPort, Rx, TxBackend, TxToken, TxVerdict, VirtioNet,
    CTRL_QUEUE_SIZE, FEATURES, QUEUE_SIZE,
};
use super::request::{HDR_LEN, MAX_DESCRIPTORS};
use super::switch::{ClientConfig, MacTable, RxMode};
use crate::devices::BusDevice;
use crate::memory::{self, GuestMem};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{features, Interrupt, VirtioDevice};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x20000;
const USED: u64 = 0x30000;
const BUF: u64 = 0x100000;
const TABLE: u64 = 0x200000;

const MAC: [u8; 6] = [2, 0xdd, 0, 0, 0, 1];
const PEER: [u8; 6] = [2, 0xdd, 0, 0, 0, 2];
const MINIMAL: u64 = features::VERSION_1 | feature::MAC | feature::STATUS;

fn rings(q: usize) -> u64 {
    q as u64 * 0x1000
}

fn size_of(q: usize) -> u16 {
    if q == 2 {
        CTRL_QUEUE_SIZE
    } else {
        QUEUE_SIZE
    }
}

fn ready_queue(q: usize, event_idx: bool) -> Queue {
    let mut queue = Queue::new(size_of(q)).unwrap();
    queue.set_size(size_of(q));
    queue
        .try_set_desc_table_address(GuestAddress(DESC + rings(q)))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL + rings(q)))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(USED + rings(q)))
        .unwrap();
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

struct Driver {
    mem: GuestMem,
    port: Arc<NetPort>,
    device: VirtioNet,
    avail: [u16; 3],
    used_seen: [u16; 3],
    wakes: Arc<AtomicU64>,
}

impl Driver {
    fn port(mem: &GuestMem, wakes: &Arc<AtomicU64>) -> Arc<NetPort> {
        let w = wakes.clone();
        let interrupt = Interrupt::new(Arc::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        }));
        let config = NetConfig {
            mac: MAC,
            mtu: 1500,
        };
        NetPort::new("net-test", mem.clone(), config, interrupt).unwrap()
    }

    /// A device activated with `acked` features, queues set up directly.
    fn new(acked: u64) -> Driver {
        let mem = memory::create(4 << 20, 1 << 30).unwrap();
        let wakes = Arc::new(AtomicU64::new(0));
        let port = Self::port(&mem, &wakes);
        let mut device = VirtioNet::new(port.clone());
        let event_idx = acked & features::EVENT_IDX != 0;
        let count = if acked & feature::CTRL_VQ != 0 { 3 } else { 2 };
        device
            .activate(
                acked,
                (0..count)
                    .map(|q| Some(ready_queue(q, event_idx)))
                    .collect(),
            )
            .unwrap();
        Driver {
            mem,
            port,
            device,
            avail: [0; 3],
            used_seen: [0; 3],
            wakes,
        }
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + rings(q) + u64::from(i) * 16;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// A chain of `bufs` (address, length, writable) from descriptor `base` on.
    fn chain(&self, q: usize, base: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = base + k as u16;
            let mut flags = if write { F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.desc(q, i, addr, len, flags, i + 1);
        }
        base
    }

    /// `bufs` as an indirect table at `table`, referenced by descriptor `head`.
    fn indirect(&self, q: usize, head: u16, table: u64, bufs: &[(u64, u32, bool)]) -> u16 {
        let mut t = Vec::new();
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let mut flags = if write { F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            t.extend_from_slice(&addr.to_le_bytes());
            t.extend_from_slice(&len.to_le_bytes());
            t.extend_from_slice(&flags.to_le_bytes());
            t.extend_from_slice(&((k + 1) as u16).to_le_bytes());
        }
        self.mem.write_slice(&t, GuestAddress(table)).unwrap();
        self.desc(q, head, table, t.len() as u32, F_INDIRECT, 0);
        head
    }

    fn publish(&mut self, q: usize, heads: &[u16]) {
        let size = size_of(q);
        for &head in heads {
            let slot = AVAIL + rings(q) + 4 + u64::from(self.avail[q] % size) * 2;
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail[q] = self.avail[q].wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail[q], GuestAddress(AVAIL + rings(q) + 2))
            .unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED + rings(q) + 2))
            .unwrap()
    }

    /// The next used entry of queue `q`: (head, length).
    fn used(&mut self, q: usize) -> Option<(u32, u32)> {
        if self.used_idx(q) == self.used_seen[q] {
            return None;
        }
        let e = USED + rings(q) + 4 + u64::from(self.used_seen[q] % size_of(q)) * 8;
        self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        Some((
            self.mem.read_obj(GuestAddress(e)).unwrap(),
            self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
        ))
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
    }

    /// Sends a control command (class, command, data) from descriptor 0 of the control
    /// queue: (ack byte, used length).
    fn command(&mut self, class: u32, cmd: u32, data: &[u8]) -> (u8, u32) {
        let at = BUF + 0x30000;
        self.write(at, &[class as u8, cmd as u8]);
        self.write(at + 2, data);
        self.write(at + 0x1000, &[0xee]);
        let mut bufs = vec![(at, 2, false)];
        if !data.is_empty() {
            bufs.push((at + 2, data.len() as u32, false));
        }
        bufs.push((at + 0x1000, 1, true));
        let head = self.chain(2, 0, &bufs);
        self.publish(2, &[head]);
        assert_eq!(self.port.control(16), 1);
        let (id, len) = self.used(2).expect("command answered");
        assert_eq!(id, u32::from(head));
        (self.read(at + 0x1000, 1)[0], len)
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

/// Records every frame; answers with `verdict`.
struct Recorder {
    frames: Vec<(TxToken, Vec<u8>)>,
    verdict: TxVerdict,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            frames: Vec::new(),
            verdict: TxVerdict::Queued,
        }
    }
}

impl TxBackend for Recorder {
    fn transmit(&mut self, token: TxToken, f: &[u8]) -> TxVerdict {
        if self.verdict != TxVerdict::Busy {
            self.frames.push((token, f.to_vec()));
        }
        self.verdict
    }
}

fn reg_write(t: &mut MmioTransport<VirtioNet>, reg: u32, v: u32) {
    t.write(u64::from(reg), &v.to_le_bytes());
}

fn reg_read(t: &mut MmioTransport<VirtioNet>, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

/// Negotiates `wanted` through the transport's registers and sets up `queues`; the status
/// the driver reads back after FEATURES_OK.
fn negotiate(t: &mut MmioTransport<VirtioNet>, wanted: u64, queues: usize) -> u32 {
    use crate::virtio::status as s;
    reg_write(t, r::VIRTIO_MMIO_STATUS, 0);
    reg_write(t, r::VIRTIO_MMIO_STATUS, s::ACKNOWLEDGE);
    reg_write(t, r::VIRTIO_MMIO_STATUS, s::ACKNOWLEDGE | s::DRIVER);
    for sel in 0..2 {
        reg_write(t, r::VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        reg_write(
            t,
            r::VIRTIO_MMIO_DRIVER_FEATURES,
            (wanted >> (32 * sel)) as u32,
        );
    }
    let st = s::ACKNOWLEDGE | s::DRIVER | s::FEATURES_OK;
    reg_write(t, r::VIRTIO_MMIO_STATUS, st);
    let got = reg_read(t, r::VIRTIO_MMIO_STATUS);
    if got & s::FEATURES_OK == 0 {
        return got;
    }
    for q in 0..queues {
        reg_write(t, r::VIRTIO_MMIO_QUEUE_SEL, q as u32);
        assert_eq!(
            reg_read(t, r::VIRTIO_MMIO_QUEUE_NUM_MAX),
            u32::from(size_of(q))
        );
        reg_write(t, r::VIRTIO_MMIO_QUEUE_NUM, u32::from(size_of(q)));
        reg_write(t, r::VIRTIO_MMIO_QUEUE_DESC_LOW, (DESC + rings(q)) as u32);
        reg_write(t, r::VIRTIO_MMIO_QUEUE_AVAIL_LOW, (AVAIL + rings(q)) as u32);
        reg_write(t, r::VIRTIO_MMIO_QUEUE_USED_LOW, (USED + rings(q)) as u32);
        reg_write(t, r::VIRTIO_MMIO_QUEUE_READY, 1);
    }
    reg_write(t, r::VIRTIO_MMIO_STATUS, st | s::DRIVER_OK);
    got
}

#[test]
fn the_device_offers_what_it_serves_and_negotiates_minimal_and_full_drivers() {
    let mem = memory::create(4 << 20, 1 << 30).unwrap();
    let wakes = Arc::new(AtomicU64::new(0));
    let port = Driver::port(&mem, &wakes);
    let device = VirtioNet::new(port.clone());
    assert_eq!(device.device_id(), 1);
    for f in [
        features::VERSION_1,
        features::EVENT_IDX,
        features::INDIRECT_DESC,
        feature::MAC,
        feature::STATUS,
        feature::MRG_RXBUF,
        feature::MTU,
        feature::CTRL_VQ,
        feature::CTRL_RX,
        feature::CTRL_MAC_ADDR,
        feature::GUEST_ANNOUNCE,
        feature::CTRL_VLAN,
    ] {
        assert_ne!(device.features() & f, 0, "{f:#x}");
    }
    // No offloads, no multiqueue.
    for bit in [
        n::VIRTIO_NET_F_CSUM,
        n::VIRTIO_NET_F_GUEST_CSUM,
        n::VIRTIO_NET_F_MQ,
    ] {
        assert_eq!(device.features() & 1 << bit, 0);
    }
    assert_eq!(
        device.queue_max_sizes(),
        [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE]
    );
    let mut t = MmioTransport::new(
        device,
        mem.clone(),
        Interrupt::new(Arc::new(|| {})),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    // Configuration space: MAC, status (link up), one queue pair, MTU.
    let mut cfg = [0u8; 12];
    t.read(u64::from(r::VIRTIO_MMIO_CONFIG), &mut cfg);
    assert_eq!(&cfg[0..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), link::UP);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
    // A driver that writes the MAC gets no change (read-only under VERSION_1).
    t.write(u64::from(r::VIRTIO_MMIO_CONFIG), &[0xff; 6]);
    t.read(u64::from(r::VIRTIO_MMIO_CONFIG), &mut cfg[..6]);
    assert_eq!(&cfg[0..6], &MAC);
    // A feature not offered is refused.
    let st = negotiate(&mut t, MINIMAL | 1 << n::VIRTIO_NET_F_CSUM, 2);
    assert_eq!(st & crate::virtio::status::FEATURES_OK, 0);
    // virtio-drivers' VirtIONet: MAC and STATUS, RX and TX only.
    let st = negotiate(&mut t, MINIMAL, 2);
    assert_ne!(st & crate::virtio::status::FEATURES_OK, 0);
    assert_eq!(port.acked_features(), MINIMAL);
    assert!(!t.device().needs_reset());
    // Linux: everything.
    negotiate(&mut t, FEATURES, 3);
    assert_eq!(port.acked_features(), FEATURES);
    // A reset forgets the features.
    reg_write(&mut t, r::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(port.acked_features(), 0);
}

#[test]
fn a_minimal_driver_sends_and_receives_with_a_12_byte_header() {
    let mut d = Driver::new(MINIMAL);
    // TX: header and frame in one buffer, as virtio-drivers sends them.
    let f = frame(PEER, MAC, 60);
    let mut buf = vec![0u8; HDR_LEN];
    buf.extend_from_slice(&f);
    d.write(BUF, &buf);
    let head = d.chain(1, 0, &[(BUF, buf.len() as u32, false)]);
    d.publish(1, &[head]);
    let mut b = Recorder::new();
    assert_eq!(d.port.transmit(&mut b, 16), 1);
    assert_eq!(b.frames.len(), 1);
    assert_eq!(b.frames[0].1, f);
    // Not given back before the backend says it was sent.
    assert_eq!(d.used(1), None);
    assert_eq!(d.port.tx_in_flight(), 1);
    assert!(d.port.complete_tx(b.frames[0].0));
    assert_eq!(d.used(1), Some((0, 0)));
    // Twice: ignored and counted.
    assert!(!d.port.complete_tx(b.frames[0].0));
    assert_eq!(d.port.counters.tx_stale.load(Ordering::Relaxed), 1);
    assert_eq!(d.used(1), None);
    // RX: a 1526-byte buffer; the header says one buffer.
    let rx = BUF + 0x10000;
    let head = d.chain(0, 0, &[(rx, 1526, true)]);
    d.publish(0, &[head]);
    let f = frame(MAC, PEER, 1514);
    assert_eq!(d.port.receive(&f), Rx::Delivered(1));
    assert_eq!(d.used(0), Some((0, 1526)));
    let got = d.read(rx, 1526);
    assert_eq!(&got[..10], &[0; 10]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &f[..]);
    // No buffer left: dropped and counted, nothing written.
    assert_eq!(d.port.receive(&f), Rx::NoBuffers);
    assert_eq!(d.port.counters.rx_no_buffers.load(Ordering::Relaxed), 1);
    assert_eq!(d.used(0), None);
    // No control queue: no control.
    assert_eq!(d.port.control(16), 0);
}

#[test]
fn tx_chains_are_parsed_split_and_indirect_and_bad_ones_get_a_defined_answer() {
    let mut d = Driver::new(FEATURES);
    let mut b = Recorder::new();
    let f = frame(PEER, MAC, 100);
    // Header split 5 + 7, frame split 30 + 70.
    d.write(BUF, &[0; 5]);
    d.write(BUF + 0x100, &[0; 7]);
    d.write(BUF + 0x200, &f[..30]);
    d.write(BUF + 0x300, &f[30..]);
    let split = [
        (BUF, 5, false),
        (BUF + 0x100, 7, false),
        (BUF + 0x200, 30, false),
        (BUF + 0x300, 70, false),
    ];
    let h = d.chain(1, 0, &split);
    d.publish(1, &[h]);
    // The same through an indirect table.
    let h = d.indirect(1, 10, TABLE, &split);
    d.publish(1, &[h]);
    assert_eq!(d.port.transmit(&mut b, 16), 2);
    assert_eq!(b.frames.len(), 2);
    assert!(b.frames.iter().all(|(_, got)| *got == f));
    for (t, _) in &b.frames {
        assert!(d.port.complete_tx(*t));
    }
    assert_eq!(d.used(1), Some((0, 0)));
    assert_eq!(d.used(1), Some((10, 0)));

    // Each bad chain: given back at once (length 0), counted, never handed to the backend.
    d.write(BUF + 0x1000, &[1, 0]); // NEEDS_CSUM: no offload was offered
    let bad: Vec<Vec<(u64, u32, bool)>> = vec![
        vec![(BUF, 12, false), (BUF + 0x200, 0, false)], // zero length
        vec![(BUF, 12, false), (BUF + 0x200, 1519, false)], // frame > MTU + 18
        vec![(BUF, 12, false), (BUF + 0x200, 60, true)], // device-writable
        vec![(BUF, 8, false)],                           // shorter than the header
        vec![(BUF, 12, false), (0x7fff_0000, 60, false)], // outside memory
        vec![(BUF + 0x1000, 12, false), (BUF + 0x200, 60, false)], // offload asked
        vec![(BUF, 1, false); MAX_DESCRIPTORS + 1],      // too many descriptors
    ];
    let mut heads = Vec::new();
    let mut base = 0;
    for chain in &bad {
        heads.push(d.chain(1, base, chain));
        base += chain.len() as u16;
    }
    d.publish(1, &heads);
    assert_eq!(d.port.transmit(&mut b, 64), bad.len());
    assert_eq!(b.frames.len(), 2, "nothing more reached the backend");
    for &h in &heads {
        assert_eq!(d.used(1), Some((u32::from(h), 0)));
    }
    assert_eq!(
        d.port.counters.tx_dropped.load(Ordering::Relaxed),
        bad.len() as u64
    );
    // The largest frame passes.
    let h = d.chain(1, 0, &[(BUF, 12, false), (BUF + 0x200, 1518, false)]);
    d.publish(1, &[h]);
    assert_eq!(d.port.transmit(&mut b, 16), 1);
    assert_eq!(b.frames.len(), 3);
    assert!(!d.port.needs_reset());
}

#[test]
fn a_65535_entry_indirect_table_is_walked_no_further_than_the_cap() {
    let mut d = Driver::new(FEATURES);
    let entries = vec![(BUF, 1u32, false); 65_535];
    let h = d.indirect(1, 0, TABLE, &entries);
    d.publish(1, &[h]);
    let mut b = Recorder::new();
    let t = std::time::Instant::now();
    assert_eq!(d.port.transmit(&mut b, 16), 1);
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(d.used(1), Some((0, 0)));
    assert!(b.frames.is_empty());
}

#[test]
fn an_unwalkable_chain_or_a_republished_head_needs_reset() {
    let mut d = Driver::new(FEATURES);
    let mut b = Recorder::new();
    // NEXT pointing past the queue.
    d.desc(1, 0, BUF, 12, F_NEXT, QUEUE_SIZE + 5);
    d.publish(1, &[0]);
    d.port.transmit(&mut b, 16);
    assert!(d.port.needs_reset());
    assert!(d.device.needs_reset());
    assert_eq!(d.used(1), None);
    // Frames for a device needing a reset are dropped; the driver resets and goes on.
    assert_eq!(d.port.receive(&frame(MAC, PEER, 60)), Rx::NotReady);
    let mut d = Driver::new(FEATURES);
    d.write(BUF, &[0; 12]);
    let h = d.chain(1, 0, &[(BUF, 12, false), (BUF + 0x200, 60, false)]);
    d.publish(1, &[h]);
    assert_eq!(d.port.transmit(&mut b, 16), 1);
    // The same head again while the backend has it.
    d.publish(1, &[h]);
    d.port.transmit(&mut b, 16);
    assert!(d.port.needs_reset());
    assert_eq!(d.port.counters.needs_reset.load(Ordering::Relaxed), 1);
}

#[test]
fn a_busy_backend_leaves_the_chain_in_the_ring_and_done_gives_it_back_at_once() {
    let mut d = Driver::new(FEATURES);
    d.write(BUF, &[0; 12]);
    d.write(BUF + 0x200, &frame(PEER, MAC, 60));
    let h = d.chain(1, 0, &[(BUF, 12, false), (BUF + 0x200, 60, false)]);
    d.publish(1, &[h]);
    let mut b = Recorder::new();
    b.verdict = TxVerdict::Busy;
    assert_eq!(d.port.transmit(&mut b, 16), 0);
    assert_eq!(d.used(1), None);
    b.verdict = TxVerdict::Done;
    assert_eq!(d.port.transmit(&mut b, 16), 1);
    assert_eq!(b.frames.len(), 1);
    assert_eq!(d.used(1), Some((0, 0)));
    assert_eq!(d.port.tx_in_flight(), 0);
}

#[test]
fn rx_merges_buffers_only_with_mrg_rxbuf_and_publishes_them_at_once() {
    let mut d = Driver::new(FEATURES);
    let f = frame(MAC, PEER, 1514);
    // Three 600-byte buffers; the second split over two descriptors.
    let bufs = [BUF, BUF + 0x1000, BUF + 0x2000];
    d.chain(0, 0, &[(bufs[0], 600, true)]);
    d.chain(0, 1, &[(bufs[1], 100, true), (bufs[1] + 0x800, 500, true)]);
    d.chain(0, 3, &[(bufs[2], 600, true)]);
    d.publish(0, &[0, 1, 3]);
    assert_eq!(d.port.receive(&f), Rx::Delivered(3));
    assert_eq!(d.used_idx(0), 3);
    assert_eq!(d.used(0), Some((0, 600)));
    assert_eq!(d.used(0), Some((1, 600)));
    assert_eq!(d.used(0), Some((3, 1526 - 1200)));
    let mut got = d.read(bufs[0], 600);
    got.extend(d.read(bufs[1], 100));
    got.extend(d.read(bufs[1] + 0x800, 500));
    got.extend(d.read(bufs[2], 326));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &f[..]);
    // Not enough buffers: dropped, and the buffers stay for the next frame.
    d.chain(0, 4, &[(bufs[0], 600, true)]);
    d.chain(0, 5, &[(bufs[1], 600, true)]);
    d.publish(0, &[4, 5]);
    assert_eq!(d.port.receive(&f), Rx::NoBuffers);
    assert_eq!(d.used(0), None);
    let small = frame(MAC, PEER, 700);
    assert_eq!(d.port.receive(&small), Rx::Delivered(2));
    assert_eq!(d.used(0), Some((4, 600)));
    assert_eq!(d.used(0), Some((5, 112)));
}

#[test]
fn without_mrg_rxbuf_a_small_buffer_is_given_back_and_bad_rx_chains_are_refused() {
    let mut d = Driver::new(MINIMAL | features::EVENT_IDX);
    d.chain(0, 0, &[(BUF, 600, true)]);
    d.chain(0, 1, &[(BUF + 0x1000, 600, true)]);
    d.publish(0, &[0, 1]);
    let f = frame(MAC, PEER, 1000);
    // One buffer per frame: the first is too small and goes back empty.
    assert_eq!(d.port.receive(&f), Rx::TooSmall);
    assert_eq!(d.used(0), Some((0, 0)));
    assert_eq!(d.port.counters.rx_too_small.load(Ordering::Relaxed), 1);
    // A frame that fits takes the next.
    let f = frame(MAC, PEER, 500);
    assert_eq!(d.port.receive(&f), Rx::Delivered(1));
    assert_eq!(d.used(0), Some((1, 512)));
    // Device-readable, zero-length or outside memory: given back empty, frame dropped.
    d.chain(0, 2, &[(BUF, 1526, false)]);
    d.chain(0, 3, &[(BUF, 0, true)]);
    d.chain(0, 4, &[(0x7fff_0000, 1526, true)]);
    d.publish(0, &[2, 3, 4]);
    for h in [2, 3, 4] {
        assert_eq!(d.port.receive(&f), Rx::BadChain);
        assert_eq!(d.used(0), Some((h, 0)));
    }
    assert!(!d.port.needs_reset());
}

#[test]
fn event_idx_suppresses_interrupts_until_the_driver_asks() {
    let mut d = Driver::new(FEATURES);
    // used_event of the RX queue (after the ring of 256 entries): 1, so the first used entry
    // is not signalled and the second is.
    let used_event = AVAIL + rings(0) + 4 + 2 * u64::from(QUEUE_SIZE);
    d.mem.write_obj(1u16, GuestAddress(used_event)).unwrap();
    d.chain(0, 0, &[(BUF, 2048, true)]);
    d.chain(0, 1, &[(BUF + 0x1000, 2048, true)]);
    d.publish(0, &[0, 1]);
    let before = d.wakes.load(Ordering::Relaxed);
    assert_eq!(d.port.receive(&frame(MAC, PEER, 60)), Rx::Delivered(1));
    assert_eq!(d.wakes.load(Ordering::Relaxed), before);
    assert_eq!(d.port.receive(&frame(MAC, PEER, 60)), Rx::Delivered(1));
    assert_eq!(d.wakes.load(Ordering::Relaxed), before + 1);
    // Without EVENT_IDX, every batch is signalled.
    let mut d = Driver::new(MINIMAL);
    d.chain(0, 0, &[(BUF, 2048, true)]);
    d.publish(0, &[0]);
    assert_eq!(d.port.receive(&frame(MAC, PEER, 60)), Rx::Delivered(1));
    assert_eq!(d.wakes.load(Ordering::Relaxed), 1);
    // TX notifications: armed, the driver's work is seen.
    assert!(!d.port.arm());
    d.write(BUF, &[0; 12]);
    let h = d.chain(1, 0, &[(BUF, 12, false), (BUF + 0x200, 60, false)]);
    d.publish(1, &[h]);
    assert!(d.port.arm());
    d.port.disarm();
}

#[test]
fn control_commands_update_the_record_and_garbage_gets_err() {
    let mut d = Driver::new(FEATURES);
    assert_eq!(d.port.take_config_change(), None);
    let rx = n::VIRTIO_NET_CTRL_RX;
    assert_eq!(
        d.command(rx, n::VIRTIO_NET_CTRL_RX_PROMISC, &[1]),
        (ack::OK, 1)
    );
    assert!(d.port.config_record().rx.promisc);
    let changed = d.port.take_config_change().expect("record changed");
    assert!(changed.rx.promisc);
    assert_eq!(d.port.take_config_change(), None);
    // The same again: OK, no change.
    assert_eq!(
        d.command(rx, n::VIRTIO_NET_CTRL_RX_PROMISC, &[1]).0,
        ack::OK
    );
    assert_eq!(d.port.take_config_change(), None);
    for (cmd, get) in [
        (
            n::VIRTIO_NET_CTRL_RX_ALLMULTI,
            (|m: &RxMode| m.allmulti) as fn(&RxMode) -> bool,
        ),
        (n::VIRTIO_NET_CTRL_RX_ALLUNI, |m| m.alluni),
        (n::VIRTIO_NET_CTRL_RX_NOMULTI, |m| m.nomulti),
        (n::VIRTIO_NET_CTRL_RX_NOUNI, |m| m.nouni),
        (n::VIRTIO_NET_CTRL_RX_NOBCAST, |m| m.nobcast),
    ] {
        let want = !get(&d.port.config_record().rx);
        assert_eq!(d.command(rx, cmd, &[u8::from(want)]).0, ack::OK);
        assert_eq!(get(&d.port.config_record().rx), want, "command {cmd}");
    }
    // MAC tables: one unicast, two multicast.
    let m1 = [1, 0, 0x5e, 0, 0, 1];
    let m2 = [0x33, 0x33, 0, 0, 0, 1];
    let mut tables = 1u32.to_le_bytes().to_vec();
    tables.extend_from_slice(&PEER);
    tables.extend_from_slice(&2u32.to_le_bytes());
    tables.extend_from_slice(&m1);
    tables.extend_from_slice(&m2);
    let mac = n::VIRTIO_NET_CTRL_MAC;
    assert_eq!(
        d.command(mac, n::VIRTIO_NET_CTRL_MAC_TABLE_SET, &tables).0,
        ack::OK
    );
    let rec = d.port.config_record();
    assert_eq!(rec.unicast, MacTable::new(vec![PEER]));
    assert_eq!(rec.multicast, MacTable::new(vec![m1, m2]));
    // 65 multicast addresses: the table overflows (every multicast address).
    let mut big = 0u32.to_le_bytes().to_vec();
    big.extend_from_slice(&65u32.to_le_bytes());
    for i in 0..65u8 {
        big.extend_from_slice(&[1, 0, 0x5e, 0, 1, i]);
    }
    assert_eq!(
        d.command(mac, n::VIRTIO_NET_CTRL_MAC_TABLE_SET, &big).0,
        ack::OK
    );
    assert!(d.port.config_record().multicast.overflow);
    // The MAC is the VMM's: its own is acknowledged, another refused.
    assert_eq!(
        d.command(mac, n::VIRTIO_NET_CTRL_MAC_ADDR_SET, &MAC).0,
        ack::OK
    );
    assert_eq!(
        d.command(mac, n::VIRTIO_NET_CTRL_MAC_ADDR_SET, &PEER).0,
        ack::ERR
    );
    // VLAN filters: acknowledged and ignored.
    let vlan = n::VIRTIO_NET_CTRL_VLAN;
    assert_eq!(
        d.command(vlan, n::VIRTIO_NET_CTRL_VLAN_ADD, &100u16.to_le_bytes())
            .0,
        ack::OK
    );
    assert_eq!(
        d.command(vlan, n::VIRTIO_NET_CTRL_VLAN_DEL, &100u16.to_le_bytes())
            .0,
        ack::OK
    );
    // Announce: the device asks, the driver acknowledges.
    assert!(d.port.announce());
    assert_eq!(d.port.status(), link::UP | link::ANNOUNCE);
    let announce = n::VIRTIO_NET_CTRL_ANNOUNCE;
    assert_eq!(
        d.command(announce, n::VIRTIO_NET_CTRL_ANNOUNCE_ACK, &[]).0,
        ack::OK
    );
    assert_eq!(d.port.status(), link::UP);
    let before = d.port.config_record();
    d.port.take_config_change();
    // Garbage: ERR, and the record is untouched.
    let mut truncated = tables.clone();
    truncated.pop();
    let mut trailing = tables.clone();
    trailing.push(0);
    let mut swapped = 1u32.to_le_bytes().to_vec(); // a multicast address as unicast
    swapped.extend_from_slice(&m1);
    swapped.extend_from_slice(&0u32.to_le_bytes());
    let huge = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
    for (class, cmd, data) in [
        (rx, n::VIRTIO_NET_CTRL_RX_PROMISC, &[][..]),
        (rx, n::VIRTIO_NET_CTRL_RX_PROMISC, &[2][..]),
        (rx, n::VIRTIO_NET_CTRL_RX_PROMISC, &[0, 0][..]),
        (rx, 77, &[1][..]),
        (mac, n::VIRTIO_NET_CTRL_MAC_TABLE_SET, &truncated[..]),
        (mac, n::VIRTIO_NET_CTRL_MAC_TABLE_SET, &trailing[..]),
        (mac, n::VIRTIO_NET_CTRL_MAC_TABLE_SET, &swapped[..]),
        (mac, n::VIRTIO_NET_CTRL_MAC_TABLE_SET, &huge[..]),
        (mac, n::VIRTIO_NET_CTRL_MAC_ADDR_SET, &MAC[..5]),
        (
            vlan,
            n::VIRTIO_NET_CTRL_VLAN_ADD,
            &5000u16.to_le_bytes()[..],
        ),
        (announce, n::VIRTIO_NET_CTRL_ANNOUNCE_ACK, &[0][..]),
        (
            n::VIRTIO_NET_CTRL_MQ,
            n::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &[1, 0][..],
        ),
        (n::VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, &[0; 8][..]),
        (200, 200, &[][..]),
    ] {
        assert_eq!(
            d.command(class, cmd, data),
            (ack::ERR, 1),
            "{class} {cmd} {data:?}"
        );
    }
    assert_eq!(d.port.config_record(), before);
    assert_eq!(d.port.take_config_change(), None);
    // A command without class and command, with two ack bytes, or with no ack byte at all.
    let at = BUF + 0x40000;
    d.write(at, &[0xee, 0xee]);
    d.chain(2, 0, &[(at + 0x100, 1, false), (at, 1, true)]);
    d.chain(2, 2, &[(at + 0x100, 3, false), (at, 2, true)]);
    d.chain(2, 4, &[(at + 0x100, 3, false)]);
    d.publish(2, &[0, 2, 4]);
    assert_eq!(d.port.control(16), 3);
    assert_eq!(d.used(2), Some((0, 1)));
    assert_eq!(d.used(2), Some((2, 1)));
    assert_eq!(d.read(at, 1)[0], ack::ERR);
    assert_eq!(d.used(2), Some((4, 0)));
    assert!(!d.port.needs_reset());
    assert_eq!(d.port.counters.ctrl_err.load(Ordering::Relaxed), 18);
}

#[test]
fn commands_of_features_not_accepted_get_err() {
    // CTRL_VQ without CTRL_RX, CTRL_RX_EXTRA, CTRL_MAC_ADDR, CTRL_VLAN or GUEST_ANNOUNCE.
    let mut d = Driver::new(MINIMAL | feature::CTRL_VQ);
    let rx = n::VIRTIO_NET_CTRL_RX;
    assert_eq!(
        d.command(rx, n::VIRTIO_NET_CTRL_RX_PROMISC, &[1]).0,
        ack::ERR
    );
    let mac = n::VIRTIO_NET_CTRL_MAC;
    assert_eq!(
        d.command(mac, n::VIRTIO_NET_CTRL_MAC_ADDR_SET, &MAC).0,
        ack::ERR
    );
    let vlan = n::VIRTIO_NET_CTRL_VLAN;
    assert_eq!(
        d.command(vlan, n::VIRTIO_NET_CTRL_VLAN_ADD, &[1, 0]).0,
        ack::ERR
    );
    assert!(!d.port.announce(), "no GUEST_ANNOUNCE: nothing to announce");
    // CTRL_RX without CTRL_RX_EXTRA: the basic two only.
    let mut d = Driver::new(MINIMAL | feature::CTRL_VQ | feature::CTRL_RX);
    assert_eq!(
        d.command(rx, n::VIRTIO_NET_CTRL_RX_ALLMULTI, &[0]).0,
        ack::OK
    );
    assert_eq!(
        d.command(rx, n::VIRTIO_NET_CTRL_RX_NOBCAST, &[1]).0,
        ack::ERR
    );
    assert_eq!(
        d.port.config_record(),
        ClientConfig {
            rx: RxMode {
                allmulti: false,
                ..RxMode::default()
            },
            ..ClientConfig::default()
        }
    );
}

#[test]
fn a_reset_drops_everything_in_flight_without_touching_the_clients_memory() {
    let mut d = Driver::new(FEATURES);
    d.write(BUF, &[0; 12]);
    for i in 0..4u16 {
        d.chain(1, i * 2, &[(BUF, 12, false), (BUF + 0x200, 60, false)]);
    }
    d.publish(1, &[0, 2, 4, 6]);
    let mut b = Recorder::new();
    assert_eq!(d.port.transmit(&mut b, 16), 4);
    assert!(d.port.complete_tx(b.frames[0].0));
    assert_eq!(d.command(n::VIRTIO_NET_CTRL_RX, 0, &[1]).0, ack::OK);
    d.port.take_config_change();
    d.chain(0, 0, &[(BUF + 0x10000, 2048, true)]);
    d.publish(0, &[0]);
    // The driver resets with three frames at the backend and an RX buffer posted.
    d.device.reset();
    let snapshot = d.read(0, 4 << 20);
    for (t, _) in &b.frames[1..] {
        assert!(!d.port.complete_tx(*t));
    }
    assert_eq!(d.port.counters.tx_stale.load(Ordering::Relaxed), 3);
    assert_eq!(d.port.receive(&frame(MAC, PEER, 60)), Rx::NotReady);
    assert_eq!(d.port.transmit(&mut b, 16), 0);
    assert_eq!(d.port.control(16), 0);
    assert!(!d.port.arm());
    assert!(
        d.read(0, 4 << 20) == snapshot,
        "memory touched after the reset"
    );
    // The record returns to the default, and the switch is told.
    assert_eq!(d.port.take_config_change(), Some(ClientConfig::default()));
    assert_eq!(d.port.tx_in_flight(), 0);
    // A new activation starts clean (fresh rings): the old tokens stay dead.
    d.write(AVAIL, &[0; 0x3000]);
    d.write(USED, &[0; 0x3000]);
    d.device
        .activate(
            FEATURES,
            (0..3).map(|q| Some(ready_queue(q, true))).collect(),
        )
        .unwrap();
    d.avail = [0; 3];
    d.used_seen = [0; 3];
    assert!(!d.port.complete_tx(b.frames[1].0));
    // The same head in flight again in the new generation: an old token for it is stale,
    // and the new chain stays the device's until its own token completes.
    d.chain(1, 2, &[(BUF, 12, false), (BUF + 0x200, 60, false)]);
    d.publish(1, &[2]);
    let mut b2 = Recorder::new();
    assert_eq!(d.port.transmit(&mut b2, 16), 1);
    assert!(!d.port.complete_tx(b.frames[1].0));
    assert_eq!(d.used(1), None);
    assert!(d.port.complete_tx(b2.frames[0].0));
    assert_eq!(d.used(1), Some((2, 0)));
}

#[test]
fn link_changes_raise_a_configuration_interrupt_for_a_driver_with_status() {
    let d = Driver::new(MINIMAL);
    let before = d.wakes.load(Ordering::Relaxed);
    d.port.set_link(false);
    assert_eq!(d.port.status(), 0);
    assert_eq!(d.wakes.load(Ordering::Relaxed), before + 1);
    assert_ne!(
        d.port.interrupt.status() & crate::virtio::interrupt::CONFIG,
        0
    );
    d.port.set_link(false);
    assert_eq!(
        d.wakes.load(Ordering::Relaxed),
        before + 1,
        "no change, no interrupt"
    );
    d.port.set_link(true);
    assert_eq!(d.port.status(), link::UP);
}
