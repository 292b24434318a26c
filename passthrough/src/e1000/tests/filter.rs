//! The receive filter: exact addresses, broadcast, the multicast hash, promiscuous modes.

use crate::e1000::regs::*;
use crate::e1000::rx::mta_hash;
use crate::e1000::testdriver::{frame, TestNic, BROADCAST, MAC_A, RCTL_DEFAULT};
use crate::net::{PairEnd, Wire};

const OTHER: [u8; 6] = [0x52, 0x54, 0x00, 0x99, 0x99, 0x99];
const MCAST: [u8; 6] = [0x01, 0x00, 0x5E, 0x00, 0x00, 0xFB];
const MCAST2: [u8; 6] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];

/// Whether a frame to `dst` reaches the driver.
fn delivered(t: &mut TestNic, peer: &mut PairEnd, dst: [u8; 6], n: u32) -> bool {
    let before = t.nic.stats();
    let f = frame(dst, [2; 6], n, 80);
    peer.send(&f).unwrap();
    crate::e1000::testdriver::wait_until("the frame taken", || {
        let s = t.nic.stats();
        s.frames_received + s.rx_filtered > before.frames_received + before.rx_filtered
    });
    match t.try_recv() {
        Some(got) => {
            assert_eq!(got, f);
            true
        }
        None => false,
    }
}

#[test]
fn unicast_to_our_address_passes_and_to_another_does_not() {
    let (mut t, mut peer) = TestNic::with_peer();
    assert!(delivered(&mut t, &mut peer, MAC_A, 1));
    assert!(!delivered(&mut t, &mut peer, OTHER, 2));
    assert_eq!(t.nic.stats().rx_filtered, 1);
    // A second exact address, valid: it passes; its AV cleared: it does not.
    t.write32(RA + 8 * 5, u32::from_le_bytes([0x52, 0x54, 0x00, 0x99]));
    t.write32(RA + 8 * 5 + 4, 0x9999 | RAH_AV);
    assert!(delivered(&mut t, &mut peer, OTHER, 3));
    t.write32(RA + 8 * 5 + 4, 0x9999);
    assert!(!delivered(&mut t, &mut peer, OTHER, 4));
    // Address select other than the destination does not match it.
    t.write32(RA + 8 * 5 + 4, 0x9999 | RAH_AV | 1 << 16);
    assert!(!delivered(&mut t, &mut peer, OTHER, 5));
}

#[test]
fn broadcast_passes_only_with_bam() {
    let (mut t, mut peer) = TestNic::with_peer();
    assert!(delivered(&mut t, &mut peer, BROADCAST, 1));
    t.write32(RCTL, RCTL_DEFAULT & !RCTL_BAM);
    assert!(!delivered(&mut t, &mut peer, BROADCAST, 2));
}

#[test]
fn multicast_passes_by_its_hash_bit_for_every_offset() {
    let (mut t, mut peer) = TestNic::with_peer();
    assert!(!delivered(&mut t, &mut peer, MCAST, 1));
    // MO = 0: bits 47:36 of the address, as the 82540EM takes them.
    let h = mta_hash(&MCAST, 0);
    assert_eq!(h, (0xFB << 4) & 0xFFF);
    t.write32(MTA + 4 * u64::from(h >> 5), 1 << (h & 31));
    assert!(delivered(&mut t, &mut peer, MCAST, 2));
    assert!(!delivered(&mut t, &mut peer, MCAST2, 3), "another hash");
    // A unicast address whose bits hash to the same entry is not matched by the MTA.
    let mut uni = MCAST;
    uni[0] = 0x02;
    assert!(!delivered(&mut t, &mut peer, uni, 4));
    for mo in 1..4u32 {
        for i in 0..128 {
            t.write32(MTA + 4 * i, 0);
        }
        t.write32(RCTL, RCTL_DEFAULT | mo << RCTL_MO_SHIFT);
        let h = mta_hash(&MCAST2, mo as usize);
        assert!(!delivered(&mut t, &mut peer, MCAST2, 10 + mo));
        t.write32(MTA + 4 * u64::from(h >> 5), 1 << (h & 31));
        assert!(delivered(&mut t, &mut peer, MCAST2, 20 + mo), "MO {mo}");
    }
}

#[test]
fn promiscuous_modes_pass_what_they_say() {
    let (mut t, mut peer) = TestNic::with_peer();
    t.write32(RCTL, RCTL_DEFAULT | RCTL_MPE);
    assert!(delivered(&mut t, &mut peer, MCAST, 1));
    assert!(
        !delivered(&mut t, &mut peer, OTHER, 2),
        "MPE is multicast only"
    );
    t.write32(RCTL, RCTL_DEFAULT | RCTL_UPE);
    assert!(delivered(&mut t, &mut peer, OTHER, 3));
    assert!(
        !delivered(&mut t, &mut peer, MCAST, 4),
        "UPE is unicast only"
    );
    // Receive disabled: nothing now; the frame waits in the packet buffer and is filtered
    // by the filters in force when the receiver is enabled again.
    t.write32(RCTL, RCTL_DEFAULT & !RCTL_EN);
    peer.send(&frame(MAC_A, [2; 6], 5, 80)).unwrap();
    peer.send(&frame(OTHER, [2; 6], 6, 80)).unwrap();
    crate::e1000::testdriver::wait_until("held while disabled", || t.nic.stats().rx_waiting == 2);
    t.recv_nothing();
    let filtered = t.nic.stats().rx_filtered;
    t.write32(RCTL, RCTL_DEFAULT);
    assert_eq!(t.recv(), frame(MAC_A, [2; 6], 5, 80));
    t.recv_nothing();
    assert_eq!(t.nic.stats().rx_filtered, filtered + 1);
    assert_eq!(t.nic.stats().rx_disabled, 0);
}

/// The page of filter tables is memory shared with the domain's VM: what the domain writes
/// there without an exit is what the filter uses and what a trapped read returns; what is
/// written through a trapped access is in the page; a reset clears it but for RAR0.
#[test]
fn the_filter_tables_are_a_page_of_memory_the_domain_writes_without_exits() {
    let (mut t, mut peer) = TestNic::with_peer();
    let page = t.nic.table_page();
    assert_eq!((page.offset, page.size()), (TABLE_PAGE, 4096));
    let at = |off: u64| (page.host_addr() + (off - TABLE_PAGE)) as *mut u32;
    // A second exact address, written into the page as a domain's stores would land.
    let (low, high) = (
        u32::from_le_bytes([0x52, 0x54, 0x00, 0x99]),
        0x9999 | RAH_AV,
    );
    // SAFETY: `at` gives 4-aligned addresses inside the page `page` keeps mapped.
    unsafe {
        at(RA + 8 * 3).write_volatile(low);
        at(RA + 8 * 3 + 4).write_volatile(high);
    }
    assert!(delivered(&mut t, &mut peer, OTHER, 1));
    assert_eq!(t.read32(RA + 8 * 3 + 4), high);
    // A trapped write lands in the page.
    let h = mta_hash(&MCAST, 0);
    t.write32(MTA + 4 * u64::from(h >> 5), 1 << (h & 31));
    // SAFETY: as above.
    let word = unsafe { at(MTA + 4 * u64::from(h >> 5)).read_volatile() };
    assert_eq!(word, 1 << (h & 31));
    assert!(delivered(&mut t, &mut peer, MCAST, 2));
    // A reset clears the page but for the permanent address in RAR0.
    t.write32(CTRL, CTRL_RST);
    // SAFETY: as above.
    let (word, rah3, rah0) = unsafe {
        (
            at(MTA + 4 * u64::from(h >> 5)).read_volatile(),
            at(RA + 8 * 3 + 4).read_volatile(),
            at(RA + 4).read_volatile(),
        )
    };
    assert_eq!((word, rah3), (0, 0));
    assert_eq!(
        rah0,
        u32::from(u16::from_le_bytes([MAC_A[4], MAC_A[5]])) | RAH_AV
    );
}

/// A domain's own page becomes the NIC's only while it holds the NIC: what it wrote there
/// before is replaced by the NIC's values, and what it writes after it went reaches nothing.
#[test]
fn a_domains_page_of_tables_counts_only_while_it_holds_the_nic() {
    let (mut t, mut peer) = TestNic::with_peer();
    let monitor = t.nic.monitor();
    let page = crate::e1000::TablePage::new().unwrap();
    let at = |off: u64| (page.host_addr() + (off - TABLE_PAGE)) as *mut u32;
    let (low, high) = (
        u32::from_le_bytes([0x52, 0x54, 0x00, 0x99]),
        0x9999 | RAH_AV,
    );
    // Written before the domain holds the NIC (a standby): overwritten when it is handed it.
    // SAFETY: `at` gives 4-aligned addresses inside the page `page` keeps mapped.
    unsafe {
        at(RA + 8 * 3).write_volatile(low);
        at(RA + 8 * 3 + 4).write_volatile(high);
    }
    monitor.use_tables(Some(&page));
    assert!(t.nic.table_page().same(&page));
    // SAFETY: as above.
    assert_eq!(unsafe { at(RA + 8 * 3 + 4).read_volatile() }, 0);
    assert!(!delivered(&mut t, &mut peer, OTHER, 1));
    // Written while it holds the NIC: filters.
    // SAFETY: as above.
    unsafe {
        at(RA + 8 * 3).write_volatile(low);
        at(RA + 8 * 3 + 4).write_volatile(high);
    }
    assert!(delivered(&mut t, &mut peer, OTHER, 2));
    // The domain goes: the NIC keeps the values in its own page; the old page is cut off.
    monitor.use_tables(None);
    assert!(!t.nic.table_page().same(&page));
    assert_eq!(t.read32(RA + 8 * 3 + 4), high);
    // SAFETY: as above.
    unsafe { at(RA + 8 * 3 + 4).write_volatile(0) };
    assert!(delivered(&mut t, &mut peer, OTHER, 3));
}
