//! virtio-blk request parsing with the block service's intake: two clients, each a virtio-blk
//! device with two queues, served from a file by the service's worker, stepped by hand.
//!
//! Input: a list of ops, each a selector byte (client: low bit; queue: bit 4), an op byte and
//! its arguments. `op % 8`: 0 to 3 a driver step ([`crate::virtq::Driver::step`]); 4 a pass
//! of the service; 5 intake only; 6 a device reset and re-activation of one client; 7 sets a
//! queue's `used_event`.
//!
//! Checked: every used entry names a head the client published and has not had back since,
//! with a length at most what its chain could hold plus the status byte; the service holds
//! at most a queue's worth of heads per queue; once the input is done, passes drain every
//! request it accepted (the file backend completes at once), so nothing stays unanswered
//! unless the device gave up on the queue.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ddvm::blk::device::QUEUE_SIZE;
use ddvm::blk::service::Worker;
use ddvm::blk::{Backend, BlockGeometry, ClientPort, FileBackend, LbaRange, VirtioBlock};
use ddvm::virtio::{Interrupt, VirtioDevice};
use virtio_bindings::virtio_blk as b;

use crate::virtq::{Driver, SeedDriver, Step, DATA, F_INDIRECT, F_NEXT, F_WRITE, TABLE};
use crate::{guest_memory, Input, Seed};

const CLIENTS: usize = 2;
const QUEUES: u16 = 2;
const MEM: u64 = 1 << 20;
const DISK_SECTORS: u64 = 4096;

/// The disk file both clients share (each on its own range), made once per process.
fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("ddvm-fuzz-blk-{}.img", std::process::id()));
        let f = std::fs::File::create(&path).expect("fuzz disk file");
        f.set_len(DISK_SECTORS * 512).expect("fuzz disk size");
        path
    })
}

struct Client {
    port: Arc<ClientPort>,
    device: VirtioBlock,
    drivers: Vec<Driver>,
    /// Per queue, per head: published and not yet given back.
    owed: Vec<Vec<u32>>,
    /// Per queue: its available ring was written behind the model's back, so what comes
    /// back is not checked against `owed` (until the next activation).
    blind: Vec<bool>,
}

impl Client {
    fn new(i: usize) -> Client {
        let mem = guest_memory(MEM);
        let geometry = BlockGeometry {
            range: LbaRange {
                first: 1024 * i as u64,
                sectors: 1024 + 512 * i as u64,
            },
            block_size: 4096,
            read_only: false,
            discard: true,
            write_zeroes: i == 0,
            serial: format!("fuzz-{i}"),
            queues: QUEUES,
        };
        let port = ClientPort::new(
            &format!("c{i}"),
            mem.clone(),
            geometry,
            Interrupt::new(Arc::new(|| {})),
        )
        .expect("client port");
        let device = VirtioBlock::new(port.clone());
        let drivers = (0..QUEUES)
            .map(|n| Driver::new(mem.clone(), n, QUEUE_SIZE))
            .collect();
        let mut c = Client {
            port,
            device,
            drivers,
            owed: Vec::new(),
            blind: Vec::new(),
        };
        c.activate();
        c
    }

    fn activate(&mut self) {
        let queues = self.drivers.iter().map(|d| Some(d.queue())).collect();
        self.device.activate(0, queues).expect("activation");
        self.owed = vec![vec![0; usize::from(QUEUE_SIZE)]; usize::from(QUEUES)];
        self.blind = vec![false; usize::from(QUEUES)];
        for d in &mut self.drivers {
            d.avail = 0;
            d.used_seen = 0;
            d.set_avail_idx(0);
            d.adopt_avail();
            let _ = vm_memory::Bytes::write_obj(
                &d.mem,
                0u16,
                vm_memory::GuestAddress(crate::virtq::USED + d.rings + 2),
            );
        }
    }

    /// Checks the used entries the service wrote since the last look.
    fn check_used(&mut self) {
        for (q, d) in self.drivers.iter_mut().enumerate() {
            self.blind[q] |= !d.avail_intact();
            for (id, len) in d.take_used() {
                let owed = self.owed[q]
                    .get_mut(id as usize)
                    .unwrap_or_else(|| panic!("used id {id} beyond the queue"));
                if !self.blind[q] {
                    assert!(*owed > 0, "head {id} of queue {q} answered but not owed");
                }
                *owed = owed.saturating_sub(1);
                // At most the largest request's data plus the status byte.
                assert!(
                    u64::from(len) <= ddvm::blk::device::MAX_REQUEST + 1,
                    "used length {len}"
                );
            }
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut clients: Vec<Client> = (0..CLIENTS).map(Client::new).collect();
    let backend = FileBackend::open(disk(), 4096).expect("fuzz disk");
    let ports = clients.iter().map(|c| c.port.clone()).collect();
    let mut worker = Worker::for_test(ports, Backend::File(backend));
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        let sel = input.u8();
        let op = input.u8();
        match op % 8 {
            0..=3 => {
                let c = &mut clients[usize::from(sel) % CLIENTS];
                let q = usize::from(sel >> 4) % usize::from(QUEUES);
                match c.drivers[q].step(op, &mut input) {
                    Some(Step::Published(head)) => {
                        if let Some(n) = c.owed[q].get_mut(usize::from(head % QUEUE_SIZE)) {
                            *n += 1;
                        }
                    }
                    Some(Step::AvailRings(mask)) => {
                        for (i, t) in c.blind.iter_mut().enumerate() {
                            *t |= mask >> i & 1 == 1;
                        }
                    }
                    None => {}
                }
            }
            4 => {
                worker.test_pass();
            }
            5 => {
                worker.test_intake();
            }
            6 => {
                let c = &mut clients[usize::from(sel) % CLIENTS];
                c.check_used();
                c.device.reset();
                c.activate();
            }
            _ => {
                let c = &mut clients[usize::from(sel) % CLIENTS];
                c.drivers[usize::from(sel >> 4) % usize::from(QUEUES)].set_used_event(input.u16());
            }
        }
        for (i, c) in clients.iter_mut().enumerate() {
            c.check_used();
            for q in 0..QUEUES {
                assert!(worker.test_heads(i, q) <= u32::from(QUEUE_SIZE));
            }
        }
    }
    // Drain: the file backend answers everything it is given.
    for _ in 0..64 {
        let progress = worker.test_pass();
        for c in &mut clients {
            c.check_used();
        }
        if progress == 0 && worker.test_pending() == 0 {
            break;
        }
    }
    for c in &mut clients {
        c.check_used();
    }
    let gave_up = clients.iter().any(|c| c.device.needs_reset());
    assert!(
        gave_up || worker.test_pending() == 0,
        "{} requests accepted and never answered",
        worker.test_pending()
    );
}

/// A request in descriptors `base..base + 3` of the queue `sel` names: header, data, status.
fn request(s: &mut Seed, sel: u8, base: u16, kind: u32, sector: u64, len: u32) {
    let hdr = 0x8000 + u64::from(base) * 16;
    let mut header = Vec::new();
    header.extend_from_slice(&kind.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&sector.to_le_bytes());
    s.u8(sel).poke(3, hdr as u32, &header);
    let reads = kind == b::VIRTIO_BLK_T_IN || kind == b::VIRTIO_BLK_T_GET_ID;
    s.u8(sel).desc(0, base, hdr, 16, F_NEXT, base + 1);
    let flags = if reads { F_WRITE } else { 0 };
    let data = DATA + u64::from(base) * 0x1000;
    s.u8(sel)
        .desc(0, base + 1, data, len, flags | F_NEXT, base + 2);
    s.u8(sel)
        .desc(0, base + 2, 0x9000 + u64::from(base), 1, F_WRITE, 0);
    s.u8(sel).publish(2, base);
}

/// Seeds: well-formed requests of every kind, several at once, a header split over two
/// descriptors, an indirect one, and a reset with a request in flight.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut one = |name: &str, kind: u32, sector: u64, len: u32| {
        let mut s = Seed::new();
        request(&mut s, 0, 0, kind, sector, len);
        s.u8(0).u8(4);
        out.push((name.to_string(), s.finish()));
    };
    one("read", b::VIRTIO_BLK_T_IN, 8, 4096);
    one("write", b::VIRTIO_BLK_T_OUT, 16, 8192);
    one("flush", b::VIRTIO_BLK_T_FLUSH, 0, 0);
    one("get_id", b::VIRTIO_BLK_T_GET_ID, 0, 20);
    // Discard: one 16-byte segment as the data.
    let mut d = Seed::new();
    let mut seg = Vec::new();
    seg.extend_from_slice(&64u64.to_le_bytes());
    seg.extend_from_slice(&8u32.to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    d.u8(0).poke(3, DATA as u32, &seg);
    request(&mut d, 0, 0, b::VIRTIO_BLK_T_DISCARD, 0, 16);
    d.u8(0).u8(4);
    out.push(("discard".into(), d.finish()));
    // Several requests on both clients and queues, one with its header split in two.
    let mut sp = Seed::new();
    request(&mut sp, 0x00, 0, b::VIRTIO_BLK_T_OUT, 0, 512);
    request(&mut sp, 0x01, 3, b::VIRTIO_BLK_T_IN, 0, 4096);
    request(&mut sp, 0x10, 3, b::VIRTIO_BLK_T_IN, 8, 512);
    sp.u8(0).desc(0, 6, 0x8000, 8, F_NEXT, 7);
    sp.u8(0).desc(0, 7, 0x8008, 8, F_NEXT, 8);
    sp.u8(0).desc(0, 8, DATA, 1024, F_WRITE | F_NEXT, 9);
    sp.u8(0).desc(0, 9, 0x9100, 1, F_WRITE, 0);
    sp.u8(0).publish(2, 6);
    sp.u8(0).u8(4);
    out.push(("several".into(), sp.finish()));
    // Indirect: the head points at a table of three descriptors.
    let mut s = Seed::new();
    let mut header = Vec::new();
    header.extend_from_slice(&b::VIRTIO_BLK_T_IN.to_le_bytes());
    header.extend_from_slice(&[0; 12]);
    s.u8(0).poke(3, 0x8000, &header);
    s.u8(0).indirect(1, 0, 0x8000, 16, F_NEXT, 1);
    s.u8(0).indirect(1, 1, DATA, 4096, F_WRITE | F_NEXT, 2);
    s.u8(0).indirect(1, 2, 0x9000, 1, F_WRITE, 0);
    s.u8(0).desc(0, 0, TABLE, 48, F_INDIRECT, 0);
    s.u8(0).publish(2, 0);
    s.u8(0).u8(4);
    out.push(("indirect".into(), s.finish()));
    // Intake, a reset while the request is taken, then a pass.
    let mut r = Seed::new();
    request(&mut r, 0, 0, b::VIRTIO_BLK_T_OUT, 8, 4096);
    r.u8(0).u8(5);
    r.u8(0).u8(6);
    r.u8(0).u8(4);
    out.push(("reset".into(), r.finish()));
    out
}
