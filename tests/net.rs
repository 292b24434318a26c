//! NIC driver domains under ddvm: two domains, each driving an emulated e1000, the NICs' wires
//! joined back to back in-process; frames posted through the VMM's net channel of one come
//! out of the other's, every byte and the order checked; receive filters; the link word
//! across a restart of the peer; a domain that breaks the protocol.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvm::devices::DeviceSpec;
use ddvm::domain::{Domain, DomainConfig, DomainDevice};
use ddvm::hypervisor::Hypervisor;
use ddvm::net::{NetChannel, NetDone};
use ddvm_abi::channel::net::{filter_flags, link, op, DeviceInfo, FilterSet};
use ddvm_abi::channel::{status, Completion};
use ddvm_passthrough::{wire_pair, E1000Config, PairConfig};
use vm_memory::{Bytes, GuestAddress};

use common::*;

const MAC_A: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x0b];
/// An extra address B's filter set accepts.
const MAC_C: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x0c];
/// An address nobody accepts.
const MAC_X: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x99];
/// EtherType for local experiments (IEEE 802).
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// Receive buffers each side keeps posted.
const RX_POSTED: usize = 32;
/// Transmits in flight at most.
const TX_WINDOW: usize = 16;
const DEADLINE: Duration = Duration::from_secs(20);

/// Two NICs on a perfect cable, each to outlive its domains.
fn nic_pair() -> (Arc<DomainDevice>, Arc<DomainDevice>) {
    let (wa, wb) = wire_pair(PairConfig::default()).expect("wire pair");
    let a = DomainDevice::emulated_e1000(
        "net-a",
        E1000Config {
            mac: MAC_A,
            wire: Box::new(wa),
        },
    )
    .expect("NIC a");
    let b = DomainDevice::emulated_e1000(
        "net-b",
        E1000Config {
            mac: MAC_B,
            wire: Box::new(wb),
        },
    )
    .expect("NIC b");
    (a, b)
}

/// A NIC domain and the VMM's side of its channel.
struct Port {
    d: Domain,
    ch: NetChannel,
    info: DeviceInfo,
    /// Receive buffers posted and not completed.
    rx_posted: usize,
}

impl Port {
    fn boot(hv: &Hypervisor, name: &str, dev: &Arc<DomainDevice>, epoch: u64) -> Port {
        Self::boot_with(hv, name, dev, epoch, "")
    }

    fn boot_with(
        hv: &Hypervisor,
        name: &str,
        dev: &Arc<DomainDevice>,
        epoch: u64,
        cmdline: &str,
    ) -> Port {
        let cfg = DomainConfig {
            memory: 32 << 20,
            channel_size: 1 << 20,
            device: Some(DeviceSpec::Persistent(dev.clone())),
            ..dd_config(name, cmdline)
        };
        let d = Domain::boot(hv, &cfg, epoch).expect("boot");
        d.wait_ready(Duration::from_secs(10))
            .unwrap_or_else(|s| panic!("{name} not ready: {s:?}\n{}", d.console().text()));
        let mut ch = NetChannel::new(d.channel().unwrap(), d.channel_header().unwrap());
        let info = ch
            .device_info(d.memory())
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.console().text()));
        Port {
            d,
            ch,
            info,
            rx_posted: 0,
        }
    }

    fn publish(&self) {
        if self.ch.publish(self.d.memory()) {
            self.d.kick();
        }
    }

    /// Posts receive buffers up to [`RX_POSTED`].
    fn fill_rx(&mut self) {
        let mut posted = false;
        while self.rx_posted < RX_POSTED {
            self.ch
                .receive(self.d.memory())
                .expect("post a receive buffer");
            self.rx_posted += 1;
            posted = true;
        }
        if posted {
            self.publish();
        }
    }

    /// Waits until the domain took every request posted (so its buffers are on the NIC).
    fn settle(&self) {
        let h = self.d.channel_header().unwrap();
        let base = self.d.channel().unwrap();
        let producer = |off: u64| -> u32 {
            self.d
                .memory()
                .read_obj(GuestAddress(base + u64::from(h.req_ring) + off))
                .unwrap()
        };
        let t0 = Instant::now();
        while producer(64) != producer(0) {
            assert!(t0.elapsed() < DEADLINE, "requests not taken");
            std::thread::sleep(Duration::from_micros(200));
        }
        // The domain rings the NIC in the same pass it took them.
        std::thread::sleep(Duration::from_millis(5));
    }

    /// Completions accepted so far (the channel must hold).
    fn poll(&mut self) -> Vec<NetDone> {
        let mut out = Vec::new();
        self.ch
            .poll(self.d.memory(), &mut out)
            .unwrap_or_else(|e| panic!("protocol: {e}\n{}", self.d.console().text()));
        out
    }

    /// Runs a request to completion (the only one in flight).
    fn run(&mut self, tag: u32) -> NetDone {
        self.publish();
        let t0 = Instant::now();
        loop {
            let done = self.poll();
            if let Some(d) = done.iter().find(|d| d.request.tag == tag) {
                for x in &done {
                    self.ch.finish(x);
                }
                return *d;
            }
            assert!(done.is_empty(), "unexpected completions: {done:?}");
            assert!(t0.elapsed() < DEADLINE, "tag {tag} not completed");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn configure(&mut self, set: &FilterSet) {
        let tag = self.ch.config(self.d.memory(), set).expect("config");
        let done = self.run(tag);
        assert_eq!(done.status, status::OK, "CONFIG: {done:?}");
    }

    fn link_up(&self) -> bool {
        self.ch.link_up(self.d.memory())
    }
}

/// Length of frame `seq`: 60 to 1514 bytes, varied.
fn frame_len(seq: u32) -> usize {
    60 + (seq as usize * 337 + seq as usize / 7) % (1514 - 60 + 1)
}

/// Frame `seq` from `src` to `dst`: header, the sequence number, a pseudo-random payload
/// seeded by the sequence number and the stream `stream`.
fn frame(dst: [u8; 6], src: [u8; 6], stream: u32, seq: u32) -> Vec<u8> {
    let len = frame_len(seq);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = u64::from(stream) << 32 | u64::from(seq) | 1;
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.push(x as u8);
    }
    f
}

/// Sends `n` frames `first..first+n` of stream `stream` from `tx` to `rx`'s MAC, paced by
/// `rx`'s posted buffers so none may be lost; checks every frame `rx` receives, byte for
/// byte, in order, and that every transmit completed OK with its length.
fn stream(tx: &mut Port, rx: &mut Port, stream: u32, first: u32, n: u32) {
    let (src, dst) = (tx.info.mac, rx.info.mac);
    rx.fill_rx();
    rx.settle();
    let (mut sent, mut received, mut tx_done) = (0u32, 0u32, 0u32);
    let mut buf = vec![0u8; rx.ch.slot_size() as usize];
    let t0 = Instant::now();
    while received < n || tx_done < n {
        assert!(
            t0.elapsed() < DEADLINE,
            "stream {stream}: sent {sent} transmitted {tx_done} received {received} of {n}\n\
             tx console:\n{}\nrx console:\n{}\ntx NIC {:?}\nrx NIC {:?}",
            tx.d.console().text(),
            rx.d.console().text(),
            tx.d.e1000_stats(),
            rx.d.e1000_stats()
        );
        // Frames on the way never outnumber the buffers the receiver has, less a margin for
        // buffers reposted but not yet on its NIC.
        let mut posted = false;
        while sent < n
            && (sent - tx_done) < TX_WINDOW as u32
            && (sent - received) < (RX_POSTED - TX_WINDOW) as u32
        {
            let f = frame(dst, src, stream, first + sent);
            tx.ch.transmit(tx.d.memory(), &f).expect("transmit");
            sent += 1;
            posted = true;
        }
        if posted {
            tx.publish();
        }
        for d in tx.poll() {
            assert_eq!(d.request.op, op::TRANSMIT, "{d:?}");
            assert_eq!(d.status, status::OK, "transmit: {d:?}");
            assert_eq!(d.len, d.request.len);
            tx.ch.finish(&d);
            tx_done += 1;
        }
        let mut got = false;
        for d in rx.poll() {
            assert_eq!(d.request.op, op::RECEIVE, "{d:?}");
            assert_eq!(d.status, status::OK, "receive: {d:?}");
            let len = rx.ch.read_frame(rx.d.memory(), &d, &mut buf);
            rx.ch.finish(&d);
            rx.rx_posted -= 1;
            let seq = first + received;
            let want = frame(dst, src, stream, seq);
            let got_seq = u32::from_be_bytes(buf[14..18].try_into().unwrap());
            assert_eq!(got_seq, seq, "stream {stream}: frame out of order");
            assert_eq!(len, want.len(), "stream {stream}: frame {seq}'s length");
            assert!(
                buf[..len] == want[..],
                "stream {stream}: frame {seq}'s bytes"
            );
            received += 1;
            got = true;
        }
        if got {
            rx.fill_rx();
        }
        if !posted && !got {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// What `rx` receives within `wait`: the destination MAC and sequence number of each frame.
fn drain(rx: &mut Port, wait: Duration) -> Vec<([u8; 6], u32)> {
    let mut buf = vec![0u8; rx.ch.slot_size() as usize];
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < wait {
        for d in rx.poll() {
            assert_eq!(d.status, status::OK, "receive: {d:?}");
            rx.ch.read_frame(rx.d.memory(), &d, &mut buf);
            rx.ch.finish(&d);
            rx.rx_posted -= 1;
            let dst: [u8; 6] = buf[..6].try_into().unwrap();
            seen.push((dst, u32::from_be_bytes(buf[14..18].try_into().unwrap())));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    rx.fill_rx();
    seen
}

fn send_one(tx: &mut Port, f: &[u8]) {
    let tag = tx.ch.transmit(tx.d.memory(), f).expect("transmit");
    let done = tx.run(tag);
    assert_eq!(done.status, status::OK);
}

#[test]
fn frames_cross_between_two_nic_domains_every_byte_in_order() {
    let hv = kvm();
    let (na, nb) = nic_pair();
    let mut a = Port::boot(&hv, "net-a", &na, 1);
    let mut b = Port::boot(&hv, "net-b", &nb, 1);
    for (p, mac) in [(&a, MAC_A), (&b, MAC_B)] {
        assert_eq!(p.info.mac, mac, "device info MAC");
        assert_eq!(p.info.link, link::UP);
        assert!(p.link_up(), "link word");
        assert!(p.info.rx_buffer >= p.info.max_frame);
        assert!(p.info.max_frame >= 1514);
    }
    stream(&mut a, &mut b, 1, 0, 300);
    stream(&mut b, &mut a, 2, 0, 300);
    // Nothing was dropped for want of buffers.
    for (p, n) in [(&a, &na), (&b, &nb)] {
        let s = n.e1000_stats().unwrap();
        assert_eq!(s.rx_missed, 0, "{s:?}");
        assert_eq!(s.dma_refused, 0, "{s:?}");
        assert_eq!(
            p.ch.counters
                .violations
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}

#[test]
fn the_filter_set_decides_what_is_received() {
    let hv = kvm();
    let (na, nb) = nic_pair();
    let mut a = Port::boot(&hv, "filter-a", &na, 1);
    let mut b = Port::boot(&hv, "filter-b", &nb, 1);
    let mut set = FilterSet {
        flags: filter_flags::BROADCAST,
        ..FilterSet::default()
    };
    set.unicast.push(MAC_C);
    b.configure(&set);
    b.fill_rx();
    b.settle();
    send_one(&mut a, &frame(MAC_X, MAC_A, 3, 1));
    send_one(&mut a, &frame(MAC_C, MAC_A, 3, 2));
    send_one(&mut a, &frame(MAC_B, MAC_A, 3, 3));
    send_one(&mut a, &frame([0xff; 6], MAC_A, 3, 4));
    let seen = drain(&mut b, Duration::from_millis(300));
    assert_eq!(
        seen,
        vec![(MAC_C, 2), (MAC_B, 3), ([0xff; 6], 4)],
        "B must receive what its filters accept and nothing else\n{}",
        b.d.console().text()
    );
    assert!(nb.e1000_stats().unwrap().rx_filtered >= 1);

    // Without broadcast in the set, a broadcast frame stays out too.
    b.configure(&FilterSet::default());
    send_one(&mut a, &frame([0xff; 6], MAC_A, 3, 5));
    send_one(&mut a, &frame(MAC_B, MAC_A, 3, 6));
    let seen = drain(&mut b, Duration::from_millis(300));
    assert_eq!(seen, vec![(MAC_B, 6)]);

    // A malformed filter set is refused and changes nothing.
    let tag = {
        // Flags this version does not know (`encode` writes them; the domain's decode refuses
        // them).
        let bad = FilterSet {
            flags: 0x8000_0000,
            ..FilterSet::default()
        };
        b.ch.config(b.d.memory(), &bad).unwrap()
    };
    let done = b.run(tag);
    assert_eq!(done.status, status::BAD_REQUEST);
}

#[test]
fn a_restarted_domain_keeps_the_peers_link_up_and_traffic_resumes() {
    let hv = kvm();
    let (na, nb) = nic_pair();
    let mut a = Port::boot(&hv, "restart-a", &na, 1);
    let mut b = Port::boot(&hv, "restart-b", &nb, 1);
    stream(&mut a, &mut b, 4, 0, 100);

    // Kill A: its vCPU stops, its NIC is quiesced (reset, detached); B's link must never
    // read down meanwhile, nor while a fresh A brings the NIC up again.
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let b_mem = b.d.memory().clone();
    let b_link = b.d.channel().unwrap() + ddvm_abi::channel::net::offset::LINK;
    let watcher = {
        let watching = watching.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while watching.load(std::sync::atomic::Ordering::Acquire) {
                let word: u32 = b_mem.read_obj(GuestAddress(b_link)).unwrap();
                assert_eq!(word, link::UP, "B's link word changed during A's restart");
                reads += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            reads
        })
    };
    drop(a);
    let mut a = Port::boot(&hv, "restart-a", &na, 2);
    assert!(a.link_up());
    a.configure(&FilterSet {
        flags: filter_flags::BROADCAST,
        ..FilterSet::default()
    });
    // B's link is read every 100 ms: give it time to see anything there is to see.
    std::thread::sleep(Duration::from_millis(250));
    watching.store(false, std::sync::atomic::Ordering::Release);
    let reads = watcher.join().expect("B's link word stayed up");
    assert!(reads > 10, "the watcher read B's link word {reads} times");
    assert!(b.link_up());

    stream(&mut a, &mut b, 5, 0, 100);
    stream(&mut b, &mut a, 6, 0, 100);
}

#[test]
fn an_orderly_stop_returns_every_buffer_then_completes() {
    let hv = kvm();
    let (na, _nb) = nic_pair();
    let mut a = Port::boot(&hv, "stop-a", &na, 1);
    a.fill_rx();
    a.settle();
    let tag = a.ch.shutdown(a.d.memory()).unwrap();
    a.publish();
    let t0 = Instant::now();
    let mut done = Vec::new();
    while !done.iter().any(|d: &NetDone| d.request.tag == tag) {
        assert!(t0.elapsed() < DEADLINE, "stop not completed");
        done.extend(a.poll());
        std::thread::sleep(Duration::from_micros(200));
    }
    let (stop, buffers): (Vec<&NetDone>, Vec<&NetDone>) =
        done.iter().partition(|d| d.request.tag == tag);
    assert_eq!(stop[0].status, status::OK);
    assert_eq!(
        buffers.len(),
        RX_POSTED,
        "every posted buffer completes before the stop"
    );
    assert!(buffers
        .iter()
        .all(|d| d.status == status::IO_ERROR && d.len == 0));
    assert_eq!(a.ch.in_flight(), 0);
}

/// Writes a completion into `p`'s completion ring as a hostile domain would and publishes it.
fn forge_completion(p: &Port, c: Completion) {
    let h = p.d.channel_header().unwrap();
    let base = p.d.channel().unwrap() + u64::from(h.cpl_ring);
    let mem = p.d.memory();
    let producer: u32 = mem.read_obj(GuestAddress(base)).unwrap();
    let slot = u64::from(producer % h.cpl_entries);
    let entry = GuestAddress(base + 128 + slot * 16);
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&c.tag.to_le_bytes());
    b[4..6].copy_from_slice(&c.status.to_le_bytes());
    b[6..8].copy_from_slice(&c.detail.to_le_bytes());
    b[8..12].copy_from_slice(&c.len.to_le_bytes());
    b[12..16].copy_from_slice(&c.epoch.to_le_bytes());
    mem.write_slice(&b, entry).unwrap();
    mem.write_obj(producer.wrapping_add(1), GuestAddress(base))
        .unwrap();
}

#[test]
fn a_domain_that_lies_in_a_completion_breaks_the_channel_without_a_panic() {
    let hv = kvm();
    let (na, nb) = nic_pair();
    // A bogus tag.
    let mut a = Port::boot(&hv, "hostile-a", &na, 1);
    forge_completion(
        &a,
        Completion {
            tag: 0xdead,
            status: status::OK,
            detail: 0,
            len: 0,
            epoch: 1,
        },
    );
    let e = a.ch.poll(a.d.memory(), &mut Vec::new()).unwrap_err();
    assert_eq!(e.to_string(), "completion for unknown tag 57005");
    assert!(a.ch.transmit(a.d.memory(), &[0u8; 60]).is_err());
    drop(a);

    // A receive that claims more than its buffer, for a tag that is in flight: the
    // domain is idle (its NIC's wire is quiet), so the test can speak for it.
    let mut b = Port::boot(&hv, "hostile-b", &nb, 1);
    let tag = b.ch.receive(b.d.memory()).unwrap();
    b.publish();
    b.settle();
    forge_completion(
        &b,
        Completion {
            tag,
            status: status::OK,
            detail: 0,
            len: b.ch.slot_size() + 1,
            epoch: 1,
        },
    );
    let e = b.ch.poll(b.d.memory(), &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("reports"), "{e}");
    assert_eq!(b.ch.broken(), Some(e));
}

/// The domain's own fault injection: a bogus length on a transmit.
#[cfg(feature = "fault-injection")]
#[test]
fn an_injected_bogus_length_breaks_the_channel() {
    let hv = kvm();
    let (na, _nb) = nic_pair();
    let mut a = Port::boot(&hv, "bogus-len-a", &na, 1);
    assert!(a
        .d
        .request_fault_with(ddvm_abi::channel::fault::BOGUS_LEN, 4));
    // Let the domain take the fault word before the request.
    std::thread::sleep(Duration::from_millis(50));
    let f = frame(MAC_B, MAC_A, 7, 0);
    a.ch.transmit(a.d.memory(), &f).unwrap();
    a.publish();
    let t0 = Instant::now();
    let e = loop {
        match a.ch.poll(a.d.memory(), &mut Vec::new()) {
            Err(e) => break e,
            Ok(_) => assert!(t0.elapsed() < DEADLINE, "no violation"),
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    assert!(
        matches!(
            e,
            ddvm::host_channel::DomainProtocolError::LengthOverRequest { .. }
        ),
        "{e:?}"
    );
}

/// A network channel handed an NVMe controller fails before ready, naming both classes.
#[test]
fn a_net_channel_with_a_block_device_fails_cleanly() {
    let hv = kvm();
    let (na, _nb) = nic_pair();
    // The NIC, announced to the domain as an NVMe controller: the channel is NET (the
    // device's class), the driver picked is NVMe's.
    let cfg = DomainConfig {
        memory: 32 << 20,
        channel_size: 1 << 20,
        device: Some(DeviceSpec::Persistent(na)),
        ..dd_config("mismatch", "nvme=00:01.0 nvme_bar0=0xe0000000/0x20000")
    };
    let d = Domain::boot(&hv, &cfg, 1).expect("boot");
    let state = d.wait_ready(Duration::from_secs(10));
    assert!(state.is_err(), "a mismatched domain became ready");
    let t0 = Instant::now();
    while !d.console().text().contains("is for the nvme driver") {
        assert!(
            t0.elapsed() < DEADLINE,
            "no message naming both classes:\n{}",
            d.console().text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = d.console().text();
    assert!(
        text.contains("class 2 (net)") && text.contains("class 1 (blk)"),
        "{text}"
    );
}
