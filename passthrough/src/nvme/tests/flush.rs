//! Flush runs its sync on the flusher thread: the queues are served meanwhile, a reset
//! forgets it, and the thread goes with the controller.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::Bytes;

use crate::nvme::queue::Command;
use crate::nvme::testdriver::{flush, pattern, rw, snapshot, wait_until, Cqe, TestDriver, PAGE};
use crate::nvme::worker::wait_readable as readable;
use crate::nvme::{EmulatedNvme, Status};

/// How long a held sync waits before it lets itself go (and the test fails): a test that
/// goes wrong fails instead of hanging in the controller's drop.
const HOLD_LIMIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct GateState {
    open: bool,
    /// Syncs that reached the gate.
    entered: u64,
    /// A sync waited [`HOLD_LIMIT`] and went on by itself.
    timed_out: bool,
}

/// Holds every sync of the flusher until opened (a slow disk that the test controls).
/// Dropping it opens it, so declare it after the driver: it must go first.
struct Gate(Arc<(Mutex<GateState>, Condvar)>);

impl Gate {
    fn install(nvme: &EmulatedNvme) -> Gate {
        let shared: Arc<(Mutex<GateState>, Condvar)> = Arc::default();
        let s = shared.clone();
        nvme.set_sync_hook(Some(Arc::new(move || {
            let (m, cv) = &*s;
            let mut st = m.lock().unwrap();
            st.entered += 1;
            cv.notify_all();
            let start = Instant::now();
            while !st.open {
                if start.elapsed() > HOLD_LIMIT {
                    st.timed_out = true;
                    return;
                }
                st = cv.wait_timeout(st, Duration::from_millis(50)).unwrap().0;
            }
        })));
        Gate(shared)
    }

    /// Waits until `n` syncs have reached the gate.
    fn wait_entered(&self, n: u64) {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        let start = Instant::now();
        while st.entered < n {
            assert!(
                start.elapsed() < HOLD_LIMIT,
                "{} syncs began, not {n}",
                st.entered
            );
            st = cv.wait_timeout(st, Duration::from_millis(50)).unwrap().0;
        }
    }

    fn open(&self) {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        assert!(!st.timed_out, "a sync was held too long");
        st.open = true;
        cv.notify_all();
    }

    fn entered(&self) -> u64 {
        self.0 .0.lock().unwrap().entered
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let (m, cv) = &*self.0;
        m.lock().unwrap_or_else(|p| p.into_inner()).open = true;
        cv.notify_all();
    }
}

fn flush_cmd() -> Command {
    Command {
        opcode: 0x00,
        nsid: 1,
        ..Command::default()
    }
}

/// Places a Flush in queue 1 and rings its doorbell; returns the CID.
fn ring_flush(d: &mut TestDriver) -> u16 {
    let old = d.sq_tail(1);
    let f = d.push(1, flush_cmd());
    d.ring_sq(1, old);
    f
}

/// Places a write of `data` at `slba` in queue `qid` without ringing; returns the CID.
fn push_write(d: &mut TestDriver, qid: usize, slba: u64, data: &[u8]) -> u16 {
    let buf = d.alloc((data.len() as u64).div_ceil(PAGE));
    d.mem
        .write_slice(data, vm_memory::GuestAddress(buf))
        .unwrap();
    let (prp1, prp2) = d.prps(buf, data.len());
    let nlb = data.len() as u32 / d.cfg.lba_size;
    d.push(qid, rw(0x01, slba, nlb, prp1, prp2))
}

/// Places a read of one page at `slba` in queue `qid`; returns the CID and the buffer.
fn push_read(d: &mut TestDriver, qid: usize, slba: u64) -> (u16, u64) {
    let buf = d.alloc(1);
    let nlb = PAGE as u32 / d.cfg.lba_size;
    (d.push(qid, rw(0x02, slba, nlb, buf, 0)), buf)
}

fn page_at(d: &TestDriver, buf: u64) -> Vec<u8> {
    let mut out = vec![0u8; PAGE as usize];
    d.mem
        .read_slice(&mut out, vm_memory::GuestAddress(buf))
        .unwrap();
    out
}

#[test]
fn reads_and_writes_behind_a_slow_flush_complete_before_it() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    d.create_io_queue(1, 16);
    let gate = Gate::install(&d.nvme);
    let before = pattern(4096, 41);
    assert_eq!(d.write_blocks(1, 0, &before), Status::SUCCESS);

    let old = d.sq_tail(1);
    let f = d.push(1, flush_cmd());
    let w = push_write(&mut d, 1, 64, &pattern(4096, 42));
    let (r, buf) = push_read(&mut d, 1, 0);
    d.ring_sq(1, old);
    gate.wait_entered(1);
    let done: Vec<Cqe> = vec![d.reap(1), d.reap(1)];
    let cids: HashSet<u16> = done.iter().map(|c| c.cid).collect();
    assert_eq!(
        cids,
        HashSet::from([w, r]),
        "the write and the read, not the flush"
    );
    assert!(done.iter().all(|c| c.status == Status::SUCCESS), "{done:?}");
    assert_eq!(page_at(&d, buf), before);
    assert_eq!(d.try_reap(1), None, "the flush waits for its sync");
    assert_eq!(d.nvme.stats().flushes_in_flight, 1);

    gate.open();
    let c = d.reap(1);
    assert_eq!((c.cid, c.status), (f, Status::SUCCESS));
    let s = d.nvme.stats();
    assert_eq!(
        (s.flushes_async, s.flush_syncs, s.flushes_in_flight),
        (1, 1, 0)
    );
    assert_eq!(s.completions, s.commands, "every command completed once");
}

#[test]
fn a_finished_sync_wakes_the_poller_and_its_next_pass_posts_the_flush() {
    let mut d = TestDriver::without_worker();
    let poller = d.nvme.poller();
    d.enable_interrupts();
    d.enable();
    d.create_io_queue(1, 16);
    let gate = Gate::install(&d.nvme);
    let old = d.sq_tail(1);
    let f = d.push(1, flush_cmd());
    // A trapped doorbell write: the pass on this thread takes the flush and returns.
    d.ring_sq(1, old);
    gate.wait_entered(1);
    poller.clear();
    assert!(!poller.arm(), "nothing to do while the sync runs");
    assert!(!readable(poller.eventfd(), 0));
    gate.open();
    assert!(
        readable(poller.eventfd(), 5000),
        "the flusher wrote the eventfd"
    );
    assert_eq!(d.try_reap(1), None, "only a pass posts");
    assert!(poller.arm(), "arm sees the finished sync");
    let wakes = d.wakes.count();
    assert_eq!(poller.poll(), 0, "no command taken");
    let c = d.try_reap(1).expect("the poll posted the flush");
    assert_eq!((c.cid, c.status), (f, Status::SUCCESS));
    assert!(d.wakes.count() > wakes, "the domain is told");
    poller.clear();
    assert!(!poller.arm(), "nothing left");
}

#[test]
fn a_reset_during_a_flush_never_posts_it_to_the_next_driver_and_does_not_wait_for_it() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    d.create_io_queue(1, 16);
    let gate = Gate::install(&d.nvme);
    let kept = pattern(4096, 51);
    assert_eq!(d.write_blocks(1, 0, &kept), Status::SUCCESS);
    ring_flush(&mut d);
    gate.wait_entered(1);
    let lost = pattern(4096, 52);
    assert_eq!(d.write_blocks(1, 64, &lost), Status::SUCCESS);

    // The domain dies with the sync still held: the function reset must not wait for it.
    let start = Instant::now();
    d.quiesce();
    let took = start.elapsed();
    assert_eq!(gate.entered(), 1, "the sync is still held");
    assert!(took < Duration::from_secs(1), "quiesce took {took:?}");
    let s = d.nvme.stats();
    assert_eq!((s.flushes_abandoned, s.flushes_in_flight), (1, 0));
    assert_eq!(s.dropped_cached_writes, 8, "the write after the flush");
    let old_mem = d.mem.clone();
    let old_image = snapshot(&old_mem);

    // A new driver, whose CIDs start again (the old flush's CID comes back), flushes too.
    let mut d = d.reborn();
    d.enable();
    d.create_io_queue(1, 16);
    let commands = d.nvme.stats().commands;
    let f = ring_flush(&mut d);
    gate.open();
    let c = d.reap(1);
    assert_eq!((c.cid, c.status), (f, Status::SUCCESS));
    let s = d.nvme.stats();
    // The new flush was waiting when the held sync let go: one more sync covered it.
    assert_eq!(s.flush_syncs, 1);
    assert_eq!(
        d.try_reap(1),
        None,
        "the old flush's completion was dropped"
    );
    assert_eq!(d.read_blocks(1, 0, 4096), (Status::SUCCESS, kept));
    assert_eq!(
        d.read_blocks(1, 64, 4096),
        (Status::SUCCESS, vec![0u8; 4096])
    );
    assert_eq!(d.try_reap(1), None);
    let s = d.nvme.stats();
    assert_eq!(s.commands - commands, 3);
    assert_eq!(s.flushes_in_flight, 0);
    assert!(snapshot(&old_mem) == old_image, "the old memory changed");
}

#[test]
fn disabling_the_controller_during_a_flush_drops_its_completion() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.create_io_queue(1, 16);
    let gate = Gate::install(&d.nvme);
    ring_flush(&mut d);
    gate.wait_entered(1);
    let start = Instant::now();
    d.disable();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(gate.entered(), 1, "CC.EN 1 to 0 did not wait for the sync");
    d.enable();
    d.create_io_queue(1, 16);
    let completions = d.nvme.stats().completions;
    gate.open();
    wait_until("the old sync returns", || d.nvme.stats().flush_syncs == 1);
    // A pass runs after the result came back: it must post nothing for it.
    assert_eq!(d.read_blocks(1, 0, 4096).0, Status::SUCCESS);
    assert_eq!(d.try_reap(1), None);
    assert_eq!(d.nvme.stats().completions - completions, 1);
    assert_eq!(d.nvme.stats().flushes_abandoned, 1);
}

#[test]
fn data_written_before_a_completed_flush_survives_a_reset_that_drops_the_cache() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    d.create_io_queue(1, 16);
    let gate = Gate::install(&d.nvme);
    let (a, b, after) = (pattern(4096, 61), pattern(2048, 62), pattern(4096, 63));
    assert_eq!(d.write_blocks(1, 0, &a), Status::SUCCESS);
    assert_eq!(d.write_blocks(1, 100, &b), Status::SUCCESS);
    let f = ring_flush(&mut d);
    gate.wait_entered(1);
    assert_eq!(d.write_blocks(1, 200, &after), Status::SUCCESS);
    gate.open();
    let c = d.reap(1);
    assert_eq!((c.cid, c.status), (f, Status::SUCCESS));

    d.disable();
    assert_eq!(
        d.nvme.stats().dropped_cached_writes,
        8,
        "only the write after the flush was still cached"
    );
    let file = std::fs::read(&d.path.0).unwrap();
    assert!(file[..4096] == a[..] && file[100 * 512..100 * 512 + 2048] == b[..]);
    d.enable();
    d.create_io_queue(1, 16);
    assert_eq!(d.read_blocks(1, 0, 4096), (Status::SUCCESS, a));
    assert_eq!(d.read_blocks(1, 100, 2048), (Status::SUCCESS, b));
    assert_eq!(
        d.read_blocks(1, 200, 4096),
        (Status::SUCCESS, vec![0u8; 4096])
    );
}

#[test]
fn a_flush_in_flight_holds_a_completion_slot() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    // Four entries: three completions fit in the CQ.
    d.create_io_queue(1, 4);
    let gate = Gate::install(&d.nvme);
    let before = d.nvme.stats();
    let old = d.sq_tail(1);
    let f = d.push(1, flush_cmd());
    let (r1, _) = push_read(&mut d, 1, 0);
    let (r2, _) = push_read(&mut d, 1, 8);
    d.ring_sq(1, old);
    gate.wait_entered(1);
    let old = d.sq_tail(1);
    let (r3, _) = push_read(&mut d, 1, 16);
    d.ring_sq(1, old);
    let s = d.nvme.stats();
    assert_eq!(
        (
            s.commands - before.commands,
            s.completions - before.completions
        ),
        (3, 2),
        "the third read waits: the last free slot is the flush's"
    );
    // The driver consumes one: the third read is taken and completes.
    let mut seen = vec![d.reap(1).cid];
    seen.push(d.reap(1).cid);
    seen.push(d.reap(1).cid);
    assert_eq!(d.try_reap(1), None);
    gate.open();
    seen.push(d.reap(1).cid);
    assert_eq!(seen, [r1, r2, r3, f]);
}

#[test]
fn deleting_a_queue_aborts_its_flush_in_flight() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.create_io_queue(1, 16);
    let gate = Gate::install(&d.nvme);
    let f = ring_flush(&mut d);
    gate.wait_entered(1);
    let del = d.admin(Command {
        opcode: 0x00,
        cdw: [1, 0, 0, 0, 0, 0],
        ..Command::default()
    });
    assert_eq!(del.status, Status::SUCCESS);
    let c = d.try_reap(1).expect("posted before the deletion completed");
    assert_eq!((c.cid, c.status), (f, Status::ABORTED_SQ_DELETION));
    gate.open();
    wait_until("the sync returns", || d.nvme.stats().flush_syncs == 1);
    // A pass after the result came back posts nothing for it.
    let page = d.alloc(1);
    let id = d.admin(Command {
        opcode: 0x06,
        prp1: page,
        cdw: [1, 0, 0, 0, 0, 0],
        ..Command::default()
    });
    assert_eq!(id.status, Status::SUCCESS);
    assert_eq!(d.try_reap(1), None);
    assert_eq!(d.nvme.stats().flushes_in_flight, 0);
}

#[test]
fn without_a_worker_or_poller_a_flush_completes_inside_the_doorbell_write() {
    let mut d = TestDriver::without_worker();
    d.enable();
    d.create_io_queue(1, 16);
    let gate = Gate::install(&d.nvme);
    let f = ring_flush(&mut d);
    let c = d.try_reap(1).expect("nobody would post it later");
    assert_eq!((c.cid, c.status), (f, Status::SUCCESS));
    assert_eq!(gate.entered(), 0, "the sync ran here, not on the flusher");
    assert_eq!(d.nvme.stats().flushes_async, 0);
}

#[test]
fn the_flusher_thread_ends_with_the_controller() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.create_io_queue(1, 16);
    assert_eq!(flush(&mut d), Status::SUCCESS);
    assert_eq!(d.nvme.stats().flushes_async, 1);
    let alive = d.nvme.flusher_alive();
    assert!(alive.upgrade().is_some(), "the flusher runs");
    // A poller may outlive the controller; the thread must not.
    let poller = d.nvme.poller();
    drop(d);
    assert!(
        alive.upgrade().is_none(),
        "the flusher outlived its controller"
    );
    drop(poller);
}

#[test]
fn a_flush_after_the_flusher_stopped_syncs_in_the_pass() {
    // The flusher stops only with the controller; a poller kept after that still completes
    // a flush (synchronously) instead of losing it.
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.create_io_queue(1, 16);
    let poller = d.nvme.poller();
    let alive = d.nvme.flusher_alive();
    // Stop the flusher the way the drop does, keeping the controller.
    d.nvme.stop_flusher();
    assert!(alive.upgrade().is_none());
    assert_eq!(flush(&mut d), Status::SUCCESS);
    assert_eq!(d.nvme.stats().flushes_async, 0);
    drop(poller);
}
