//! Guest consoles: the bytes a guest prints, from its log ring or its serial port.
//!
//! A guest console is untrusted text. It is kept in a bounded buffer (the newest bytes win),
//! split into lines, optionally echoed with the guest's name as a prefix, with control
//! characters replaced so a guest cannot drive the operator's terminal. The echo is
//! rate-limited ([`ECHO_BUDGET`]): a guest printing in a loop cannot flood the operator's
//! stderr (nor hold the VMM's threads writing to it); what it holds back it counts and says.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ddvm_abi::log::{
    plan_drain, ring_pieces, LogHeader, LOG_HEADER_SIZE, LOG_HEAD_OFFSET, LOG_MAGIC,
};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;
use crate::ratelimit::{Budget, Limiter};

/// Bytes of console output kept per guest.
pub const CONSOLE_KEEP: usize = 256 << 10;
/// Longest line echoed; longer lines are cut.
const LINE_MAX: usize = 512;
/// Lines a console echoes: a boot's worth at once, then 100 a second.
pub const ECHO_BUDGET: Budget = Budget {
    burst: 500,
    every: Duration::from_millis(10),
};

/// Where echoed lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// Keep the output only.
    Off,
    /// Also write each line to stderr, prefixed with the guest's name.
    Stderr,
}

struct State {
    kept: VecDeque<u8>,
    line: Vec<u8>,
    total: u64,
    lost: u64,
}

/// A guest's console.
pub struct Console {
    name: String,
    echo: Echo,
    echo_limit: Limiter,
    state: Mutex<State>,
}

impl Console {
    /// A console for the guest called `name`.
    pub fn new(name: &str, echo: Echo) -> Self {
        Console {
            name: name.to_string(),
            echo,
            echo_limit: Limiter::new(ECHO_BUDGET),
            state: Mutex::new(State {
                kept: VecDeque::new(),
                line: Vec::new(),
                total: 0,
                lost: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// Appends guest output.
    pub fn push(&self, bytes: &[u8]) {
        let mut s = self.lock();
        s.total += bytes.len() as u64;
        for &b in bytes {
            // A serial console ends lines with CR LF: the CR carries nothing.
            if b == b'\r' {
                continue;
            }
            if s.kept.len() == CONSOLE_KEEP {
                s.kept.pop_front();
            }
            let b = sanitize(b);
            s.kept.push_back(b);
            if b == b'\n' {
                let line = std::mem::take(&mut s.line);
                self.emit(&line);
            } else if s.line.len() < LINE_MAX {
                s.line.push(b);
            }
        }
    }

    /// Notes bytes the guest wrote that were overwritten before the VMM could read them.
    pub fn note_lost(&self, n: u64) {
        let mut s = self.lock();
        // The guest chooses n (its head may jump by almost 2^64, more than once).
        s.lost = s.lost.saturating_add(n);
        drop(s);
        self.emit(format!("[{n} console bytes lost]").as_bytes());
    }

    /// Notes a log ring head that moved backwards (the guest wrote garbage into the header).
    pub fn note_garbage(&self, read: u64, head: u64) {
        self.emit(format!("[console head moved backwards from {read} to {head}]").as_bytes());
    }

    fn emit(&self, line: &[u8]) {
        if self.echo == Echo::Stderr {
            let text = self.echo_text(line, Instant::now());
            if !text.is_empty() {
                let _ = std::io::stderr().lock().write_all(text.as_bytes());
            }
        }
    }

    /// What echoing `line` at `now` writes: the line, after a note of the lines held back
    /// before it; nothing if it is held back itself.
    fn echo_text(&self, line: &[u8], now: Instant) -> String {
        let Some(held) = self.echo_limit.admit_at(now) else {
            return String::new();
        };
        let mut text = String::new();
        if held > 0 {
            text = format!(
                "[{}] [{held} lines not echoed: more than {} a second]\n",
                self.name,
                1_000_000_000 / ECHO_BUDGET.every.as_nanos().max(1)
            );
        }
        text + &format!("[{}] {}\n", self.name, String::from_utf8_lossy(line))
    }

    /// Everything kept, as text.
    pub fn text(&self) -> String {
        let s = self.lock();
        let (a, b) = s.kept.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Bytes received and bytes lost so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.total, s.lost)
    }
}

/// Tabs and newlines pass; other control characters and DEL become '?' (carriage returns are
/// dropped before this).
fn sanitize(b: u8) -> u8 {
    match b {
        b'\n' | b'\t' => b,
        0..=0x1f | 0x7f => b'?',
        _ => b,
    }
}

/// The VMM's side of a guest's log ring. The VMM wrote the header and keeps its own copy of
/// the geometry; the only value it reads back is the guest's `head`.
pub struct LogReader {
    base: u64,
    data_size: u64,
    read: u64,
}

impl LogReader {
    /// Writes a fresh ring header at `base` covering `size` bytes and returns its reader.
    pub fn create(
        mem: &GuestMem,
        base: u64,
        size: u64,
    ) -> Result<Self, vm_memory::GuestMemoryError> {
        let data_size = size - LOG_HEADER_SIZE;
        let header = LogHeader {
            magic: LOG_MAGIC,
            data_size: data_size as u32,
            ..Default::default()
        };
        mem.write_obj(header, GuestAddress(base))?;
        Ok(LogReader {
            base,
            data_size,
            read: 0,
        })
    }

    /// Moves what the guest wrote since the last drain into `console`.
    pub fn drain(&mut self, mem: &GuestMem, console: &Console) {
        let Ok(head) = mem.read_obj::<u64>(GuestAddress(self.base + LOG_HEAD_OFFSET)) else {
            return;
        };
        if head == self.read {
            return;
        }
        let Some(plan) = plan_drain(self.read, head, self.data_size) else {
            // The guest moved its head backwards: garbage. Say so and resynchronise on it.
            console.note_garbage(self.read, head);
            self.read = head;
            return;
        };
        if plan.lost > 0 {
            console.note_lost(plan.lost);
        }
        let mut buf = vec![0u8; plan.len as usize];
        let mut at = 0usize;
        for (offset, len) in ring_pieces(plan.from, plan.len, self.data_size) {
            let dst = &mut buf[at..at + len as usize];
            let src = GuestAddress(self.base + LOG_HEADER_SIZE + offset);
            if mem.read_slice(dst, src).is_err() {
                return;
            }
            at += len as usize;
        }
        console.push(&buf);
        self.read = head;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_write(mem: &GuestMem, base: u64, size: u64, head: &mut u64, bytes: &[u8]) {
        for &b in bytes {
            let at = base + LOG_HEADER_SIZE + *head % size;
            mem.write_obj(b, GuestAddress(at)).unwrap();
            *head += 1;
        }
        mem.write_obj(*head, GuestAddress(base + LOG_HEAD_OFFSET))
            .unwrap();
    }

    #[test]
    fn drains_lines_across_the_wrap() {
        let mem = crate::memory::create(2 << 20, 1 << 30).unwrap();
        let console = Console::new("t", Echo::Off);
        let mut r = LogReader::create(&mem, 0x1_0000, LOG_HEADER_SIZE + 16).unwrap();
        let mut head = 0;
        guest_write(&mem, 0x1_0000, 16, &mut head, b"hello\n");
        r.drain(&mem, &console);
        guest_write(&mem, 0x1_0000, 16, &mut head, b"wrapping!!\n");
        r.drain(&mem, &console);
        assert_eq!(console.text(), "hello\nwrapping!!\n");
        assert_eq!(console.counts(), (17, 0));
    }

    #[test]
    fn lapped_output_is_counted_as_lost_and_a_backwards_head_is_survived() {
        let mem = crate::memory::create(2 << 20, 1 << 30).unwrap();
        let console = Console::new("t", Echo::Off);
        let mut r = LogReader::create(&mem, 0x1_0000, LOG_HEADER_SIZE + 16).unwrap();
        let mut head = 0;
        guest_write(&mem, 0x1_0000, 16, &mut head, b"0123456789abcdefXYZ\n");
        r.drain(&mem, &console);
        assert_eq!(console.counts().1, 4);
        assert!(console.text().ends_with("456789abcdefXYZ\n"));
        mem.write_obj(3u64, GuestAddress(0x1_0000 + LOG_HEAD_OFFSET))
            .unwrap();
        r.drain(&mem, &console);
        mem.write_obj(u64::MAX, GuestAddress(0x1_0000 + LOG_HEAD_OFFSET))
            .unwrap();
        r.drain(&mem, &console);
        assert!(console.text().len() <= CONSOLE_KEEP);
    }

    /// Found by the `log_panic` fuzz target: a head that jumps by nearly 2^64, goes back (the
    /// reader resynchronises) and jumps again overflowed the count of lost bytes (a panic
    /// where overflow is checked, a wrong count elsewhere).
    #[test]
    fn a_head_jumping_twice_by_nearly_2_64_saturates_the_lost_count() {
        let mem = crate::memory::create(2 << 20, 1 << 30).unwrap();
        let console = Console::new("t", Echo::Off);
        let mut r = LogReader::create(&mem, 0x1_0000, LOG_HEADER_SIZE + 16).unwrap();
        for head in [u64::MAX, 0, u64::MAX] {
            mem.write_obj(head, GuestAddress(0x1_0000 + LOG_HEAD_OFFSET))
                .unwrap();
            r.drain(&mem, &console);
        }
        assert_eq!(console.counts(), (32, u64::MAX));
    }

    #[test]
    fn a_flood_is_echoed_in_part_and_counted_but_kept_whole() {
        let console = Console::new("g", Echo::Off);
        let t = Instant::now();
        let n = ECHO_BUDGET.burst as usize + 1000;
        let echoed = (0..n)
            .filter(|i| {
                !console
                    .echo_text(format!("line {i}").as_bytes(), t)
                    .is_empty()
            })
            .count();
        assert_eq!(echoed, ECHO_BUDGET.burst as usize);
        let later = console.echo_text(b"after", t + Duration::from_secs(1));
        assert_eq!(
            later,
            "[g] [1000 lines not echoed: more than 100 a second]\n[g] after\n"
        );
        // Kept text is not limited.
        for i in 0..n {
            console.push(format!("{i}\n").as_bytes());
        }
        assert!(console.text().ends_with(&format!("{}\n", n - 1)));
    }

    #[test]
    fn control_characters_are_neutralised() {
        let console = Console::new("t", Echo::Off);
        console.push(b"a\x1b[2Jb\n");
        assert_eq!(console.text(), "a?[2Jb\n");
        // A serial console's CR LF is a newline; a lone CR cannot rewrite a line.
        console.push(b"c\r\nd\re\n");
        assert_eq!(console.text(), "a?[2Jb\nc\nde\n");
    }
}
