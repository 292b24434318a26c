//! Rate limits for log lines whose frequency a guest or a driver domain controls.
//!
//! A client that resets its device in a loop, or a domain that crashes as soon as it boots,
//! must not be able to flood the operator's log (or slow the VMM down writing it). Such a line
//! goes through [`limited!`](crate::limited): a token bucket per call site (or per call site
//! and key, e.g. the domain's name, so one noisy guest cannot hide another's lines) lets a
//! burst through, then one line per interval. Lines held back are counted, and the next line
//! let through says how many: `... (N similar lines suppressed)`.
//!
//! ```
//! # let name = "nvme0"; let why = "bad queue";
//! ddvm::limited!(warn, key: name, "domain {name}: {why}");
//! ddvm::limited!(debug, "a line from anyone");
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many lines a bucket lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Lines let through at once after a quiet spell.
    pub burst: u32,
    /// Then one more line per this interval.
    pub every: Duration,
}

/// The budget of [`limited!`](crate::limited): 10 lines at once, then one a second.
pub const DEFAULT: Budget = Budget {
    burst: 10,
    every: Duration::from_secs(1),
};

/// Keys one [`KeyedLimiter`] tracks; past it the least recently used key is forgotten.
pub const MAX_KEYS: usize = 64;

/// One token bucket, counted in whole tokens and whole intervals (no floating point to
/// drift): the part of an interval that has passed counts toward the next token.
#[derive(Debug, Clone)]
struct Bucket {
    /// Tokens left.
    tokens: u32,
    /// When the last token was added (or the bucket was made).
    refilled: Instant,
    /// Lines held back since the last one let through.
    suppressed: u64,
}

impl Bucket {
    fn new(budget: Budget, now: Instant) -> Self {
        Bucket {
            tokens: budget.burst,
            refilled: now,
            suppressed: 0,
        }
    }

    /// `Some(lines suppressed before this one)` if a line may go now; `None` if it is held
    /// back (and counted).
    fn admit(&mut self, budget: Budget, now: Instant) -> Option<u64> {
        let every = budget.every.max(Duration::from_nanos(1));
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = elapsed.as_nanos() / every.as_nanos();
        if earned > 0 {
            let room = u128::from(budget.burst.saturating_sub(self.tokens));
            if earned >= room {
                self.tokens = budget.burst;
                self.refilled = now;
            } else {
                // Whole intervals only: the remainder counts toward the next token.
                self.tokens += earned as u32;
                self.refilled += every * earned as u32;
            }
        }
        if self.tokens == 0 {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A rate limiter for one call site.
#[derive(Debug)]
pub struct Limiter {
    budget: Budget,
    bucket: Mutex<Option<Bucket>>,
}

impl Limiter {
    /// A limiter with `budget` (usable in a `static`).
    pub const fn new(budget: Budget) -> Self {
        Limiter {
            budget,
            bucket: Mutex::new(None),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the `n` lines held back before it,
    /// or `None` (held back, counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`Limiter::admit`] at time `now`.
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut b = crate::sync::lock(&self.bucket);
        b.get_or_insert_with(|| Bucket::new(self.budget, now))
            .admit(self.budget, now)
    }
}

/// A rate limiter for one call site with a bucket per key (a domain's or a guest's name), so
/// that a noisy guest spends only its own budget. At most [`MAX_KEYS`] keys are tracked.
#[derive(Debug)]
pub struct KeyedLimiter {
    budget: Budget,
    buckets: Mutex<Option<HashMap<String, Bucket>>>,
}

impl KeyedLimiter {
    /// A limiter with `budget` per key (usable in a `static`).
    pub const fn new(budget: Budget) -> Self {
        KeyedLimiter {
            budget,
            buckets: Mutex::new(None),
        }
    }

    /// [`Limiter::admit`] for `key`.
    pub fn admit(&self, key: &str) -> Option<u64> {
        self.admit_at(key, Instant::now())
    }

    /// [`KeyedLimiter::admit`] at time `now`.
    pub fn admit_at(&self, key: &str, now: Instant) -> Option<u64> {
        let mut guard = crate::sync::lock(&self.buckets);
        let map = guard.get_or_insert_with(HashMap::new);
        if let Some(b) = map.get_mut(key) {
            return b.admit(self.budget, now);
        }
        if map.len() >= MAX_KEYS {
            // Forget the key refilled longest ago; its held-back count goes with it (a key
            // that keys churn past is one nobody floods).
            if let Some(old) = map
                .iter()
                .min_by_key(|(_, b)| b.refilled)
                .map(|(k, _)| k.clone())
            {
                map.remove(&old);
            }
        }
        map.entry(key.to_string())
            .or_insert_with(|| Bucket::new(self.budget, now))
            .admit(self.budget, now)
    }
}

/// Logs through `tracing` at `level` (`error`, `warn`, `info`, `debug`, `trace`), at most as
/// often as [`DEFAULT`] allows for this call site, or for this call site and `key`; the first
/// line after held-back ones ends with `(N similar lines suppressed)`.
#[macro_export]
macro_rules! limited {
    ($level:ident, key: $key:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::KeyedLimiter =
            $crate::ratelimit::KeyedLimiter::new($crate::ratelimit::DEFAULT);
        if let Some(suppressed) = LIMIT.admit(::core::convert::AsRef::<str>::as_ref(&$key)) {
            $crate::limited!(@emit $level, suppressed, $($arg)+);
        }
    }};
    (@emit $level:ident, $suppressed:ident, $($arg:tt)+) => {
        if $suppressed == 0 {
            ::tracing::$level!($($arg)+);
        } else {
            ::tracing::$level!(
                "{} ({} similar lines suppressed)",
                ::core::format_args!($($arg)+),
                $suppressed
            );
        }
    };
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::Limiter =
            $crate::ratelimit::Limiter::new($crate::ratelimit::DEFAULT);
        if let Some(suppressed) = LIMIT.admit() {
            $crate::limited!(@emit $level, suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Budget = Budget {
        burst: 3,
        every: Duration::from_secs(1),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_then_one_per_interval_and_the_held_back_are_counted() {
        let l = Limiter::new(B);
        let t = Instant::now();
        assert_eq!(l.admit_at(t), Some(0));
        assert_eq!(l.admit_at(t), Some(0));
        assert_eq!(l.admit_at(t), Some(0));
        for _ in 0..5 {
            assert_eq!(l.admit_at(t + ms(10)), None);
        }
        // Not yet a whole interval.
        assert_eq!(l.admit_at(t + ms(999)), None);
        // One token earned: the line says six were held back.
        assert_eq!(l.admit_at(t + ms(1000)), Some(6));
        assert_eq!(l.admit_at(t + ms(1001)), None);
        assert_eq!(l.admit_at(t + ms(2000)), Some(1));
        // A quiet spell refills the whole burst, no more.
        let later = t + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(l.admit_at(later), Some(0));
        }
        assert_eq!(l.admit_at(later), None);
    }

    #[test]
    fn partial_intervals_are_not_lost() {
        let l = Limiter::new(Budget {
            burst: 3,
            every: ms(100),
        });
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit_at(t), Some(0));
        }
        // Asking every 60 ms: tokens come at 100, 200, 300 ms ... whatever the asking times.
        let mut let_through = 0;
        for i in 1..=50u64 {
            if l.admit_at(t + ms(60 * i)).is_some() {
                let_through += 1;
            }
        }
        assert_eq!(let_through, 30, "3000 ms at one line per 100 ms");
    }

    #[test]
    fn a_flood_is_bounded_over_a_long_run() {
        let l = Limiter::new(B);
        let t = Instant::now();
        let mut logged = 0u64;
        let mut counted = 0u64;
        // A million lines in 100 s.
        for i in 0..1_000_000u64 {
            if let Some(n) = l.admit_at(t + Duration::from_micros(i * 100)) {
                logged += 1;
                counted += n;
            }
        }
        assert!(logged <= 3 + 100, "{logged}");
        // Every line is either logged or reported as suppressed by a later one (bar the tail
        // after the last logged line).
        assert!(
            logged + counted > 1_000_000 - 10_000,
            "{logged} + {counted}"
        );
    }

    #[test]
    fn keys_have_their_own_budget_and_their_number_is_bounded() {
        let l = KeyedLimiter::new(B);
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit_at("noisy", t), Some(0));
        }
        assert_eq!(l.admit_at("noisy", t), None);
        assert_eq!(l.admit_at("quiet", t), Some(0), "another key is unaffected");
        // Thousands of keys (a guest choosing names cannot make it grow).
        for i in 0..10_000 {
            let _ = l.admit_at(&format!("k{i}"), t + ms(i));
        }
        let n = l.buckets.lock().unwrap().as_ref().unwrap().len();
        assert!(n <= MAX_KEYS, "{n}");
    }

    /// Collects what a `tracing` subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn captured(f: impl FnOnce()) -> Vec<String> {
        let out = Captured::default();
        let w = out.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    /// One call site of each form (the limit is per call site).
    fn keyed_site(name: &str, what: &str) {
        crate::limited!(warn, key: name, "domain {name}: {what}");
    }

    fn plain_site(i: u32) {
        crate::limited!(debug, "plain line {}", i);
    }

    #[test]
    fn the_macro_logs_a_burst_per_key_then_says_what_it_held_back() {
        let lines = captured(|| {
            for i in 0..25 {
                for name in ["d0", "d1"] {
                    keyed_site(name, &format!("line {i}"));
                }
                plain_site(i);
            }
        });
        let of = |p: &str| lines.iter().filter(|l| l.contains(p)).count();
        // DEFAULT lets 10 through at once, per key and per call site.
        assert_eq!(of("domain d0:"), 10, "{lines:#?}");
        assert_eq!(of("domain d1:"), 10, "{lines:#?}");
        assert_eq!(of("plain line"), 10, "{lines:#?}");
        assert!(lines.iter().all(|l| !l.contains("suppressed")));
        // A second later one more line of a key goes, saying how many were held back.
        std::thread::sleep(Duration::from_millis(1010));
        let lines = captured(|| {
            keyed_site("d0", "again");
            keyed_site("d0", "and again");
        });
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("WARN")
                && lines[0].ends_with("domain d0: again (15 similar lines suppressed)"),
            "{lines:#?}"
        );
    }
}
