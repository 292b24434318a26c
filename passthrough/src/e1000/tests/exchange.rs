//! Two NICs joined by the in-process wire exchange frames, every byte checked; a full ring
//! drops and counts; a model without a worker is served by its poller.

use std::time::Duration;

use crate::e1000::regs::*;
use crate::e1000::rx::RX_FIFO_BYTES;
use crate::e1000::testdriver::{frame, TestNic, MAC_A, MAC_B, RCTL_DEFAULT, RING};
use crate::net::{wire_pair, Every, PairConfig, Wire, MAX_FRAME};

#[test]
fn two_nics_exchange_frames_both_ways_byte_for_byte() {
    let (mut a, mut b) = TestNic::pair(PairConfig::default());
    // Every size class, both ways, more frames than a ring holds.
    let sizes = [
        60, 61, 64, 100, 127, 128, 255, 256, 511, 512, 1023, 1024, 1514, MAX_FRAME,
    ];
    for round in 0..4u32 {
        for (k, &len) in sizes.iter().enumerate() {
            let n = round * 100 + k as u32;
            let ab = frame(MAC_B, MAC_A, n, len);
            let ba = frame(MAC_A, MAC_B, n + 50_000, len);
            a.send(&ab);
            b.send(&ba);
            assert_eq!(b.recv(), ab, "A to B, frame {n} of {len} bytes");
            assert_eq!(a.recv(), ba, "B to A, frame {n} of {len} bytes");
        }
    }
    let total = 4 * sizes.len() as u64;
    for t in [&a, &b] {
        let s = t.nic.stats();
        assert_eq!((s.frames_sent, s.frames_received), (total, total));
        assert_eq!((s.rx_missed, s.tx_dropped, s.dma_refused), (0, 0, 0));
    }
}

#[test]
fn a_burst_larger_than_the_ring_arrives_whole_when_the_driver_keeps_up() {
    let (mut a, mut b) = TestNic::pair(PairConfig::default());
    let mut want = Vec::new();
    let mut got = Vec::new();
    for n in 0..200u32 {
        let f = frame(MAC_B, MAC_A, n, 60 + (n as usize * 7) % 1400);
        a.send(&f);
        want.push(f);
        // The driver drains as it goes, so the ring never runs dry.
        if n % 8 == 7 {
            while got.len() < want.len() {
                got.push(b.recv());
            }
        }
    }
    while got.len() < want.len() {
        got.push(b.recv());
    }
    assert_eq!(got, want);
}

#[test]
fn frames_spread_over_small_buffers_and_chains_of_descriptors() {
    let (mut a, mut b) = TestNic::pair(PairConfig::default());
    // B receives into 256-byte buffers (BSIZE 11): a long frame takes six descriptors.
    b.write32(RCTL, RCTL_DEFAULT | 0b11 << RCTL_BSIZE_SHIFT);
    for (n, len) in [(1, 1514), (2, 60), (3, 257), (4, 512)] {
        let f = frame(MAC_B, MAC_A, n, len);
        // A sends it from several buffers.
        a.send_chunks(&f, 3);
        assert_eq!(b.recv(), f);
    }
}

#[test]
fn short_frames_are_padded_on_both_sides() {
    let (mut t, mut peer) = TestNic::with_peer();
    // A 20-byte frame from the wire reaches the ring as 60 bytes, zero padded.
    let short = frame(MAC_A, [2; 6], 1, 20);
    peer.send(&short).unwrap();
    let got = t.recv();
    assert_eq!(got.len(), 60);
    assert_eq!(got[..20], short[..]);
    assert!(got[20..].iter().all(|&b| b == 0));
    // With PSP, a 30-byte frame leaves padded to 60.
    t.send(&frame([2; 6], MAC_A, 2, 30));
    let mut buf = vec![0; MAX_FRAME];
    let n = peer.recv(&mut buf).unwrap().unwrap();
    assert_eq!(n, 60);
    assert_eq!(buf[..30], frame([2; 6], MAC_A, 2, 30)[..]);
}

#[test]
fn a_full_ring_holds_frames_in_the_packet_buffer_and_drops_and_counts_beyond_it() {
    let (mut t, mut peer) = TestNic::with_peer();
    // RING - 1 buffers are posted: the rest of a burst waits in the packet buffer.
    let burst = RING as u32 + 10;
    for n in 0..burst {
        peer.send(&frame(MAC_A, [2; 6], n, 200)).unwrap();
    }
    crate::e1000::testdriver::wait_until("the burst taken off the wire", || {
        t.nic.stats().rx_waiting == 11
    });
    assert_eq!(t.nic.stats().frames_received, RING - 1);
    assert_eq!((t.nic.stats().rx_missed, t.read32(stat::MPC)), (0, 0));
    // The driver takes what arrived and gives the buffers back: every frame, in order.
    for n in 0..burst {
        assert_eq!(t.recv(), frame(MAC_A, [2; 6], n, 200));
    }
    t.recv_nothing();
    assert_eq!(t.nic.stats().rx_waiting, 0);
    // A burst beyond the ring and the packet buffer: the excess is missed and counted.
    let big = 1514;
    let fit = (RING - 1) as usize + RX_FIFO_BYTES / big;
    let burst = fit as u32 + 5;
    let before = t.nic.stats().frames_received;
    for n in 0..burst {
        peer.send(&frame(MAC_A, [2; 6], 1000 + n, big)).unwrap();
    }
    crate::e1000::testdriver::wait_until("the big burst taken off the wire", || {
        let s = t.nic.stats();
        s.frames_received - before + s.rx_waiting + s.rx_missed >= u64::from(burst)
    });
    assert_eq!(t.nic.stats().rx_missed, 5);
    assert_eq!(t.read32(stat::MPC), 5);
    assert_eq!(t.read32(ICR) & ICR_RXO, ICR_RXO);
    for n in 0..fit as u32 {
        assert_eq!(t.recv(), frame(MAC_A, [2; 6], 1000 + n, big));
    }
    t.recv_nothing();
    // Transmission never waited for any of it.
    t.send(&frame([2; 6], MAC_A, 5, 64));
}

#[test]
fn a_lossy_duplicating_wire_delivers_what_it_promises() {
    let cfg = PairConfig {
        drop: Every::Nth(5),
        duplicate: Every::Nth(7),
        delay: Duration::from_millis(2),
        ..PairConfig::default()
    };
    let (mut a, mut b) = TestNic::pair(cfg);
    let mut want = Vec::new();
    for n in 1..=20u32 {
        let f = frame(MAC_B, MAC_A, n, 100);
        a.send(&f);
        if n % 5 != 0 {
            want.push(f.clone());
            if n % 7 == 0 {
                want.push(f);
            }
        }
    }
    let got: Vec<_> = (0..want.len()).map(|_| b.recv()).collect();
    assert_eq!(got, want);
    b.recv_nothing();
}

#[test]
fn without_a_worker_the_poller_receives_and_transmits() {
    let (ours, mut peer) = wire_pair(PairConfig::default()).unwrap();
    let mut t = TestNic::on(MAC_A, Box::new(ours), false);
    t.init(RCTL_DEFAULT);
    let poller = t.nic.poller();
    peer.send(&frame(MAC_A, [2; 6], 1, 100)).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(t.try_recv(), None, "nobody polled");
    assert!(crate::net::poll_readable(&[poller.fd()], 1000)[0]);
    assert_eq!(poller.poll(), 1);
    assert_eq!(t.try_recv(), Some(frame(MAC_A, [2; 6], 1, 100)));
    assert_eq!(poller.poll(), 0);
    assert!(!crate::net::poll_readable(&[poller.fd()], 0)[0]);
}

#[test]
fn over_a_stream_socket_frames_flow_and_a_closed_peer_is_given_up_with_the_link_up() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use crate::net::StreamWire;

    let (ours, mut peer) = UnixStream::pair().unwrap();
    let wire = StreamWire::new(ours, MAX_FRAME, "socketpair".into()).unwrap();
    let mut t = TestNic::on(MAC_A, Box::new(wire), true);
    t.init(RCTL_DEFAULT);
    // In: QEMU's framing, written in two pieces.
    let f = frame(MAC_A, [2; 6], 1, 700);
    let mut bytes = (f.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&f);
    peer.write_all(&bytes[..300]).unwrap();
    peer.write_all(&bytes[300..]).unwrap();
    assert_eq!(t.recv(), f);
    // Out.
    let g = frame([2; 6], MAC_A, 2, 500);
    t.send(&g);
    let mut out = vec![0u8; 504];
    peer.read_exact(&mut out).unwrap();
    assert_eq!(out[..4], 500u32.to_be_bytes());
    assert_eq!(out[4..], g[..]);
    // The peer goes: the wire closes, the link stays up, frames sent are dropped.
    drop(peer);
    crate::e1000::testdriver::wait_until("the wire closed", || t.nic.stats().wire_closed);
    assert_eq!(t.read32(STATUS) & STATUS_LU, STATUS_LU);
    t.send(&frame([2; 6], MAC_A, 3, 64));
    assert_eq!(t.nic.stats().tx_dropped, 1);
}
