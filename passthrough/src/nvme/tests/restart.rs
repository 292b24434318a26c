//! A controller that outlives its domain: quiesced (reset, detached) when the domain dies,
//! attached to a new domain's memory, initialised again by a driver that knows nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::nvme::testdriver::{flush, pattern, rw, snapshot, wait_until, TestDriver};
use crate::nvme::Status;
use crate::pci::PciBackend;

#[test]
fn a_fresh_driver_serves_io_after_quiesce_and_attach_with_flushed_data_kept() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    let shadow = Arc::new(Mutex::new(Vec::new()));
    let log = shadow.clone();
    d.nvme
        .set_on_shadow_doorbells(Box::new(move |on| log.lock().unwrap().push(on)));
    d.enable_interrupts();
    d.enable();
    d.create_io_queue(1, 16);
    d.enable_shadow();
    let kept = pattern(4096, 21);
    let lost = pattern(4096, 22);
    assert_eq!(d.write_blocks(1, 8, &kept), Status::SUCCESS);
    assert_eq!(flush(&mut d), Status::SUCCESS);
    assert_eq!(d.write_blocks(1, 80, &lost), Status::SUCCESS);
    assert_eq!(d.nvme.cached_blocks(), 8);
    let before = d.nvme.stats();

    // The domain dies: quiesce before its memory goes.
    d.quiesce();
    assert!(!d.dma.attached());
    assert_eq!(d.nvme.cached_blocks(), 0, "the reset dropped the cache");
    let old_mem = d.mem.clone();
    let old_wakes = d.wakes.clone();
    let old_image = snapshot(&old_mem);
    let woken = old_wakes.count();

    // A new domain: new memory, a driver starting from scratch.
    let mut d = d.reborn();
    assert!(d.dma.attached());
    assert!(
        !d.msix.enabled() && d.msix.masked(1),
        "MSI-X back to power-on"
    );
    d.enable_interrupts();
    d.enable();
    d.create_io_queue(1, 16);
    d.enable_shadow();
    assert_eq!(d.read_blocks(1, 8, 4096), (Status::SUCCESS, kept));
    assert_eq!(
        d.read_blocks(1, 80, 4096),
        (Status::SUCCESS, vec![0u8; 4096]),
        "unflushed writes are lost with the cache"
    );
    let fresh = pattern(8192, 23);
    assert_eq!(d.write_blocks(1, 200, &fresh), Status::SUCCESS);
    assert_eq!(d.read_blocks(1, 200, 8192), (Status::SUCCESS, fresh));

    assert!(
        snapshot(&old_mem) == old_image,
        "the old domain's memory changed after quiesce"
    );
    assert_eq!(old_wakes.count(), woken, "old domain woken");
    assert!(d.wakes.count() > 0, "new domain never woken");
    let after = d.nvme.stats();
    assert_eq!(after.dropped_cached_writes, 8);
    assert!(after.commands > before.commands && after.completions > before.completions);
    assert_eq!(
        *shadow.lock().unwrap(),
        [true, false, true],
        "shadow doorbells: on, off at the reset, on again for the new driver"
    );
}

#[test]
fn a_detached_controller_neither_touches_the_old_memory_nor_wakes_the_old_domain() {
    let mut d = TestDriver::new(|_| {});
    d.enable_interrupts();
    d.enable();
    d.create_io_queue(1, 16);
    assert_eq!(d.write_blocks(1, 0, &pattern(4096, 31)), Status::SUCCESS);
    // Detached while still enabled, without a reset first: the worst case.
    d.nvme.detach();
    d.msix.detach();
    let buf = d.alloc(1);
    let old = d.sq_tail(1);
    d.push(1, rw(0x02, 0, 8, buf, 0));
    let image = snapshot(&d.mem);
    let (woken, refused) = (d.wakes.count(), d.dma.refused());
    d.ring_sq(1, old);
    wait_until("the command fetch is refused", || d.dma.refused() > refused);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.try_reap(1), None);
    assert!(snapshot(&d.mem) == image, "DMA after detach");
    assert_eq!(d.wakes.count(), woken);
    assert!(d.nvme.stats().dma_refused > refused);
}
