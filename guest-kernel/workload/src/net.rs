//! The network mode (`workload=net-echo`): numbered frames to a peer that sends each one back,
//! every byte checked on return.
//!
//! A frame (ethertype 0x88B5, the IEEE's local experimental type) carries after its Ethernet
//! header a magic, a kind (data or FIN), its sequence number, its own length (60 to 1514
//! bytes, a function of the seed and the number) and the sender's id, then a payload generated
//! from the seed and the number. The sender keeps up to `window` frames in flight and sends a
//! frame again when it was not echoed within `retry_ms` and three smoothed round trips (the
//! network may lose frames, for example while a NIC domain restarts); the echo side sends
//! each frame back with the addresses swapped. A frame that does not check out is `corrupt`; one that comes back after
//! its number was already delivered is a duplicate (a retried frame whose first copy was not
//! lost, or a transmit replayed after a restart: at-least-once). When every frame is back the
//! sender sends FIN until it is echoed; the echo side stops half a second after its first FIN.
//! The virtio-net status is sampled every millisecond and each reading of link down counted.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use guest_kernel::{println, time};

use crate::config::{NetConfig, Role};
use crate::device::Found;
use crate::hal::NetDevice;
use crate::stats::{json_string, Histogram};

/// Ethertype of the frames (IEEE 802 local experimental ethertype 1).
pub const ETHERTYPE: u16 = 0x88b5;
/// Magic after the Ethernet header.
const MAGIC: u32 = 0x454e_4444;
/// Shortest frame sent.
pub const MIN_FRAME: usize = 60;
/// Longest frame sent.
pub const MAX_FRAME: usize = 1514;
/// Bytes before the payload.
const HEADER: usize = 30;
const KIND_DATA: u8 = 0;
const KIND_FIN: u8 = 1;
/// How long the echo side keeps echoing after the first FIN.
const LINGER_US: u64 = 500_000;
/// Frames the echo side holds while its TX queue is full; more are dropped (the sender
/// retries them).
const ECHO_BACKLOG: usize = 256;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The length of frame `seq` of a run with `seed`.
pub fn frame_len(seed: u64, seq: u32) -> usize {
    let span = (MAX_FRAME - MIN_FRAME + 1) as u64;
    MIN_FRAME + (splitmix(seed ^ (u64::from(seq) << 32) ^ 0x006c_656e) % span) as usize
}

/// Fills `payload` with the bytes of frame `seq`.
fn fill_payload(payload: &mut [u8], seed: u64, seq: u32) {
    let mut state = splitmix(seed.rotate_left(17) ^ u64::from(seq));
    for chunk in payload.chunks_mut(8) {
        state = splitmix(state);
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Frame `seq` (or a FIN with `seq` 0) from `src` to `dst`.
pub fn build(dst: [u8; 6], src: [u8; 6], seed: u64, id: u32, seq: u32, kind: u8) -> Vec<u8> {
    let len = if kind == KIND_FIN {
        MIN_FRAME
    } else {
        frame_len(seed, seq)
    };
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&MAGIC.to_le_bytes());
    f[18] = kind;
    f[20..24].copy_from_slice(&seq.to_le_bytes());
    f[24..26].copy_from_slice(&(len as u16).to_le_bytes());
    f[26..30].copy_from_slice(&id.to_le_bytes());
    fill_payload(&mut f[HEADER..], seed, seq);
    f
}

/// What a received frame is.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not this workload's ethertype (ignored).
    Other,
    /// Data frame `seq`, every byte right.
    Data(u32),
    /// A FIN.
    Fin,
    /// Ours, but wrong: why.
    Corrupt(String),
}

/// Checks `f` as a frame from `src` to `dst` of a run with `seed` and `count` frames.
pub fn check(f: &[u8], dst: [u8; 6], src: Option<[u8; 6]>, seed: u64, count: u64) -> Frame {
    if f.len() < 14 || f[12..14] != ETHERTYPE.to_be_bytes() {
        return Frame::Other;
    }
    if f.len() < HEADER {
        return Frame::Corrupt(alloc::format!("runt of {} bytes", f.len()));
    }
    let word = |at: usize| u32::from_le_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]]);
    if word(14) != MAGIC {
        return Frame::Corrupt(alloc::format!("magic {:#x}", word(14)));
    }
    if f[0..6] != dst || src.is_some_and(|s| f[6..12] != s) {
        return Frame::Corrupt(alloc::format!(
            "addresses {:02x?} <- {:02x?}",
            &f[0..6],
            &f[6..12]
        ));
    }
    let (kind, seq) = (f[18], word(20));
    let id = word(26);
    if kind == KIND_FIN {
        return Frame::Fin;
    }
    if kind != KIND_DATA || u64::from(seq) >= count {
        return Frame::Corrupt(alloc::format!("kind {kind} seq {seq}"));
    }
    let want = build(
        [f[0], f[1], f[2], f[3], f[4], f[5]],
        [f[6], f[7], f[8], f[9], f[10], f[11]],
        seed,
        id,
        seq,
        KIND_DATA,
    );
    if f.len() != want.len() {
        return Frame::Corrupt(alloc::format!(
            "frame {seq}: {} bytes, expected {}",
            f.len(),
            want.len()
        ));
    }
    match f.iter().zip(&want).position(|(a, b)| a != b) {
        Some(at) => Frame::Corrupt(alloc::format!("frame {seq}: byte {at} wrong")),
        None => Frame::Data(seq),
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(m: [u8; 6]) -> String {
    let mut s = String::new();
    for (i, b) in m.iter().enumerate() {
        let _ = write!(s, "{}{b:02x}", if i == 0 { "" } else { ":" });
    }
    s
}

/// What a run counted.
#[derive(Default)]
struct Counts {
    /// Frames started (sender).
    started: u64,
    frames: u64,
    sent: u64,
    received: u64,
    corrupt: u64,
    duplicates: u64,
    retries: u64,
    dropped: u64,
    link_down: u64,
    link_samples: u64,
    errors: u64,
    first_error: Option<String>,
    rtt: Histogram,
}

impl Counts {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    fn corrupt(&mut self, what: String) {
        self.corrupt += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }
}

/// Samples the link once a millisecond.
struct LinkSampler {
    next_us: u64,
}

impl LinkSampler {
    fn sample(&mut self, dev: &NetDevice, c: &mut Counts, now: u64) {
        if now >= self.next_us {
            self.next_us = now + 1000;
            c.link_samples += 1;
            if !dev.link_up() {
                c.link_down += 1;
            }
        }
    }
}

/// Runs the mode on the device in `found`; whether the run was clean.
pub fn run(cfg: &NetConfig, found: &Found) -> bool {
    let mut c = Counts::default();
    let start = time::now_us();
    let mut dev = match NetDevice::open(found) {
        Ok(d) => d,
        Err(e) => {
            c.error(alloc::format!("virtio-net: {e}"));
            report(cfg, [0; 6], &c, 0);
            return false;
        }
    };
    let mac = dev.mac();
    println!(
        "ddvm-workload: net-echo {} at {} (link {}), peer {}",
        match cfg.role {
            Role::Send => "sender",
            Role::Echo => "echo",
        },
        mac_text(mac),
        if dev.link_up() { "up" } else { "down" },
        cfg.peer.map_or(String::from("any"), mac_text)
    );
    let result = match cfg.role {
        Role::Send => send(cfg, &mut dev, mac, &mut c),
        Role::Echo => echo(cfg, &mut dev, mac, &mut c),
    };
    if let Err(e) = result {
        c.error(e);
    }
    report(cfg, mac, &c, time::now_us() - start);
    c.errors == 0 && c.corrupt == 0 && (cfg.role == Role::Echo || c.frames == c.started)
}

/// One frame in flight.
struct InFlight {
    seq: u32,
    sent_us: u64,
}

fn send(cfg: &NetConfig, dev: &mut NetDevice, mac: [u8; 6], c: &mut Counts) -> Result<(), String> {
    let peer = cfg.peer.ok_or("no peer")?;
    let start = time::now_us();
    let deadline = start + cfg.timeout_ms * 1000;
    let stop_at = cfg.duration_ms.map(|d| start + d * 1000);
    let limit = cfg.count.unwrap_or(u64::from(u32::MAX));
    let retry_us = cfg.retry_ms * 1000;
    // Smoothed round trip (as TCP's SRTT, gain 1/8): a frame is sent again only after
    // `retry_ms` and at least three of them, so a path slower than `retry_ms` (an emulated
    // machine) is not flooded with copies of frames still on their way.
    let mut srtt_us: u64 = 0;
    // Every number below `next` not in flight was delivered.
    let mut flight: Vec<InFlight> = Vec::new();
    let mut next: u64 = 0;
    let mut link = LinkSampler { next_us: 0 };
    let mut idle_since = start;
    loop {
        let now = time::now_us();
        let starting = next < limit && stop_at.is_none_or(|t| now < t);
        if !starting && flight.is_empty() {
            break;
        }
        if now > deadline {
            c.started = next;
            return Err(alloc::format!(
                "timeout: {} of {next} frames back after {} ms",
                c.frames,
                cfg.timeout_ms
            ));
        }
        link.sample(dev, c, now);
        let mut busy = dev.reclaim()? > 0;
        while starting && flight.len() < cfg.window && next < limit {
            let seq = next as u32;
            if !dev.transmit(&build(peer, mac, cfg.seed, cfg.id, seq, KIND_DATA))? {
                break;
            }
            c.sent += 1;
            flight.push(InFlight { seq, sent_us: now });
            next += 1;
            busy = true;
        }
        let mut got = Vec::new();
        dev.receive(|f| got.push(check(f, mac, Some(peer), cfg.seed, limit)))?;
        let now = time::now_us();
        for frame in got {
            busy = true;
            c.received += 1;
            match frame {
                Frame::Other | Frame::Fin => {}
                Frame::Corrupt(why) => c.corrupt(why),
                Frame::Data(seq) => {
                    if let Some(i) = flight.iter().position(|f| f.seq == seq) {
                        c.frames += 1;
                        let rtt = now - flight.swap_remove(i).sent_us;
                        c.rtt.record(rtt);
                        srtt_us = if srtt_us == 0 {
                            rtt
                        } else {
                            (7 * srtt_us + rtt) / 8
                        };
                    } else if u64::from(seq) < next {
                        c.duplicates += 1;
                    } else {
                        c.corrupt(alloc::format!("frame {seq} never sent"));
                    }
                }
            }
        }
        let timeout_us = retry_us.max(3 * srtt_us);
        for f in flight.iter_mut().filter(|f| now - f.sent_us > timeout_us) {
            if !dev.transmit(&build(peer, mac, cfg.seed, cfg.id, f.seq, KIND_DATA))? {
                break;
            }
            c.sent += 1;
            c.retries += 1;
            f.sent_us = now;
            busy = true;
        }
        if busy {
            idle_since = now;
        } else if now - idle_since > 30 {
            dev.wait(1000);
        }
    }
    c.started = next;
    // Tell the echo side to stop (for up to 100 retry periods: a restart may lose FINs); its
    // echo of the FIN is not required.
    for _ in 0..100 {
        if dev.transmit(&build(peer, mac, cfg.seed, cfg.id, 0, KIND_FIN))? {
            c.sent += 1;
        }
        let until = time::now_us() + retry_us;
        let mut fin = false;
        while !fin && time::now_us() < until {
            dev.receive(|f| fin |= check(f, mac, Some(peer), cfg.seed, limit) == Frame::Fin)?;
            if !fin {
                dev.wait(1000);
            }
        }
        if fin {
            break;
        }
    }
    Ok(())
}

fn echo(cfg: &NetConfig, dev: &mut NetDevice, mac: [u8; 6], c: &mut Counts) -> Result<(), String> {
    let mut backlog: VecDeque<Vec<u8>> = VecDeque::new();
    let mut link = LinkSampler { next_us: 0 };
    let mut last_frame = time::now_us();
    let mut fin_at: Option<u64> = None;
    let mut idle_since = last_frame;
    loop {
        let now = time::now_us();
        link.sample(dev, c, now);
        if fin_at.is_some_and(|t| now - t > LINGER_US) && backlog.is_empty() {
            return Ok(());
        }
        if now - last_frame > cfg.timeout_ms * 1000 {
            return Err(alloc::format!(
                "no frame for {} ms ({} echoed)",
                cfg.timeout_ms,
                c.frames
            ));
        }
        let mut busy = dev.reclaim()? > 0;
        let mut got = Vec::new();
        dev.receive(|f| {
            let verdict = check(f, mac, cfg.peer, cfg.seed, u64::from(u32::MAX));
            got.push((verdict, f.to_vec()));
        })?;
        for (verdict, mut f) in got {
            busy = true;
            c.received += 1;
            last_frame = now;
            match verdict {
                Frame::Other => continue,
                Frame::Corrupt(why) => {
                    c.corrupt(why);
                    continue;
                }
                Frame::Fin => {
                    fin_at.get_or_insert(now);
                }
                Frame::Data(_) => c.frames += 1,
            }
            let (dst, src) = f.split_at_mut(6);
            dst.copy_from_slice(&src[..6]);
            src[..6].copy_from_slice(&mac);
            if backlog.len() < ECHO_BACKLOG {
                backlog.push_back(f);
            } else {
                c.dropped += 1;
            }
        }
        while let Some(f) = backlog.front() {
            if !dev.transmit(f)? {
                break;
            }
            backlog.pop_front();
            c.sent += 1;
            busy = true;
        }
        if busy {
            idle_since = now;
        } else if now - idle_since > 30 {
            dev.wait(1000);
        }
    }
}

fn report(cfg: &NetConfig, mac: [u8; 6], c: &Counts, elapsed_us: u64) {
    let mut s = String::from("{");
    let _ = write!(
        s,
        "\"id\":{},\"workload\":\"net-echo\",\"role\":\"{}\",\"mac\":\"{}\",\"peer\":",
        cfg.id,
        match cfg.role {
            Role::Send => "send",
            Role::Echo => "echo",
        },
        mac_text(mac)
    );
    match cfg.peer {
        Some(p) => json_string(&mut s, &mac_text(p)),
        None => s.push_str("null"),
    }
    let fps = (c.frames * 1_000_000).checked_div(elapsed_us).unwrap_or(0);
    let _ = write!(
        s,
        ",\"count\":{},\"window\":{},\"frames\":{},\"sent\":{},\"received\":{},\"corrupt\":{},\
         \"duplicates\":{},\"retries\":{},\"dropped\":{},\"link_down\":{},\"link_samples\":{},\
         \"elapsed_us\":{elapsed_us},\"frames_s\":{fps},\"rtt_us\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\
         \"errors\":{},\"first_error\":",
        c.started,
        cfg.window,
        c.frames,
        c.sent,
        c.received,
        c.corrupt,
        c.duplicates,
        c.retries,
        c.dropped,
        c.link_down,
        c.link_samples,
        c.rtt.percentile(500),
        c.rtt.percentile(990),
        c.rtt.max(),
        c.errors,
    );
    match &c.first_error {
        Some(e) => json_string(&mut s, e),
        None => s.push_str("null"),
    }
    s.push('}');
    println!("ddvm-workload: {s}");
}
