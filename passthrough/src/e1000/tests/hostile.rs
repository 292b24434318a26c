//! Whatever the driver programs, the NIC stays inside the domain's memory, does bounded work,
//! and goes on serving once the driver behaves.

use vm_memory::{Bytes, GuestAddress};

use crate::e1000::regs::*;
use crate::e1000::testdriver::{
    frame, wait_until, TestNic, MAC_A, MEM_SIZE, RCTL_DEFAULT, RING, RX_RING, TX_BUFS,
};
use crate::net::{Wire, MAX_FRAME};

#[test]
fn a_transmit_buffer_outside_memory_stops_the_ring_until_it_is_enabled_again() {
    let (mut t, mut peer) = TestNic::with_peer();
    t.tx_desc(0, MEM_SIZE - 10, 64, TXD_CMD_EOP | TXD_CMD_RS);
    t.write32(TDT, 1);
    let s = t.nic.stats();
    assert!(s.tx_halted && s.tx_halts == 1);
    assert_eq!(s.dma_refused, 1);
    assert_eq!(t.read32(TDH), 0, "the ring stopped on the descriptor");
    assert!(!t.tx_done(0));
    // More writes of TDT do nothing.
    t.write32(TDT, 2);
    assert_eq!(t.nic.stats().dma_refused, 1);
    // The driver fixes the descriptor and enables the ring again: it goes on.
    t.tx_desc(0, TX_BUFS, 64, TXD_CMD_EOP | TXD_CMD_RS);
    t.tx_desc(1, TX_BUFS, 64, TXD_CMD_EOP | TXD_CMD_RS);
    let f = frame([2; 6], MAC_A, 0, 64);
    t.mem.write_slice(&f, GuestAddress(TX_BUFS)).unwrap();
    t.write32(TCTL, 0);
    t.write32(TCTL, TCTL_EN);
    assert!(!t.nic.stats().tx_halted);
    assert!(t.tx_done(0) && t.tx_done(1));
    let mut buf = vec![0; MAX_FRAME];
    assert_eq!(peer.recv(&mut buf).unwrap(), Some(64));
    assert_eq!(buf[..64], f[..]);
}

#[test]
fn a_ring_outside_memory_stops_receive_and_the_frame_is_lost() {
    let (mut t, mut peer) = TestNic::with_peer();
    t.write32(RDBAL, MEM_SIZE as u32);
    t.write32(RDLEN, 0x1000);
    t.write32(RDH, 0);
    t.write32(RDT, 100);
    peer.send(&frame(MAC_A, [2; 6], 1, 64)).unwrap();
    wait_until("receive stopped", || t.nic.stats().rx_halted);
    assert_eq!(t.nic.stats().dma_refused, 1);
    peer.send(&frame(MAC_A, [2; 6], 2, 64)).unwrap();
    wait_until("missed while stopped", || t.nic.stats().rx_missed == 1);
    assert_eq!(t.nic.stats().dma_refused, 1, "a stopped ring tries no DMA");
    // A buffer address outside memory, in a ring that is inside, stops it as well.
    t.write32(RCTL, 0);
    t.rx_ring(RX_RING, RING);
    t.mem
        .write_obj(u64::MAX - 8, GuestAddress(RX_RING))
        .unwrap();
    t.write32(RCTL, RCTL_DEFAULT);
    assert!(!t.nic.stats().rx_halted, "enabling again restarts it");
    peer.send(&frame(MAC_A, [2; 6], 3, 64)).unwrap();
    wait_until("stopped again", || t.nic.stats().rx_halts == 2);
    // A sane ring: frames flow.
    t.write32(RCTL, 0);
    t.rx_ring(RX_RING, RING);
    t.write32(RCTL, RCTL_DEFAULT);
    peer.send(&frame(MAC_A, [2; 6], 4, 64)).unwrap();
    assert_eq!(t.recv(), frame(MAC_A, [2; 6], 4, 64));
}

#[test]
fn ring_lengths_are_clamped_and_indexes_beyond_the_ring_do_nothing() {
    let (mut t, mut peer) = TestNic::with_peer();
    t.write32(TDLEN, 200);
    assert_eq!(t.read32(TDLEN), 128, "a multiple of 128, rounded down");
    assert_eq!(t.nic.stats().bad_ring_values, 1);
    // 8 descriptors: TDT 9 is beyond the ring.
    t.tx_desc(0, TX_BUFS, 64, TXD_CMD_EOP | TXD_CMD_RS);
    t.mem
        .write_slice(&frame([2; 6], MAC_A, 1, 64), GuestAddress(TX_BUFS))
        .unwrap();
    t.write32(TDT, 9);
    assert_eq!(t.nic.stats().bad_ring_values, 2);
    assert_eq!(t.read32(TDH), 0);
    assert!(!t.tx_done(0));
    t.write32(TDT, 0x1_0001);
    assert_eq!(t.read32(TDT), 1, "16 bits kept");
    assert!(t.tx_done(0), "a tail inside the ring works");
    assert_eq!(peer.stats().received, 0);
    let mut buf = vec![0; MAX_FRAME];
    assert_eq!(peer.recv(&mut buf).unwrap(), Some(64));
    // A receive ring of length 0, or with RDT beyond it: frames are missed, not written.
    t.write32(RDLEN, 0);
    peer.send(&frame(MAC_A, [2; 6], 2, 64)).unwrap();
    wait_until("missed", || t.nic.stats().rx_missed == 1);
    t.write32(RDLEN, (RING * DESC_SIZE) as u32);
    t.write32(RDT, 500);
    peer.send(&frame(MAC_A, [2; 6], 3, 64)).unwrap();
    wait_until("missed", || t.nic.stats().rx_missed == 2);
    assert_eq!(t.nic.stats().dma_refused, 0);
}

#[test]
fn oversized_runt_and_extended_chains_are_dropped_and_the_ring_goes_on() {
    let (mut t, mut peer) = TestNic::with_peer();
    // A chain of four 1000-byte buffers (4000 bytes): dropped at its EOP, completed.
    for i in 0..4 {
        let cmd = TXD_CMD_RS | if i == 3 { TXD_CMD_EOP } else { 0 };
        t.tx_desc(i, TX_BUFS, 1000, cmd);
    }
    // A chain of zero-length descriptors: nothing to send.
    t.tx_desc(4, TX_BUFS, 0, TXD_CMD_RS);
    t.tx_desc(5, TX_BUFS, 0, TXD_CMD_RS | TXD_CMD_EOP);
    // A 10-byte frame: no Ethernet header.
    t.tx_desc(6, TX_BUFS, 10, TXD_CMD_RS | TXD_CMD_EOP);
    // An extended descriptor (a context descriptor) poisons its chain.
    t.tx_desc(7, TX_BUFS, 64, TXD_CMD_DEXT | TXD_CMD_RS);
    t.tx_desc(8, TX_BUFS, 64, TXD_CMD_RS | TXD_CMD_EOP);
    // Then a good frame.
    let f = frame([2; 6], MAC_A, 1, 64);
    t.mem
        .write_slice(&f, GuestAddress(TX_BUFS + 0x1000))
        .unwrap();
    t.tx_desc(9, TX_BUFS + 0x1000, 64, TXD_CMD_RS | TXD_CMD_EOP);
    t.write32(TDT, 10);
    assert!((0..10).all(|i| t.tx_done(i)), "every descriptor completed");
    let s = t.nic.stats();
    assert_eq!((s.tx_dropped, s.tx_unsupported, s.frames_sent), (4, 1, 1));
    let mut buf = vec![0; MAX_FRAME];
    assert_eq!(peer.recv(&mut buf).unwrap(), Some(64));
    assert_eq!(buf[..64], f[..]);
    assert_eq!(peer.recv(&mut buf).unwrap(), None);
}

#[test]
fn one_doorbell_takes_at_most_one_ring_of_descriptors() {
    let (mut t, _peer) = TestNic::with_peer();
    // The largest ring (65528 descriptors, 1 MiB) of zero-length descriptors without EOP.
    let len = RING_LEN_MASK;
    let size = u64::from(len) / DESC_SIZE;
    t.mem
        .write_slice(&vec![0u8; len as usize], GuestAddress(0x100000))
        .unwrap();
    t.write32(TCTL, 0);
    t.write32(TDBAL, 0x100000);
    t.write32(TDLEN, len);
    t.write32(TDH, 0);
    t.write32(TCTL, TCTL_EN);
    t.write32(TDT, (size - 1) as u32);
    assert_eq!(u64::from(t.read32(TDH)), size - 1);
    assert_eq!(t.nic.stats().frames_sent, 0);
}

#[test]
fn frames_of_bad_sizes_from_the_wire_are_counted_not_delivered() {
    use crate::net::{wire_pair, PairConfig};
    // A wire that carries more than the NIC takes.
    let (ours, mut peer) = wire_pair(PairConfig {
        max_frame: 9000,
        ..PairConfig::default()
    })
    .unwrap();
    let mut t = TestNic::on(MAC_A, Box::new(ours), true);
    t.init(RCTL_DEFAULT);
    peer.send(&frame(MAC_A, [2; 6], 1, MAX_FRAME + 1)).unwrap();
    peer.send(&frame(MAC_A, [2; 6], 2, 100)).unwrap();
    assert_eq!(t.recv(), frame(MAC_A, [2; 6], 2, 100));
    assert_eq!(t.read32(stat::ROC), 1);
}
