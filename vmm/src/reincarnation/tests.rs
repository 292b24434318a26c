//! The engine without KVM: fake domains that a test scripts (ready, dying or hanging in their
//! bring-up, crashing while they serve), a fake launcher that records what it booted, and a
//! fake device class with a volatile write cache and a write log of its own.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::blk::replay::{Op, WriteLog};
use ddvm_abi::channel::fault;
#[cfg(feature = "fault-injection")]
use ddvm_recovery::fault::FaultKind;
use ddvm_recovery::policy::PolicyConfig;
use ddvm_recovery::reason::FailureReason;

use super::*;

mod net;

/// What a fake domain does once it is let go.
#[derive(Clone, Debug)]
enum Script {
    /// Becomes ready.
    Ready,
    /// Stops during its bring-up, for this reason.
    Dies(FailureReason),
    /// Never becomes ready.
    Hangs,
}

/// What the test sees of one fake domain, shared with it.
#[derive(Default)]
struct Seen {
    stopped: Mutex<Option<FailureReason>>,
    retired: AtomicBool,
    armed: Mutex<Vec<(u32, u32)>>,
    /// A NIC domain's memory with its channel (the world's `net` domains).
    net: Option<(crate::memory::GuestMem, ddvm_abi::channel::ChannelHeader)>,
}

struct FakeDomain {
    epoch: u64,
    image: String,
    standby: bool,
    script: Script,
    seen: Arc<Seen>,
}

impl DomainHandle for FakeDomain {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn wait_ready(&self, _timeout: Duration) -> Result<(), Option<FailureReason>> {
        // A fault armed for the bring-up comes first, as in the driver domain.
        match lock(&self.seen.armed).first() {
            Some(&(fault::PANIC, _)) => {
                return Err(Some(FailureReason::Panic {
                    message: "fault during bring-up".into(),
                }))
            }
            Some(&(fault::HANG, _)) => return Err(None),
            _ => {}
        }
        match &self.script {
            Script::Ready => Ok(()),
            Script::Dies(r) => Err(Some(r.clone())),
            // The engine's wait would end at its timeout; no need to sleep it.
            Script::Hangs => Err(None),
        }
    }

    fn has_stopped(&self) -> Option<FailureReason> {
        lock(&self.seen.stopped).clone()
    }

    fn promote(&mut self) -> Result<(), String> {
        if !self.standby {
            return Err("not a standby".into());
        }
        self.standby = false;
        Ok(())
    }

    fn retire(&mut self) {
        self.seen.retired.store(true, Ordering::Release);
    }

    fn stop_vcpu(&mut self) {}

    fn is_waiting(&self) -> bool {
        true
    }

    fn heartbeat(&self) -> Option<u64> {
        Some(0)
    }

    fn cpu_time(&self) -> Option<Duration> {
        None
    }

    fn thread_id(&self) -> Option<i32> {
        None
    }

    fn arm_fault(&self, code: u32, arg: u32) -> bool {
        lock(&self.seen.armed).push((code, arg));
        true
    }

    fn request_fault(&self, code: u32, arg: u32) -> bool {
        // A panic request ends the fake at once; the others are recorded.
        if code == fault::PANIC {
            *lock(&self.seen.stopped) = Some(FailureReason::Panic {
                message: "injected".into(),
            });
        }
        lock(&self.seen.armed).push((code, arg));
        true
    }
}

/// One boot the launcher did.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Boot {
    epoch: u64,
    standby: bool,
    image: String,
    fault: Option<(u32, u32)>,
}

/// The launcher's state, shared with the test.
#[derive(Default)]
struct World {
    image: Mutex<String>,
    /// Scripts for the next boots (fresh or standby, in boot order); `Ready` when empty.
    scripts: Mutex<VecDeque<Script>>,
    /// Images whose domains die at once.
    bad_images: Mutex<Vec<String>>,
    /// Domains get a network channel with this device info.
    net: Mutex<Option<ddvm_abi::channel::net::DeviceInfo>>,
    boots: Mutex<Vec<Boot>>,
    domains: Mutex<BTreeMap<u64, Arc<Seen>>>,
}

impl World {
    fn domain(&self, epoch: u64, standby: bool, fault: Option<(u32, u32)>) -> FakeDomain {
        let image = lock(&self.image).clone();
        let script = if lock(&self.bad_images).contains(&image) {
            Script::Dies(FailureReason::Shutdown)
        } else {
            lock(&self.scripts).pop_front().unwrap_or(Script::Ready)
        };
        let seen = Arc::new(Seen {
            net: lock(&self.net).map(|info| net::channel(epoch, info)),
            ..Seen::default()
        });
        if let Some(f) = fault {
            lock(&seen.armed).push(f);
        }
        lock(&self.domains).insert(epoch, seen.clone());
        lock(&self.boots).push(Boot {
            epoch,
            standby,
            image: image.clone(),
            fault,
        });
        FakeDomain {
            epoch,
            image,
            standby,
            script,
            seen,
        }
    }

    /// The domain of `epoch` crashes.
    fn crash(&self, epoch: u64) {
        let seen = lock(&self.domains).get(&epoch).cloned().expect("booted");
        *lock(&seen.stopped) = Some(FailureReason::Halted);
    }

    fn boots(&self) -> Vec<Boot> {
        lock(&self.boots).clone()
    }
}

struct FakeLauncher(Arc<World>);

impl Launcher for FakeLauncher {
    type Domain = FakeDomain;

    fn boot(&self, epoch: u64, fault: Option<(u32, u32)>) -> Result<FakeDomain, String> {
        Ok(self.0.domain(epoch, false, fault))
    }

    fn standby_boots(&self) -> Box<dyn FnMut(u64) -> Result<FakeDomain, String> + Send> {
        let world = self.0.clone();
        Box::new(move |epoch| Ok(world.domain(epoch, true, None)))
    }

    fn set_image(&mut self, image: Image) {
        *lock(&self.0.image) = image.name().display().to_string();
    }

    fn dma_refused(&self) -> u64 {
        0
    }
}

/// A block-like device class: client writes are acknowledged into a volatile cache that the
/// loss of a domain drops, a write log keeps them until a flush, and every domain that comes
/// up is replayed the log before anything else.
#[derive(Default)]
struct FakeClass {
    /// Sector -> generation on the medium, and in the volatile cache.
    medium: BTreeMap<u64, u32>,
    cache: BTreeMap<u64, u32>,
    log: WriteLog,
    /// Generation of each acknowledged write (by its log sequence), to fill the cache on
    /// replay: the log's data is the generation, as 4 bytes.
    ready: Vec<u64>,
    lost: u32,
    replayed: Vec<Vec<(u64, u32)>>,
    gave_up: bool,
}

impl FakeClass {
    /// A client write of `sectors` from `sector`, acknowledged with generation `generation`.
    fn write(&mut self, sector: u64, sectors: u32, generation: u32) {
        for s in sector..sector + u64::from(sectors) {
            self.cache.insert(s, generation);
        }
        self.log.acknowledged(
            Op::Write,
            sector,
            sectors,
            generation.to_le_bytes().to_vec(),
        );
    }

    /// What a reader sees at `sector`.
    fn read(&self, sector: u64) -> Option<u32> {
        self.cache
            .get(&sector)
            .or_else(|| self.medium.get(&sector))
            .copied()
    }
}

impl DeviceClass<FakeDomain> for FakeClass {
    fn ready(&mut self, domain: &FakeDomain) -> Result<(), FailureReason> {
        self.ready.push(domain.epoch);
        // The replay, in log order: a later write over the same sectors lands after.
        let mut order = Vec::new();
        for w in self.log.pending() {
            let generation = u32::from_le_bytes(w.data[..4].try_into().unwrap());
            for s in w.sector..w.sector + u64::from(w.sectors) {
                self.cache.insert(s, generation);
            }
            order.push((w.sector, generation));
        }
        self.replayed.push(order);
        Ok(())
    }

    fn lost(&mut self) {
        // The device is reset: its volatile cache is gone.
        self.lost += 1;
        self.cache.clear();
    }

    fn oldest_deadline_bound(&self) -> Option<(u32, Instant)> {
        None
    }

    fn owed(&self) -> (usize, usize) {
        (0, 0)
    }

    fn replay_fault(&self) -> Option<(u32, u32)> {
        let w = self.log.pending().first()?;
        Some((fault::FAIL_WRITE, w.sector as u32))
    }

    fn gave_up(&mut self) {
        self.gave_up = true;
    }
}

fn policy(extra: impl FnOnce(&mut PolicyConfig)) -> Policy {
    let mut c = PolicyConfig {
        restart_delay_ms: 1,
        restart_delay_cap_ms: 4,
        max_restarts: 100,
        standbys: 0,
        ..PolicyConfig::default()
    };
    extra(&mut c);
    c.to_policy().unwrap()
}

fn engine(p: Policy) -> (Engine<FakeLauncher>, Arc<World>, FakeClass) {
    let world = Arc::new(World::default());
    *lock(&world.image) = "good.elf".into();
    let mut e = Engine::new("fake0", FakeLauncher(world.clone()), p).unwrap();
    let mut class = FakeClass::default();
    e.start(&mut class).unwrap();
    (e, world, class)
}

/// Runs the engine until `done` holds (and its first client completion closes a recovery),
/// at most 5 s.
fn tend_until(
    e: &mut Engine<FakeLauncher>,
    class: &mut FakeClass,
    what: &str,
    done: impl Fn(&Engine<FakeLauncher>) -> bool,
) {
    let t0 = Instant::now();
    while !done(e) {
        assert!(t0.elapsed() < Duration::from_secs(5), "never: {what}");
        e.tend(class);
        // A live domain that has not crashed serves a client request.
        if e.live().is_some_and(|l| l.domain.has_stopped().is_none()) {
            e.served(1, Instant::now(), true);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Runs the engine, serving no client, until the domain of `epoch` is live (at most 5 s).
fn tend_until_live(e: &mut Engine<FakeLauncher>, class: &mut FakeClass, epoch: u64) {
    let t0 = Instant::now();
    while live_epoch(e) != Some(epoch) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "never: epoch {epoch} live"
        );
        e.tend(class);
    }
}

fn state(e: &Engine<FakeLauncher>) -> &'static str {
    e.supervisor().state().name()
}

fn live_epoch(e: &Engine<FakeLauncher>) -> Option<u64> {
    e.live().map(|l| l.epoch)
}

#[test]
fn a_crash_is_detected_the_domain_retired_and_a_fresh_one_replays_in_order() {
    let (mut e, world, mut class) = engine(policy(|_| {}));
    assert_eq!(live_epoch(&e), Some(1));
    // Overlapping writes, acknowledged in this order, none flushed.
    class.write(0, 8, 1);
    class.write(4, 8, 2);
    class.write(2, 2, 3);
    world.crash(1);
    tend_until(&mut e, &mut class, "a fresh domain", |e| {
        live_epoch(e) == Some(2)
    });
    assert!(lock(&world.domains)[&1].retired.load(Ordering::Acquire));
    assert_eq!(class.lost, 1);
    assert_eq!(class.ready, [1, 2]);
    // Replayed in acknowledgement order, so the newest write to each sector is what is read.
    assert_eq!(class.replayed[1], [(0, 1), (4, 2), (2, 3)]);
    let expected = [1, 1, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2];
    for (s, g) in expected.iter().enumerate() {
        assert_eq!(class.read(s as u64), Some(*g), "sector {s}");
    }
    let status = e.supervisor().status(Instant::now());
    assert_eq!((status.restarts, status.duplicates), (1, 0));
    assert_eq!(e.handle().with(|o| o.recovered), 1);
}

#[test]
fn boots_that_fail_before_ready_back_off_and_the_domain_that_comes_up_replays() {
    let (mut e, world, mut class) = engine(policy(|_| {}));
    class.write(8, 8, 7);
    lock(&world.scripts).extend([
        Script::Dies(FailureReason::Panic {
            message: "bring-up".into(),
        }),
        Script::Hangs,
        Script::Dies(FailureReason::Shutdown),
    ]);
    world.crash(1);
    tend_until(&mut e, &mut class, "a domain that comes up", |e| {
        live_epoch(e) == Some(5)
    });
    // Each failed boot was a failure of its own epoch: counted, backed off, not a duplicate.
    let status = e.supervisor().status(Instant::now());
    assert_eq!(status.restarts, 4, "{status:?}");
    assert_eq!(status.duplicates, 0, "{status:?}");
    assert_eq!(status.detections.get("panic"), Some(&1));
    assert_eq!(status.detections.get("boot-timeout"), Some(&1));
    assert_eq!(status.detections.get("shutdown"), Some(&1));
    assert_eq!(state(&e), "running");
    // The replay happened on the one that came up, and only there.
    assert_eq!(class.ready, [1, 5]);
    assert_eq!(class.replayed[1], [(8, 7)]);
    assert_eq!(class.read(8), Some(7));
    // The backoff grew with each consecutive failure.
    let handle = e.handle();
    let events = handle.events.lock().unwrap();
    let json = serde_json::to_string(&events.since(0).collect::<Vec<_>>()).unwrap();
    assert!(json.contains("\"attempt\":4"), "{json}");
}

#[test]
fn a_recovery_ends_with_its_replay_when_no_client_is_served() {
    let (mut e, world, mut class) = engine(policy(|_| {}));
    class.write(0, 8, 3);
    world.crash(1);
    tend_until_live(&mut e, &mut class, 2);
    assert_eq!(state(&e), "replaying");
    // Only the replay completes; the clients are idle.
    e.served(0, Instant::now(), true);
    assert_eq!(state(&e), "running");
    assert_eq!(e.handle().with(|o| o.recovered), 1);
    assert_eq!(e.supervisor().metrics().recovery.recovery.count(), 1);
}

#[test]
fn boots_that_keep_failing_before_ready_give_up() {
    let (mut e, world, mut class) = engine(policy(|c| {
        c.max_restarts = 3;
        c.window_ms = 60_000;
    }));
    lock(&world.scripts).extend((0..10).map(|_| Script::Dies(FailureReason::Shutdown)));
    world.crash(1);
    tend_until(&mut e, &mut class, "give-up", |e| state(e) == "gave-up");
    let status = e.supervisor().status(Instant::now());
    assert_eq!(status.restarts, 3, "{status:?}");
    assert_eq!(status.duplicates, 0);
    assert!(status.broken);
    assert!(class.gave_up);
    // The crash and three failed boots: four epochs, nothing booted after the give-up.
    assert_eq!(world.boots().len(), 4);
    for _ in 0..20 {
        e.tend(&mut class);
    }
    assert_eq!(world.boots().len(), 4);
}

#[test]
fn a_failure_during_recovery_is_one_recovery_replayed_on_the_next_domain() {
    let (mut e, world, mut class) = engine(policy(|_| {}));
    class.write(0, 1, 9);
    world.crash(1);
    // The fresh domain comes up and dies before a client is served.
    tend_until_live(&mut e, &mut class, 2);
    assert_eq!(state(&e), "replaying");
    world.crash(2);
    tend_until(&mut e, &mut class, "the third domain", |e| {
        live_epoch(e) == Some(3)
    });
    assert_eq!(class.ready, [1, 2, 3]);
    assert_eq!(class.replayed[2], [(0, 9)]);
    assert_eq!(class.lost, 2);
    // Timed as one recovery, from the first detection.
    assert_eq!(e.handle().with(|o| o.recovered), 1);
    assert_eq!(e.supervisor().metrics().recovery.recovery.count(), 1);
}

#[test]
fn an_operator_update_boots_the_new_image_and_a_bad_one_gives_up_until_the_next_update() {
    let (mut e, world, mut class) = engine(policy(|c| {
        c.max_restarts = 2;
        c.window_ms = 60_000;
        c.standbys = 1;
        c.on_give_up = ddvm_recovery::policy::GiveUpAction::Hold;
    }));
    tend_until(&mut e, &mut class, "a standby", |e| {
        e.standbys().count() == 1
    });
    class.write(16, 8, 4);
    lock(&world.bad_images).push("bad.elf".into());
    e.handle()
        .send(Command::Update(Image::from_static("bad.elf", &[])));
    tend_until(&mut e, &mut class, "give-up", |e| state(e) == "gave-up");
    // The standby ran the old image: it was dropped, and every boot after ran the new one.
    let boots = world.boots();
    let after: Vec<&Boot> = boots.iter().filter(|b| b.epoch > 2).collect();
    assert!(
        after.iter().all(|b| b.image == "bad.elf" && !b.standby),
        "{boots:?}"
    );
    assert_eq!(after.len(), 3, "{boots:?}");
    assert_eq!(e.supervisor().status(Instant::now()).restarts, 2);
    // Requests are held; an update to a good image recovers and replays.
    e.handle()
        .send(Command::Update(Image::from_static("good.elf", &[])));
    tend_until(&mut e, &mut class, "running", |e| state(e) == "running");
    let live = e.live().unwrap();
    assert_eq!(live.domain.image, "good.elf");
    assert_eq!(class.replayed.last().unwrap(), &[(16, 4)]);
    assert_eq!(e.supervisor().metrics().operator_restarts, 2);
}

#[test]
#[cfg(feature = "fault-injection")]
fn a_failed_restart_fault_fails_the_promoted_standby_and_the_cold_boot_after_it() {
    let (mut e, world, mut class) = engine(policy(|c| c.standbys = 1));
    tend_until(&mut e, &mut class, "a standby", |e| {
        e.standbys().count() == 1
    });
    class.write(0, 8, 5);
    e.handle().send(Command::Inject {
        kind: FaultKind::FailedRestart,
        arg: 0,
    });
    tend_until(&mut e, &mut class, "a domain that comes up", |e| {
        e.live().is_some_and(|l| l.epoch > 3)
    });
    let boots = world.boots();
    // Epoch 2 was the standby: promoted with a panic armed. Epoch 3 booted cold and was told
    // to hang in its bring-up.
    let seen2 = lock(&world.domains)[&2].clone();
    assert_eq!(lock(&seen2.armed).as_slice(), [(fault::PANIC, 0)]);
    assert!(boots.contains(&Boot {
        epoch: 3,
        standby: false,
        image: "good.elf".into(),
        fault: Some((fault::HANG, 0)),
    }));
    let status = e.supervisor().status(Instant::now());
    assert_eq!(status.detections.get("panic"), Some(&1), "{status:?}");
    assert_eq!(
        status.detections.get("boot-timeout"),
        Some(&1),
        "{status:?}"
    );
    assert_eq!(class.replayed.last().unwrap(), &[(0, 5)]);
    assert_eq!(class.read(0), Some(5));
}

#[test]
#[cfg(feature = "fault-injection")]
fn a_failed_replay_fault_arms_the_next_domain_at_the_first_logged_write() {
    let (mut e, world, mut class) = engine(policy(|_| {}));
    class.write(24, 8, 1);
    class.write(0, 8, 2);
    e.handle().send(Command::Inject {
        kind: FaultKind::FailedReplay,
        arg: 0,
    });
    tend_until(&mut e, &mut class, "a fresh domain", |e| {
        live_epoch(e) == Some(2)
    });
    let boots = world.boots();
    assert_eq!(boots[1].fault, Some((fault::FAIL_WRITE, 24)), "{boots:?}");
}

#[test]
#[cfg(feature = "fault-injection")]
fn failed_restart_arguments_choose_how_many_boots_fail_and_how() {
    use fault::{HANG, PANIC};
    let codes = |arg| {
        failing_boots(arg)
            .into_iter()
            .map(|(c, _)| c)
            .collect::<Vec<_>>()
    };
    assert_eq!(codes(0), [PANIC, HANG], "default: one dies, one hangs");
    assert_eq!(codes(3), [PANIC, HANG, PANIC]);
    assert_eq!(codes(0x100 | 2), [HANG, HANG]);
    assert_eq!(codes(0x200 | 3), [PANIC, PANIC, PANIC]);
    assert!(failing_boots(0x200 | 200).iter().all(|&(_, arg)| arg == 0));
}
