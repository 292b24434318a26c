//! Two endpoints joined back to back in the process, like a cable between two NICs.
//!
//! What one end sends the other receives, in order, after the [`PairConfig`]'s impairment:
//! a frame may be dropped, duplicated (the copy right behind it) or delayed (every frame by
//! the same time, so order is kept). Choices come from a PRNG seeded by the configuration,
//! one per direction, so a test sees the same losses on every run.
//!
//! Each direction is a queue of at most [`PairConfig::capacity`] frames; a frame sent to a
//! full queue, or to an end that was dropped, is lost and counted, never waited for. The
//! receiving end's [`Wire::fd`] is a timerfd armed for the moment the first queued frame is
//! due (at once when no delay is configured) and disarmed while the queue is empty, so it
//! polls readable exactly while a frame can be received.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use super::{check_buffer, check_frame, Wire, WireError, WireStats, MAX_FRAME};
use crate::sync::lock;

/// Which frames an impairment hits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Every {
    /// None.
    Never,
    /// Every `n`th frame of the direction (the `n`th, the `2n`th, ...); `Nth(0)` is `Never`.
    Nth(u64),
    /// Each frame with this probability (0.0 to 1.0), drawn from the seeded PRNG.
    Probability(f64),
}

/// How a [`wire_pair`] treats frames, the same way in both directions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairConfig {
    /// Frames lost on the way.
    pub drop: Every,
    /// Frames delivered twice (a dropped frame is not duplicated).
    pub duplicate: Every,
    /// Time between a send and the moment the far end can receive the frame.
    pub delay: Duration,
    /// Seed of the PRNG behind [`Every::Probability`].
    pub seed: u64,
    /// Frames a direction holds before it drops what is sent.
    pub capacity: usize,
    /// Largest frame, in bytes (no CRC).
    pub max_frame: usize,
}

impl Default for PairConfig {
    /// A perfect cable: nothing lost, duplicated or delayed; 1024 frames of queue.
    fn default() -> Self {
        PairConfig {
            drop: Every::Never,
            duplicate: Every::Never,
            delay: Duration::ZERO,
            seed: 0,
            capacity: 1024,
            max_frame: MAX_FRAME,
        }
    }
}

/// One direction: the frames in flight to the receiving end and its timerfd.
struct Queue {
    /// (due, frame), in order of `due`.
    frames: VecDeque<(Instant, Vec<u8>)>,
    timer: TimerFd,
    /// The receiving end is gone: frames sent are lost.
    receiver_gone: bool,
}

impl Queue {
    /// Arms the timer for the first frame (readable at once if it is due), or disarms it.
    fn rearm(&mut self) {
        let due = self.frames.front().map(|(due, _)| *due);
        let r = match due {
            // A zero duration disarms: "due now" is one nanosecond.
            Some(due) => {
                let wait = due.saturating_duration_since(Instant::now());
                self.timer.reset(wait.max(Duration::from_nanos(1)), None)
            }
            None => self.timer.clear(),
        };
        // timerfd_settime fails only for invalid arguments, which these are not.
        debug_assert!(r.is_ok(), "timerfd_settime: {r:?}");
    }
}

type Shared = Arc<Mutex<Queue>>;

/// The PRNG of one direction (SplitMix64: small, fast, good enough for test impairments).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform value in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One end of a [`wire_pair`].
pub struct PairEnd {
    /// Frames this end sends.
    out: Shared,
    /// Frames this end receives.
    inq: Shared,
    /// Its descriptor (the timer of `inq`), cached: the queue's lock is not needed to read it.
    fd: RawFd,
    cfg: PairConfig,
    rng: Rng,
    /// Frames sent so far (the count behind [`Every::Nth`]).
    seq: u64,
    stats: WireStats,
}

/// Two ends joined to each other with `cfg` applied in both directions.
pub fn wire_pair(cfg: PairConfig) -> Result<(PairEnd, PairEnd), WireError> {
    let queue = || -> Result<Shared, WireError> {
        let timer = TimerFd::new().map_err(|e| WireError::Io {
            what: "in-process wire: timerfd".into(),
            source: e.into(),
        })?;
        Ok(Arc::new(Mutex::new(Queue {
            frames: VecDeque::new(),
            timer,
            receiver_gone: false,
        })))
    };
    let (a_to_b, b_to_a) = (queue()?, queue()?);
    let end = |out: &Shared, inq: &Shared, seed: u64| PairEnd {
        out: out.clone(),
        inq: inq.clone(),
        fd: lock(inq).timer.as_raw_fd(),
        cfg,
        rng: Rng(seed),
        seq: 0,
        stats: WireStats::default(),
    };
    let a = end(&a_to_b, &b_to_a, cfg.seed);
    let b = end(&b_to_a, &a_to_b, cfg.seed ^ 0x5555_5555_5555_5555);
    Ok((a, b))
}

impl PairEnd {
    /// Whether `every` hits the frame numbered `seq` (from 1).
    fn hits(&mut self, every: Every) -> bool {
        match every {
            Every::Never | Every::Nth(0) => false,
            Every::Nth(n) => self.seq.is_multiple_of(n),
            Every::Probability(p) => self.rng.unit() < p,
        }
    }

    /// Frames waiting at this end (due or not).
    pub fn queued(&self) -> usize {
        lock(&self.inq).frames.len()
    }
}

impl Wire for PairEnd {
    fn max_frame(&self) -> usize {
        self.cfg.max_frame
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        check_frame(frame, self.cfg.max_frame)?;
        self.seq += 1;
        if self.hits(self.cfg.drop) {
            self.stats.send_dropped += 1;
            return Ok(());
        }
        let copies = if self.hits(self.cfg.duplicate) { 2 } else { 1 };
        let due = Instant::now() + self.cfg.delay;
        let mut q = lock(&self.out);
        for _ in 0..copies {
            if q.receiver_gone || q.frames.len() >= self.cfg.capacity {
                self.stats.send_dropped += 1;
            } else {
                q.frames.push_back((due, frame.to_vec()));
                self.stats.sent += 1;
            }
        }
        q.rearm();
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        check_buffer(buf, self.cfg.max_frame)?;
        let mut q = lock(&self.inq);
        let now = Instant::now();
        let frame = match q.frames.front() {
            Some((due, _)) if *due <= now => q.frames.pop_front().map(|(_, f)| f),
            _ => None,
        };
        q.rearm();
        drop(q);
        Ok(frame.map(|f| {
            buf[..f.len()].copy_from_slice(&f);
            self.stats.received += 1;
            f.len()
        }))
    }

    fn fd(&self) -> RawFd {
        self.fd
    }

    fn stats(&self) -> WireStats {
        self.stats
    }
}

impl Drop for PairEnd {
    fn drop(&mut self) {
        let mut q = lock(&self.inq);
        q.receiver_gone = true;
        q.frames.clear();
        q.rearm();
    }
}
