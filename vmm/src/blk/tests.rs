//! The frontend and block service against a scripted driver: split rings written by hand into
//! a client's memory, served from a file. Every kind of hostile chain the frontend must
//! survive is here (loops, out-of-range buffers, wrong directions, huge indirect tables,
//! republished heads, resets with requests in flight), next to a well-behaved client whose
//! data must come through untouched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk as b;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::device::{BlockGeometry, ClientPort, LbaRange, VirtioBlock, QUEUE_SIZE, SEG_MAX};
use super::request::status;
use super::service::{Worker, CLIENT_SHARE, FAIR_SLACK, QUEUE_BUDGET};
use super::{Backend, BlockService, FileBackend};
use crate::memory::{self, GuestMem};
use crate::virtio::{Interrupt, VirtioDevice};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x20000;
const USED: u64 = 0x30000;
const HDR: u64 = 0x40000;
const DATA: u64 = 0x100000;
const STATUS: u64 = 0x50000;
/// Where indirect tables go: 1 MiB, room for 65,535 descriptors.
const TABLE: u64 = 0x200000;

/// A scripted driver: one queue of `QUEUE_SIZE` in a 4 MiB client (or, from
/// [`Driver::queues`], one of several queues of the same device).
struct Driver {
    mem: GuestMem,
    port: Arc<ClientPort>,
    device: VirtioBlock,
    avail: u16,
    used_seen: u16,
    wakes: Arc<AtomicU64>,
    /// Where this queue's rings are, past DESC, AVAIL and USED (0 for the first queue).
    rings: u64,
}

/// Rings of queue `n`: 4 KiB apart, inside each ring area.
fn rings_of(n: u16) -> u64 {
    u64::from(n) * 0x1000
}

fn ready_queue(rings: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.try_set_desc_table_address(GuestAddress(DESC + rings))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL + rings))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(USED + rings))
        .unwrap();
    q.set_ready(true);
    q
}

impl Driver {
    fn new(name: &str, range: LbaRange) -> Driver {
        Self::queues(name, range, 1).pop().unwrap()
    }

    /// A device with `n` queues, all in use: a driver per queue (the first owns the device).
    fn queues(name: &str, range: LbaRange, n: u16) -> Vec<Driver> {
        let mem = memory::create(4 << 20, 1 << 30).unwrap();
        let wakes = Arc::new(AtomicU64::new(0));
        let w = wakes.clone();
        let interrupt = Interrupt::new(Arc::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        }));
        let geometry = BlockGeometry {
            range,
            block_size: 512,
            read_only: false,
            discard: true,
            write_zeroes: true,
            serial: format!("ser-{name}"),
            queues: n,
        };
        let port = ClientPort::new(name, mem.clone(), geometry, interrupt).unwrap();
        let mut device = VirtioBlock::new(port.clone());
        device
            .activate(0, (0..n).map(|i| Some(ready_queue(rings_of(i)))).collect())
            .unwrap();
        let mut devices = vec![device];
        devices.extend((1..n).map(|_| VirtioBlock::new(port.clone())));
        (0..n)
            .zip(devices)
            .map(|(i, device)| Driver {
                mem: mem.clone(),
                port: port.clone(),
                device,
                avail: 0,
                used_seen: 0,
                wakes: wakes.clone(),
                rings: rings_of(i),
            })
            .collect()
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + self.rings + u64::from(i) * 16;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Writes `entries` (address, length, flags) as an indirect table at [`TABLE`], each
    /// chained to the next where it says NEXT, and makes descriptor `head` point to it.
    fn indirect(&self, head: u16, entries: &[(u64, u32, u16)]) {
        let mut table = Vec::with_capacity(entries.len() * 16);
        for (i, &(addr, len, flags)) in entries.iter().enumerate() {
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&((i + 1) as u16).to_le_bytes());
        }
        self.mem.write_slice(&table, GuestAddress(TABLE)).unwrap();
        self.desc(head, TABLE, table.len() as u32, F_INDIRECT, 0);
    }

    /// Makes `heads` available in one step (one write of the index) and notifies.
    fn publish_all(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = AVAIL + self.rings + 4 + u64::from(self.avail % QUEUE_SIZE) * 2;
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail = self.avail.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + self.rings + 2))
            .unwrap();
        self.port.notify.write(1).unwrap();
    }

    /// The used ring's index.
    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED + self.rings + 2))
            .unwrap()
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Makes head `head` available and notifies.
    fn publish(&mut self, head: u16) {
        self.publish_all(&[head]);
    }

    /// A well-formed request using descriptors `base..base+3` and the `n`-th data page.
    fn request(&mut self, base: u16, kind: u32, sector: u64, n: u64, len: u32) -> u16 {
        let hdr = HDR + u64::from(base) * 16;
        self.header(hdr, kind, sector);
        let reads = kind == b::VIRTIO_BLK_T_IN || kind == b::VIRTIO_BLK_T_GET_ID;
        let data_flags = if reads { F_WRITE } else { 0 };
        self.desc(base, hdr, 16, F_NEXT, base + 1);
        self.desc(
            base + 1,
            DATA + n * 0x10000,
            len,
            data_flags | F_NEXT,
            base + 2,
        );
        self.desc(base + 2, STATUS + u64::from(base), 1, F_WRITE, 0);
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + u64::from(base)))
            .unwrap();
        self.publish(base);
        base
    }

    /// Waits for the next used entry: (head, len, status byte at `status_at`).
    fn wait_used(&mut self, status_at: u64) -> Option<(u32, u32, u8)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let used = USED + self.rings;
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            if idx != self.used_seen {
                let e = used + 4 + u64::from(self.used_seen % QUEUE_SIZE) * 8;
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                self.used_seen = self.used_seen.wrapping_add(1);
                let st: u8 = self.mem.read_obj(GuestAddress(status_at)).unwrap();
                return Some((id, len, st));
            }
            if self.device.needs_reset() {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    }

    fn fill(&self, n: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(DATA + n * 0x10000))
            .unwrap();
    }

    fn data(&self, n: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem
            .read_slice(&mut v, GuestAddress(DATA + n * 0x10000))
            .unwrap();
        v
    }

    fn reset(&mut self) {
        self.device.reset();
        self.avail = 0;
        self.used_seen = 0;
        self.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
        self.device
            .activate(0, vec![Some(ready_queue(self.rings))])
            .unwrap();
    }
}

/// A read through an indirect table of 65,535 descriptors: the header, 65,533 data
/// descriptors of 512 bytes and the status byte (33 MB of data, SEG_MAX 254).
fn table_of_65535(d: &mut Driver) {
    d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
    let mut e = vec![(HDR, 16, F_NEXT)];
    e.extend((0..65_533u64).map(|i| (DATA + i * 512 % 0x80000, 512, F_WRITE | F_NEXT)));
    e.push((STATUS, 1, F_WRITE));
    d.indirect(0, &e);
    d.publish(0);
}

/// A write through an indirect table of `n` one-byte descriptors: the header in 16, the data
/// in `n - 17`, the status byte.
fn one_byte_descriptors(d: &mut Driver, n: usize) {
    d.header(HDR, b::VIRTIO_BLK_T_OUT, 0);
    let mut e: Vec<_> = (0..16).map(|i| (HDR + i, 1, F_NEXT)).collect();
    e.extend((0..(n - 17) as u64).map(|i| (DATA + i, 1, F_NEXT)));
    e.push((STATUS, 1, F_WRITE));
    d.indirect(0, &e);
    d.publish(0);
}

/// A read of SEG_MAX + 1 sectors, one 512-byte data descriptor each (indirect): within the
/// device's byte limits, beyond its segment limit.
fn seg_max_plus_one(d: &mut Driver) {
    d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
    let mut e = vec![(HDR, 16, F_NEXT)];
    e.extend((0..u64::from(SEG_MAX) + 1).map(|i| (DATA + i * 512, 512, F_WRITE | F_NEXT)));
    e.push((STATUS, 1, F_WRITE));
    d.indirect(0, &e);
    d.publish(0);
}

/// A valid read at head 0, made available `times` times in one step.
fn republished(d: &mut Driver, times: usize) {
    d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
    d.desc(0, HDR, 16, F_NEXT, 1);
    d.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
    d.desc(2, STATUS, 1, F_WRITE, 0);
    d.publish_all(&vec![0; times]);
}

fn disk(mib: u64) -> (tempfile_path::TempPath, FileBackend) {
    let path = tempfile_path::TempPath::new("blk");
    let f = std::fs::File::create(&path.0).unwrap();
    f.set_len(mib << 20).unwrap();
    let b = FileBackend::open(&path.0, 512).unwrap();
    (path, b)
}

mod tempfile_path {
    /// A file path removed on drop.
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            TempPath(
                std::env::temp_dir()
                    .join(format!("ddvm-test-{tag}-{}-{n}.img", std::process::id())),
            )
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

const RANGE_A: LbaRange = LbaRange {
    first: 0,
    sectors: 2048,
};
const RANGE_B: LbaRange = LbaRange {
    first: 2048,
    sectors: 2048,
};

fn service(drivers: &[&Driver], backend: FileBackend) -> BlockService {
    let ports = drivers.iter().map(|d| d.port.clone()).collect();
    BlockService::spawn("test", ports, Backend::File(backend)).unwrap()
}

#[test]
fn writes_read_back_and_stay_inside_each_clients_range() {
    let (path, backend) = disk(2);
    let mut a = Driver::new("a", RANGE_A);
    let mut b = Driver::new("b", RANGE_B);
    let mut svc = service(&[&a, &b], backend);
    a.fill(0, 4096, 0xaa);
    b.fill(0, 4096, 0xbb);
    a.request(0, b::VIRTIO_BLK_T_OUT, 8, 0, 4096);
    assert_eq!(a.wait_used(STATUS), Some((0, 1, status::OK)));
    b.request(0, b::VIRTIO_BLK_T_OUT, 8, 0, 4096);
    assert_eq!(b.wait_used(STATUS), Some((0, 1, status::OK)));
    a.fill(1, 4096, 0);
    a.request(3, b::VIRTIO_BLK_T_IN, 8, 1, 4096);
    assert_eq!(a.wait_used(STATUS + 3), Some((3, 4097, status::OK)));
    assert!(a.data(1, 4096).iter().all(|&x| x == 0xaa));
    // On the disk: a's sector 8 at byte 4096, b's at (2048 + 8) * 512.
    svc.stop().unwrap();
    let bytes = std::fs::read(&path.0).unwrap();
    assert!(bytes[4096..8192].iter().all(|&x| x == 0xaa));
    assert!(bytes[(2056 * 512)..(2056 * 512 + 4096)]
        .iter()
        .all(|&x| x == 0xbb));
    assert!(
        a.wakes.load(Ordering::Relaxed) > 0,
        "the client was signalled"
    );
}

/// MQ: requests on every queue of one device are served, each answered on the queue it came
/// from (in that queue's used ring, its status byte), and the data is one disk for all.
#[test]
fn each_queue_of_a_multiqueue_device_is_answered_on_its_own_ring() {
    let (_path, backend) = disk(2);
    let mut qs = Driver::queues("mq", RANGE_A, 3);
    let svc = service(&[&qs[0]], backend);
    // A write on queue 2, read back on queue 1; descriptors apart (each queue has its own
    // table, but the headers and status bytes of a test request sit at its head's index).
    qs[2].fill(2, 4096, 0x3c);
    qs[2].request(6, b::VIRTIO_BLK_T_OUT, 16, 2, 4096);
    assert_eq!(qs[2].wait_used(STATUS + 6), Some((6, 1, status::OK)));
    qs[1].fill(1, 4096, 0);
    qs[1].request(3, b::VIRTIO_BLK_T_IN, 16, 1, 4096);
    assert_eq!(qs[1].wait_used(STATUS + 3), Some((3, 4097, status::OK)));
    assert_eq!(qs[1].data(1, 4096), vec![0x3c; 4096]);
    // Several queues at once: each gets exactly its own answers.
    for (i, q) in qs.iter_mut().enumerate() {
        let base = 9 + 3 * i as u16;
        q.request(base, b::VIRTIO_BLK_T_IN, 16, 4 + i as u64, 512);
    }
    for (i, q) in qs.iter_mut().enumerate() {
        let base = 9 + 3 * i as u16;
        let got = q.wait_used(STATUS + u64::from(base));
        assert_eq!(got, Some((u32::from(base), 513, status::OK)), "queue {i}");
    }
    for (i, q) in qs.iter().enumerate() {
        let used: u16 = q.mem.read_obj(GuestAddress(USED + q.rings + 2)).unwrap();
        assert_eq!(used, q.used_seen, "queue {i}: its own answers only");
    }
    assert_eq!(svc.counters().answered.load(Ordering::Relaxed), 5);
    assert!(
        qs[0].wakes.load(Ordering::Relaxed) > 0,
        "the client was signalled"
    );
}

#[test]
fn a_range_larger_than_a_part_is_split_and_answered_once() {
    let (_path, backend) = disk(2);
    let mut a = Driver::new("a", RANGE_A);
    let svc = service(&[&a], backend);
    // 64 KiB in one request.
    a.fill(0, 65536, 0x5a);
    a.request(0, b::VIRTIO_BLK_T_OUT, 0, 0, 65536);
    assert_eq!(a.wait_used(STATUS), Some((0, 1, status::OK)));
    a.request(3, b::VIRTIO_BLK_T_IN, 0, 1, 65536);
    assert_eq!(a.wait_used(STATUS + 3), Some((3, 65537, status::OK)));
    assert_eq!(a.data(1, 65536), vec![0x5a; 65536]);
    assert_eq!(svc.counters().answered.load(Ordering::Relaxed), 2);
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let (_path, backend) = disk(2);
    let mut a = Driver::new("a", RANGE_A);
    let _svc = service(&[&a], backend);
    // Flush: header + status only.
    a.header(HDR, b::VIRTIO_BLK_T_FLUSH, 0);
    a.desc(0, HDR, 16, F_NEXT, 1);
    a.desc(1, STATUS, 1, F_WRITE, 0);
    a.publish(0);
    assert_eq!(a.wait_used(STATUS), Some((0, 1, status::OK)));
    // Get ID.
    a.request(3, b::VIRTIO_BLK_T_GET_ID, 0, 0, 512);
    assert_eq!(a.wait_used(STATUS + 3), Some((3, 21, status::OK)));
    assert_eq!(&a.data(0, 6), b"ser-a\0");
    // Write ones, write zeroes over them, read zeroes back.
    a.fill(0, 4096, 1);
    a.request(6, b::VIRTIO_BLK_T_OUT, 0, 0, 4096);
    assert_eq!(a.wait_used(STATUS + 6), Some((6, 1, status::OK)));
    let seg = DATA + 0x80000;
    a.mem.write_obj(0u64, GuestAddress(seg)).unwrap();
    a.mem.write_obj(8u32, GuestAddress(seg + 8)).unwrap();
    a.mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
    a.header(HDR + 9 * 16, b::VIRTIO_BLK_T_WRITE_ZEROES, 0);
    a.desc(9, HDR + 9 * 16, 16, F_NEXT, 10);
    a.desc(10, seg, 16, F_NEXT, 11);
    a.desc(11, STATUS + 9, 1, F_WRITE, 0);
    a.publish(9);
    assert_eq!(a.wait_used(STATUS + 9), Some((9, 1, status::OK)));
    a.request(12, b::VIRTIO_BLK_T_IN, 0, 1, 4096);
    assert_eq!(a.wait_used(STATUS + 12), Some((12, 4097, status::OK)));
    assert_eq!(a.data(1, 4096), vec![0; 4096]);
    // Discard with the unmap flag (only valid for write zeroes): unsupported.
    a.mem.write_obj(1u32, GuestAddress(seg + 12)).unwrap();
    a.header(HDR + 15 * 16, b::VIRTIO_BLK_T_DISCARD, 0);
    a.desc(15, HDR + 15 * 16, 16, F_NEXT, 16);
    a.desc(16, seg, 16, F_NEXT, 17);
    a.desc(17, STATUS + 15, 1, F_WRITE, 0);
    a.publish(15);
    assert_eq!(a.wait_used(STATUS + 15), Some((15, 1, status::UNSUPP)));
}

/// Each hostile chain gets an error status or DEVICE_NEEDS_RESET; afterwards (and after a
/// reset where needed) the same client is served again, and the other client never noticed.
#[test]
fn hostile_chains_get_an_error_or_needs_reset_and_harm_nobody() {
    let (_path, backend) = disk(2);
    let mut bad = Driver::new("bad", RANGE_A);
    let mut good = Driver::new("good", RANGE_B);
    let _svc = service(&[&bad, &good], backend);
    type Case = (&'static str, fn(&mut Driver), Option<u8>);
    let cases: [Case; 13] = [
        (
            "indirect table of 65,535 descriptors",
            |d| table_of_65535(d),
            None,
        ),
        (
            "chain of 10,000 one-byte descriptors",
            |d| one_byte_descriptors(d, 10_000),
            None,
        ),
        (
            "one data descriptor more than SEG_MAX",
            |d| seg_max_plus_one(d),
            Some(status::IOERR),
        ),
        (
            "a head published again while in flight",
            |d| republished(d, 2),
            None,
        ),
        (
            "descriptor loop",
            |d| {
                d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
                d.desc(0, HDR, 16, F_NEXT, 1);
                d.desc(1, DATA, 512, F_WRITE | F_NEXT, 0);
                d.publish(0);
            },
            None,
        ),
        (
            "address outside guest memory",
            |d| {
                d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
                d.desc(0, HDR, 16, F_NEXT, 1);
                d.desc(1, 0x8_0000_0000, 512, F_WRITE | F_NEXT, 2);
                d.desc(2, STATUS, 1, F_WRITE, 0);
                d.publish(0);
            },
            Some(status::IOERR),
        ),
        (
            "buffer wrapping the top of the address space",
            |d| {
                d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
                d.desc(0, HDR, 16, F_NEXT, 1);
                d.desc(1, u64::MAX - 255, 512, F_WRITE | F_NEXT, 2);
                d.desc(2, STATUS, 1, F_WRITE, 0);
                d.publish(0);
            },
            Some(status::IOERR),
        ),
        (
            "write-only header",
            |d| {
                d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
                d.desc(0, HDR, 16, F_WRITE | F_NEXT, 1);
                d.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
                d.desc(2, STATUS, 1, F_WRITE, 0);
                d.publish(0);
            },
            Some(status::IOERR),
        ),
        (
            "read-only status",
            |d| {
                d.header(HDR, b::VIRTIO_BLK_T_OUT, 0);
                d.desc(0, HDR, 16, F_NEXT, 1);
                d.desc(1, DATA, 512, F_NEXT, 2);
                d.desc(2, STATUS, 1, 0, 0);
                d.publish(0);
            },
            None,
        ),
        (
            "zero-length buffer",
            |d| {
                d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
                d.desc(0, HDR, 16, F_NEXT, 1);
                d.desc(1, DATA, 0, F_WRITE | F_NEXT, 2);
                d.desc(2, STATUS, 1, F_WRITE, 0);
                d.publish(0);
            },
            Some(status::IOERR),
        ),
        (
            "chain longer than the queue",
            |d| {
                d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
                d.desc(0, HDR, 16, F_NEXT, 1);
                for i in 1..QUEUE_SIZE {
                    d.desc(i, DATA, 512, F_WRITE | F_NEXT, (i + 1) % QUEUE_SIZE);
                }
                d.publish(0);
            },
            None,
        ),
        (
            "sector beyond its range",
            |d| {
                d.request(0, b::VIRTIO_BLK_T_IN, RANGE_A.sectors - 4, 0, 4096);
            },
            Some(status::IOERR),
        ),
        (
            "avail index jumping by more than the queue size",
            |d| {
                // A well-formed chain, published with an index QUEUE_SIZE + 1 past the last
                // one in a single write (publishing it first and then jumping would race the
                // service, which may answer the chain in between).
                d.header(HDR, b::VIRTIO_BLK_T_IN, 0);
                d.desc(0, HDR, 16, F_NEXT, 1);
                d.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
                d.desc(2, STATUS, 1, F_WRITE, 0);
                let slot = AVAIL + 4 + u64::from(d.avail % QUEUE_SIZE) * 2;
                d.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
                d.avail = d.avail.wrapping_add(QUEUE_SIZE + 1);
                d.mem.write_obj(d.avail, GuestAddress(AVAIL + 2)).unwrap();
                d.port.notify.write(1).unwrap();
            },
            None,
        ),
    ];
    for (i, (name, script, expect)) in cases.iter().enumerate() {
        bad.reset();
        script(&mut bad);
        let got = bad.wait_used(STATUS);
        match expect {
            Some(st) => assert_eq!(got.map(|g| g.2), Some(*st), "{name}"),
            None => {
                // Either an error answer or needs-reset; for these chains: needs-reset.
                assert!(got.is_none(), "{name}: answered {got:?}");
                assert!(bad.device.needs_reset(), "{name}: needs reset");
            }
        }
        // The other client is served throughout.
        let sector = (i as u64) * 8;
        good.fill(0, 4096, i as u8 + 1);
        good.request(0, b::VIRTIO_BLK_T_OUT, sector, 0, 4096);
        assert_eq!(good.wait_used(STATUS), Some((0, 1, status::OK)), "{name}");
        good.request(3, b::VIRTIO_BLK_T_IN, sector, 1, 4096);
        assert_eq!(
            good.wait_used(STATUS + 3),
            Some((3, 4097, status::OK)),
            "{name}"
        );
        assert_eq!(good.data(1, 4096), vec![i as u8 + 1; 4096], "{name}");
    }
    // After a reset the hostile client is served normally.
    bad.reset();
    bad.fill(0, 512, 7);
    bad.request(0, b::VIRTIO_BLK_T_OUT, 0, 0, 512);
    assert_eq!(bad.wait_used(STATUS), Some((0, 1, status::OK)));
    assert!(bad.port.counters.needs_reset.load(Ordering::Relaxed) >= 3);
}

/// A neighbour attacks without pause — tables of 65,535 descriptors, chains of 10,000 one-byte
/// descriptors, heads published again while in flight, floods of valid requests, resets with
/// requests in flight — while a well-behaved client writes and reads back its blocks: every
/// one of its requests is answered correctly and in time.
#[test]
fn a_well_behaved_client_is_served_while_a_neighbour_attacks() {
    let (_path, backend) = disk(2);
    let mut bad = Driver::new("bad", RANGE_A);
    let mut good = Driver::new("good", RANGE_B);
    let svc = service(&[&bad, &good], backend);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let attacker = std::thread::spawn(move || {
        let mut rounds = 0u64;
        while !s.load(Ordering::Relaxed) {
            bad.reset();
            match rounds % 5 {
                0 => table_of_65535(&mut bad),
                1 => one_byte_descriptors(&mut bad, 10_000),
                2 => republished(&mut bad, 200),
                3 => {
                    // A flood of valid reads, and a reset while they are in flight.
                    for i in 0..80u16 {
                        bad.request(3 * i, b::VIRTIO_BLK_T_IN, u64::from(i) * 8, 0, 4096);
                    }
                }
                _ => {
                    for i in 0..80u16 {
                        bad.request(3 * i, b::VIRTIO_BLK_T_OUT, u64::from(i) * 8, 1, 4096);
                    }
                    bad.wait_used(STATUS);
                }
            }
            let t = Instant::now();
            while !bad.device.needs_reset() && t.elapsed() < Duration::from_millis(2) {
                std::hint::spin_loop();
            }
            rounds += 1;
        }
        (rounds, bad)
    });
    let t = Instant::now();
    for i in 0..300u64 {
        let sector = (i % 200) * 8;
        good.fill(0, 4096, i as u8 | 1);
        good.request(0, b::VIRTIO_BLK_T_OUT, sector, 0, 4096);
        assert_eq!(
            good.wait_used(STATUS),
            Some((0, 1, status::OK)),
            "write {i}"
        );
        good.fill(1, 4096, 0);
        good.request(3, b::VIRTIO_BLK_T_IN, sector, 1, 4096);
        assert_eq!(
            good.wait_used(STATUS + 3),
            Some((3, 4097, status::OK)),
            "read {i}"
        );
        assert_eq!(good.data(1, 4096), vec![i as u8 | 1; 4096], "read {i}");
    }
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (rounds, bad) = attacker.join().unwrap();
    let resets = bad.port.counters.needs_reset.load(Ordering::Relaxed);
    assert!(rounds >= 5, "the attack ran ({rounds} rounds)");
    assert!(
        resets >= 3,
        "the attacks were refused ({resets} of {rounds} rounds)"
    );
    assert!(!svc.is_finished(), "the service survived");
    assert!(took < Duration::from_secs(60), "600 requests took {took:?}");
    assert_eq!(good.port.counters.needs_reset.load(Ordering::Relaxed), 0);
}

fn worker(drivers: &[&Driver], backend: FileBackend) -> Worker {
    let ports = drivers.iter().map(|d| d.port.clone()).collect();
    Worker::for_test(ports, Backend::File(backend))
}

/// Within a fairness window a client that floods takes at most as many requests as the other
/// (served) client took, plus the slack; when the window ends it goes on. A client alone is
/// not held back.
#[test]
fn a_flooding_client_takes_no_more_than_its_share_of_a_window() {
    let (_path, backend) = disk(2);
    let mut flood = Driver::new("flood", RANGE_A);
    let mut good = Driver::new("good", RANGE_B);
    let mut w = worker(&[&flood, &good], backend);
    w.test_fair_window(Duration::from_secs(3600));
    for i in 0..80u16 {
        flood.request(3 * i, b::VIRTIO_BLK_T_IN, u64::from(i) * 8, 0, 512);
    }
    good.request(0, b::VIRTIO_BLK_T_IN, 0, 0, 512);
    for _ in 0..20 {
        w.test_pass();
    }
    assert_eq!(good.wait_used(STATUS), Some((0, 513, status::OK)));
    let answered = flood.used_idx();
    assert!(
        answered <= 1 + FAIR_SLACK as u16,
        "the flood had {answered} answered next to 1 of the other client's"
    );
    // The other client takes one more: the flood one more.
    good.request(3, b::VIRTIO_BLK_T_IN, 8, 0, 512);
    for _ in 0..20 {
        w.test_pass();
    }
    assert!(flood.used_idx() <= 2 + FAIR_SLACK as u16);
    // A new window, the other client idle for two of them: the flood is served in full.
    w.test_fair_window(Duration::ZERO);
    for _ in 0..200 {
        w.test_pass();
    }
    assert_eq!(flood.used_idx(), 80);
}

/// A client publishes the same head again and again while the backend takes nothing (as while
/// a driver domain restarts): the device asks for a reset at the first repeat, and what the
/// service holds stays within the queue size, not one entry per publication.
#[test]
fn a_head_republished_in_flight_needs_reset_and_memory_stays_bounded() {
    let (_path, backend) = disk(2);
    let mut a = Driver::new("a", RANGE_A);
    let mut w = worker(&[&a], backend);
    republished(&mut a, 1);
    w.test_intake();
    assert_eq!(w.test_pending(), 1);
    assert_eq!(w.test_heads(0, 0), 1, "head 0 is in flight");
    for _ in 0..40 {
        let heads = vec![0u16; 200];
        a.publish_all(&heads);
        w.test_intake();
    }
    assert!(a.device.needs_reset(), "a repeated head needs a reset");
    assert!(
        w.test_pending() <= usize::from(QUEUE_SIZE),
        "{} requests held for one head",
        w.test_pending()
    );
    assert!(w.test_shadow() <= usize::from(QUEUE_SIZE));
    // Nothing is answered into the rings of a device that needs a reset.
    for _ in 0..4 {
        w.test_post_collect();
    }
    assert_eq!(a.used_idx(), 0);
    // After a reset the client is served again.
    a.reset();
    a.request(0, b::VIRTIO_BLK_T_IN, 0, 0, 512);
    for _ in 0..4 {
        w.test_pass();
    }
    assert_eq!(a.wait_used(STATUS), Some((0, 513, status::OK)));
    assert_eq!(w.test_pending(), 0);
    assert_eq!(w.test_shadow(), 0);
}

/// A client resets its device with requests accepted but not yet executed, and reuses their
/// buffers: the write is never executed (neither with the old data nor with what the buffers
/// hold now), the read copies nothing into them, nothing is answered into the new rings, and
/// the service forgets both. Whether the service notices the reset before the backend runs
/// the requests or only as it runs them.
#[test]
fn a_reset_drops_requests_without_touching_the_clients_memory() {
    for intake_first in [false, true] {
        let (path, backend) = disk(2);
        let mut a = Driver::new("a", RANGE_A);
        let mut w = worker(&[&a], backend);
        // Sector 8 holds 0x11 on the disk.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path.0)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x11; 4096], 8 * 512).unwrap();
        a.fill(0, 4096, 0xaa);
        a.request(0, b::VIRTIO_BLK_T_OUT, 0, 0, 4096);
        a.request(3, b::VIRTIO_BLK_T_IN, 8, 1, 4096);
        w.test_intake();
        assert_eq!(w.test_pending(), 2, "both accepted");
        // The reset; the driver reuses the buffers at once.
        a.reset();
        a.fill(0, 4096, 0x55);
        a.fill(1, 4096, 0x77);
        for at in [STATUS, STATUS + 3] {
            a.mem.write_obj(0xeeu8, GuestAddress(at)).unwrap();
        }
        if intake_first {
            w.test_intake();
        }
        for _ in 0..4 {
            w.test_post_collect();
        }
        w.test_intake();
        let bytes = std::fs::read(&path.0).unwrap();
        assert!(
            bytes[..4096].iter().all(|&x| x == 0),
            "intake first {intake_first}: the abandoned write was executed (first byte {:#x})",
            bytes[0]
        );
        assert_eq!(
            a.data(1, 4096),
            vec![0x77; 4096],
            "the read copied into a reused buffer"
        );
        assert_eq!(a.used_idx(), 0, "answered into the new rings");
        for at in [STATUS, STATUS + 3] {
            assert_eq!(a.mem.read_obj::<u8>(GuestAddress(at)).unwrap(), 0xee);
        }
        assert_eq!(w.test_pending(), 0);
        assert_eq!(w.test_shadow(), 0);
        // The device works normally after it.
        a.request(6, b::VIRTIO_BLK_T_IN, 8, 2, 4096);
        for _ in 0..4 {
            w.test_pass();
        }
        assert_eq!(a.wait_used(STATUS + 6), Some((6, 4097, status::OK)));
        assert_eq!(a.data(2, 4096), vec![0x11; 4096]);
    }
}

/// A client with its queue full of valid requests and a client with one: the service takes
/// at most QUEUE_BUDGET chains from a queue per pass, so the second client's request is
/// queued behind at most that many of the first's; and while the backend takes nothing, the
/// first client's requests wait in its own ring, not in the service (at most CLIENT_SHARE
/// of them while the other client has requests held). Everything is answered once the backend runs.
#[test]
fn intake_is_fair_between_clients_and_holds_a_flood_in_its_own_ring() {
    let (_path, backend) = disk(2);
    let mut flood = Driver::new("flood", RANGE_A);
    let mut good = Driver::new("good", RANGE_B);
    let mut w = worker(&[&flood, &good], backend);
    for i in 0..80u16 {
        flood.request(3 * i, b::VIRTIO_BLK_T_IN, u64::from(i) * 8, 0, 512);
    }
    good.request(0, b::VIRTIO_BLK_T_IN, 0, 0, 512);
    w.test_intake();
    let order = w.test_queued_ports();
    let ahead = order.iter().take_while(|&&p| p == 0).count();
    assert!(
        order.contains(&1),
        "the good client's request was taken: {order:?}"
    );
    assert!(
        ahead <= QUEUE_BUDGET,
        "{ahead} of the flood's requests queued ahead of the good client's"
    );
    for _ in 0..10 {
        w.test_intake();
    }
    assert!(
        w.test_pending_of(0) <= CLIENT_SHARE,
        "{} of the flood's requests held by the service",
        w.test_pending_of(0)
    );
    // The flood is held to its share of each fairness window while the other client is
    // served, then goes on: everything is answered within a few windows.
    let t0 = Instant::now();
    while w.test_pending() > 0 || flood.used_idx() < 80 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not every request answered"
        );
        w.test_pass();
    }
    assert_eq!(good.wait_used(STATUS), Some((0, 513, status::OK)));
    for _ in 0..80 {
        assert_eq!(flood.wait_used(STATUS).map(|u| u.1), Some(513));
    }
    assert_eq!(w.test_pending(), 0);
}
