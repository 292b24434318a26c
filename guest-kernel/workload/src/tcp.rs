//! The TCP mode (`workload=net-tcp`): one TCP connection between two workload clients, through
//! the third-party `smoltcp` TCP/IP stack (Ethernet, ARP, IPv4, TCP) on the virtio-net device
//! of [`NetDevice`] (virtio-drivers' `VirtIONetRaw`), with every byte received checked.
//!
//! Each end has a stream: byte `i` of direction `d` (0 client to server, 1 server to client)
//! is a function of the seed, `d` and `i` alone ([`Stream`]), so the receiver checks every byte
//! wherever segment boundaries, retransmissions and restarts put it. Both ends must be given
//! the same `mode`, `bytes`, `count`, `size` and `seed`.
//!
//! - `mode=bulk`: each end sends `bytes` of its stream and checks the `bytes` of the other's,
//!   both directions at once (full duplex, from the moment the connection is established).
//! - `mode=rr`: the client sends request `k` (bytes `k*size..(k+1)*size` of its stream) and
//!   waits for the whole answer (the same bytes of the server's stream) before the next;
//!   the server answers a request once it has all of it. The client times each round trip,
//!   from the moment it may send the request to the last byte of the answer.
//!
//! Then each end, once everything it sent is acknowledged and everything it expects has
//! arrived, closes (FIN) and waits for the connection to close (`closed`).
//!
//! What the report counts, beyond bytes:
//! - `retransmits`: TCP segments this end sent again, seen at the phy adapter ([`Phy`]):
//!   data, SYN or FIN segments whose sequence range starts below the furthest sequence number
//!   already sent on the connection (smoltcp 0.12 keeps no such counter). RTO and fast
//!   retransmits both count, each segment once.
//! - `resets`: RST segments received after the connection was established (before it, a
//!   client's SYN answered with RST, e.g. the server not listening yet, is `refused`, and the
//!   client connects again after 20 ms); any reset, or the connection closing before every
//!   byte went both ways, ends the run with an error.
//! - `corrupt`: bytes received that differ from the stream, `first_corrupt` the first one's
//!   offset; `verified`: bytes received and right.
//! - `timeout`: the run did not finish within `timeout_ms` (connecting included).
//! - `link_down` / `link_samples`: the virtio-net status, sampled every millisecond.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use guest_kernel::{println, time};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr,
    IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket,
};

use crate::config::{TcpConfig, TcpMode, TcpRole};
use crate::device::Found;
use crate::hal::NetDevice;
use crate::net::mac_text;
use crate::stats::{json_string, Histogram};

/// Largest Ethernet frame (without FCS) the device takes.
const MAX_FRAME: usize = 1514;
/// A client answered with RST while connecting tries again after this long.
const RECONNECT_US: u64 = 20_000;
/// How long an end waits for the connection to close after its own FIN; past it the run
/// still counts (`closed` is false).
const CLOSE_WAIT_US: u64 = 5_000_000;
/// How long an end that reached TIME-WAIT keeps answering (a peer's FIN sent again when our
/// last ACK was lost).
const TIME_WAIT_LINGER_US: u64 = 200_000;
/// First local port of a client (a new one for each connection attempt).
const CLIENT_PORT_BASE: u16 = 49_152;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pseudo-random byte stream of one direction of a run.
#[derive(Clone, Copy)]
pub struct Stream {
    key: u64,
}

impl Stream {
    /// Direction 0 (client to server) or 1 (server to client) of a run with `seed`.
    pub fn new(seed: u64, direction: u64) -> Stream {
        Stream {
            key: splitmix(seed ^ splitmix(0x7463_7000 + direction)),
        }
    }

    /// Calls `f` with the stream's bytes from `offset` on, a word (at most 8 bytes) at a time,
    /// until `len` bytes were given.
    fn words(self, offset: u64, len: usize, mut f: impl FnMut(usize, &[u8])) {
        let mut i = 0;
        while i < len {
            let at = offset + i as u64;
            let word = splitmix(self.key ^ (at >> 3)).to_le_bytes();
            let from = (at & 7) as usize;
            let n = (8 - from).min(len - i);
            f(i, &word[from..from + n]);
            i += n;
        }
    }

    /// Writes the stream's bytes at `offset..offset + out.len()` into `out`.
    pub fn fill(self, offset: u64, out: &mut [u8]) {
        let len = out.len();
        self.words(offset, len, |i, w| out[i..i + w.len()].copy_from_slice(w));
    }

    /// Checks `data` as the stream's bytes at `offset`: the index of the first wrong byte and
    /// how many are wrong, or `None` when all are right.
    pub fn check(self, offset: u64, data: &[u8]) -> Option<(usize, u64)> {
        let mut first = None;
        let mut bad = 0u64;
        self.words(offset, data.len(), |i, w| {
            let got = &data[i..i + w.len()];
            if got != w {
                for (j, (a, b)) in got.iter().zip(w).enumerate() {
                    if a != b {
                        bad += 1;
                        first.get_or_insert(i + j);
                    }
                }
            }
        });
        first.map(|f| (f, bad))
    }
}

/// What the phy adapter saw go by.
#[derive(Default)]
struct Wire {
    /// Frames handed to the device.
    frames_out: u64,
    /// Frames taken from the device.
    frames_in: u64,
    /// TCP segments sent that carry data, SYN or FIN.
    segments: u64,
    /// Of which: sent again (see the module docs).
    retransmits: u64,
    /// The local port of the connection being watched and the end (sequence number plus
    /// length) of the furthest segment it sent.
    high: Option<(u16, u32)>,
    /// RST segments received.
    rst_in: u64,
    /// The first device error (the run ends with it).
    error: Option<String>,
}

/// The TCP segment in an Ethernet frame, if it holds one: (source port, sequence number,
/// sequence space it takes, RST).
fn tcp_segment(frame: &[u8]) -> Option<(u16, u32, u32, bool)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let len = tcp.payload().len() as u32 + u32::from(tcp.syn()) + u32::from(tcp.fin());
    Some((tcp.src_port(), tcp.seq_number().0 as u32, len, tcp.rst()))
}

impl Wire {
    /// Counts a segment about to be sent.
    fn outgoing(&mut self, frame: &[u8]) {
        let Some((port, seq, len, _)) = tcp_segment(frame) else {
            return;
        };
        if len == 0 {
            return;
        }
        self.segments += 1;
        let end = seq.wrapping_add(len);
        match &mut self.high {
            Some((p, high)) if *p == port => {
                // Sequence numbers compare modulo 2^32 (RFC 793).
                if (seq.wrapping_sub(*high) as i32) < 0 {
                    self.retransmits += 1;
                }
                if (end.wrapping_sub(*high) as i32) > 0 {
                    *high = end;
                }
            }
            _ => self.high = Some((port, end)),
        }
    }

    /// Counts a segment received.
    fn incoming(&mut self, frame: &[u8]) {
        if tcp_segment(frame).is_some_and(|(_, _, _, rst)| rst) {
            self.rst_in += 1;
        }
    }
}

/// smoltcp's `phy::Device` over the workload's virtio-net device: frames are copied out of
/// the receive buffers (which go straight back to the device) and into transmit buffers.
struct Phy<'a> {
    dev: &'a mut NetDevice,
    rx: VecDeque<Vec<u8>>,
    wire: Wire,
}

/// A received frame, owned.
struct RxToken(Vec<u8>);

/// Room for one frame in the device's TX queue.
struct TxToken<'a> {
    dev: &'a mut NetDevice,
    wire: &'a mut Wire,
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.wire.outgoing(&frame);
        match self.dev.transmit(&frame) {
            Ok(true) => self.wire.frames_out += 1,
            // `transmit` below found room; a frame refused anyway is lost as on a wire, and
            // TCP sends it again.
            Ok(false) => {}
            Err(e) => {
                self.wire.error.get_or_insert(e);
            }
        }
        r
    }
}

impl Phy<'_> {
    /// Moves every frame the device received into `rx`.
    fn pull(&mut self) {
        let (rx, wire) = (&mut self.rx, &mut self.wire);
        if let Err(e) = self.dev.receive(|f| {
            wire.frames_in += 1;
            wire.incoming(f);
            rx.push_back(f.to_vec());
        }) {
            self.wire.error.get_or_insert(e);
        }
    }
}

impl phy::Device for Phy<'_> {
    type RxToken<'a>
        = RxToken
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        if self.rx.is_empty() {
            self.pull();
        }
        let frame = self.rx.pop_front()?;
        Some((
            RxToken(frame),
            TxToken {
                dev: self.dev,
                wire: &mut self.wire,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        match self.dev.can_send() {
            Ok(true) => Some(TxToken {
                dev: self.dev,
                wire: &mut self.wire,
            }),
            Ok(false) => None,
            Err(e) => {
                self.wire.error.get_or_insert(e);
                None
            }
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

/// What a run counted.
#[derive(Default)]
struct Counts {
    /// Bytes of ours the peer acknowledged.
    sent: u64,
    /// Bytes received.
    received: u64,
    /// Bytes received wrong.
    corrupt: u64,
    /// Offset of the first wrong byte.
    first_corrupt: Option<u64>,
    /// Bytes received beyond the expected total.
    excess: u64,
    /// Round trips completed (rr client; the server: requests answered).
    rounds: u64,
    rtt: Histogram,
    /// From the connection's establishment to everything sent acknowledged / received.
    tx_us: u64,
    rx_us: u64,
    /// From the connection's establishment to the end of the data exchange.
    elapsed_us: u64,
    segments: u64,
    retransmits: u64,
    resets: u64,
    refused: u64,
    timeout: bool,
    closed: bool,
    link_down: u64,
    link_samples: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Counts {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    fn clean(&self, total: u64) -> bool {
        self.errors == 0
            && self.corrupt == 0
            && self.resets == 0
            && !self.timeout
            && self.sent == total
            && self.received == total
    }
}

fn ip_text(a: [u8; 4]) -> String {
    alloc::format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

/// Runs the mode on the device in `found`; whether the run was clean.
pub fn run(cfg: &TcpConfig, found: &Found) -> bool {
    let mut c = Counts::default();
    let mut dev = match NetDevice::open(found) {
        Ok(d) => d,
        Err(e) => {
            c.error(alloc::format!("virtio-net: {e}"));
            report(cfg, [0; 6], &c);
            return false;
        }
    };
    let mac = dev.mac();
    println!(
        "ddvm-workload: net-tcp {} {} at {}/{} ({}, link {}), peer {}, port {}",
        cfg.role.name(),
        cfg.mode.name(),
        ip_text(cfg.ip),
        cfg.prefix,
        mac_text(mac),
        if dev.link_up() { "up" } else { "down" },
        cfg.peer.map_or(String::from("any"), ip_text),
        cfg.port
    );
    if let Err(e) = session(cfg, &mut dev, mac, &mut c) {
        c.error(e);
    }
    report(cfg, mac, &c);
    c.clean(cfg.total())
}

/// Where the connection is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Client: SYN sent; server: listening.
    Opening,
    /// Client: answered with RST; connect again at this time.
    Refused(u64),
    /// Exchanging data since this time.
    Open(u64),
    /// Our FIN is queued since this time; waiting for the connection to close.
    Closing(u64),
    /// In TIME-WAIT since this time.
    TimeWait(u64),
}

fn now_instant(us: u64) -> Instant {
    Instant::from_micros(us as i64)
}

fn session(
    cfg: &TcpConfig,
    dev: &mut NetDevice,
    mac: [u8; 6],
    c: &mut Counts,
) -> Result<(), String> {
    let start = time::now_us();
    let deadline = start.saturating_add(cfg.timeout_ms * 1000);
    let total = cfg.total();
    let (mine, theirs) = match cfg.role {
        TcpRole::Client => (Stream::new(cfg.seed, 0), Stream::new(cfg.seed, 1)),
        TcpRole::Server => (Stream::new(cfg.seed, 1), Stream::new(cfg.seed, 0)),
    };
    let mut phy = Phy {
        dev,
        rx: VecDeque::new(),
        wire: Wire::default(),
    };
    let mut config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = splitmix(time::ticks() ^ cfg.seed ^ u64::from(cfg.id) << 32);
    let mut iface = Interface::new(config, &mut phy, now_instant(start));
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(
            IpAddress::Ipv4(Ipv4Address::from(cfg.ip)),
            cfg.prefix,
        ));
    });
    let mut sockets = SocketSet::new(Vec::new());
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; cfg.window]),
        tcp::SocketBuffer::new(vec![0u8; cfg.window]),
    );
    socket.set_nagle_enabled(false);
    // Without congestion control smoltcp sends the whole window again after every timeout,
    // and a path that lost part of it (a NIC's receive ring full, a domain restarting) loses
    // it again; Reno starts from one segment.
    socket.set_congestion_control(tcp::CongestionControl::Reno);
    let handle = sockets.add(socket);
    let mut attempts: u16 = 0;
    let connect = |s: &mut tcp::Socket, iface: &mut Interface, attempt: u16| {
        let peer = cfg.peer.ok_or("no peer")?;
        let local = CLIENT_PORT_BASE + (attempt % 16_384);
        s.connect(
            iface.context(),
            (IpAddress::Ipv4(Ipv4Address::from(peer)), cfg.port),
            local,
        )
        .map_err(|e| alloc::format!("connect: {e}"))
    };
    match cfg.role {
        TcpRole::Client => connect(sockets.get_mut(handle), &mut iface, attempts)?,
        TcpRole::Server => sockets
            .get_mut::<tcp::Socket>(handle)
            .listen(cfg.port)
            .map_err(|e| alloc::format!("listen: {e}"))?,
    }

    let mut phase = Phase::Opening;
    // Bytes of ours written into the socket; bytes of theirs taken out of it.
    let mut tx_off: u64 = 0;
    let mut rx_off: u64 = 0;
    let mut rst_base = 0;
    // rr client: when the current request could first be sent.
    let mut request_at = 0;
    let mut next_link = 0;
    let mut idle_since = start;
    let result = loop {
        let now = time::now_us();
        if now >= next_link {
            next_link = now + 1000;
            c.link_samples += 1;
            if !phy.dev.link_up() {
                c.link_down += 1;
            }
        }
        let exchanging = matches!(phase, Phase::Opening | Phase::Refused(_) | Phase::Open(_));
        if now > deadline && exchanging {
            c.timeout = true;
            break Err(alloc::format!(
                "timeout after {} ms: sent {tx_off} ({} acknowledged) and received {rx_off} of \
                 {total} bytes",
                cfg.timeout_ms,
                c.sent
            ));
        }
        let before = (phy.wire.frames_in, phy.wire.frames_out, tx_off, rx_off);
        iface.poll(now_instant(now), &mut phy, &mut sockets);
        if let Some(e) = phy.wire.error.take() {
            break Err(e);
        }
        let s = sockets.get_mut::<tcp::Socket>(handle);
        let state = s.state();
        match phase {
            Phase::Opening => match state {
                tcp::State::Established | tcp::State::CloseWait => {
                    if let (Some(peer), Some(remote)) = (cfg.peer, s.remote_endpoint()) {
                        if remote.addr != IpAddress::Ipv4(Ipv4Address::from(peer)) {
                            break Err(alloc::format!("connection from {remote}, not the peer"));
                        }
                    }
                    rst_base = phy.wire.rst_in;
                    request_at = now;
                    phase = Phase::Open(now);
                }
                tcp::State::Closed if cfg.role == TcpRole::Client => {
                    c.refused += 1;
                    phase = Phase::Refused(now + RECONNECT_US);
                }
                _ => {}
            },
            Phase::Refused(at) => {
                if now >= at {
                    attempts = attempts.wrapping_add(1);
                    connect(s, &mut iface, attempts)?;
                    phase = Phase::Opening;
                }
            }
            Phase::Open(since) => {
                c.resets = phy.wire.rst_in - rst_base;
                // Take what arrived and check it.
                while s.can_recv() {
                    let got = s.recv(|buf| {
                        let want = total.saturating_sub(rx_off).min(buf.len() as u64) as usize;
                        if let Some((at, bad)) = theirs.check(rx_off, &buf[..want]) {
                            c.corrupt += bad;
                            c.first_corrupt.get_or_insert(rx_off + at as u64);
                        }
                        c.excess += (buf.len() - want) as u64;
                        (buf.len(), want)
                    });
                    match got {
                        Ok(n) => rx_off += n as u64,
                        Err(_) => break,
                    }
                }
                c.received = rx_off;
                if rx_off == total && c.rx_us == 0 {
                    c.rx_us = (now - since).max(1);
                }
                // rr: one request at a time (client), an answer per whole request (server).
                let limit = match (cfg.mode, cfg.role) {
                    (TcpMode::Bulk, _) => total,
                    (TcpMode::Rr, TcpRole::Client) => {
                        let done = rx_off / cfg.size;
                        if done > c.rounds {
                            c.rtt.record(now - request_at);
                            c.rounds = done;
                            request_at = now;
                        }
                        total.min((done + 1) * cfg.size)
                    }
                    (TcpMode::Rr, TcpRole::Server) => {
                        c.rounds = rx_off / cfg.size;
                        c.rounds * cfg.size
                    }
                };
                while tx_off < limit && s.can_send() {
                    let sent = s.send(|buf| {
                        let n = (limit - tx_off).min(buf.len() as u64) as usize;
                        mine.fill(tx_off, &mut buf[..n]);
                        (n, n)
                    });
                    match sent {
                        Ok(0) | Err(_) => break,
                        Ok(n) => tx_off += n as u64,
                    }
                }
                c.sent = tx_off - s.send_queue() as u64;
                if c.sent == total && c.tx_us == 0 {
                    c.tx_us = (now - since).max(1);
                }
                if c.excess > 0 {
                    break Err(alloc::format!(
                        "{} bytes beyond the {total} expected",
                        c.excess
                    ));
                }
                if c.resets > 0 {
                    break Err(alloc::format!(
                        "connection reset ({state}) after {tx_off} bytes sent and {rx_off} received"
                    ));
                }
                if c.sent == total && rx_off == total {
                    c.elapsed_us = (now - since).max(1);
                    s.close();
                    phase = Phase::Closing(now);
                } else if !(state == tcp::State::Established
                    || state == tcp::State::CloseWait && rx_off == total)
                {
                    break Err(alloc::format!(
                        "connection {state} after {tx_off} bytes sent and {rx_off} received of \
                         {total}"
                    ));
                }
            }
            Phase::Closing(since) => {
                c.resets = phy.wire.rst_in - rst_base;
                match state {
                    tcp::State::Closed => {
                        c.closed = true;
                        break Ok(());
                    }
                    tcp::State::TimeWait => {
                        c.closed = true;
                        phase = Phase::TimeWait(now);
                    }
                    _ if now - since > CLOSE_WAIT_US => break Ok(()),
                    _ => {}
                }
            }
            Phase::TimeWait(since) => {
                if now - since > TIME_WAIT_LINGER_US || state == tcp::State::Closed {
                    break Ok(());
                }
            }
        }
        let after = (phy.wire.frames_in, phy.wire.frames_out, tx_off, rx_off);
        if before != after {
            idle_since = now;
        } else if now - idle_since > 30 {
            let delay = iface
                .poll_delay(now_instant(now), &sockets)
                .map_or(1000, |d| d.total_micros().min(1000));
            if delay > 0 {
                phy.dev.wait(delay as u32);
            }
        }
    };
    c.segments = phy.wire.segments;
    c.retransmits = phy.wire.retransmits;
    result
}

fn report(cfg: &TcpConfig, mac: [u8; 6], c: &Counts) {
    let mb_s = |bytes: u64, us: u64| {
        if us == 0 {
            0.0
        } else {
            bytes as f64 / us as f64
        }
    };
    let mut s = String::from("{");
    let _ = write!(
        s,
        "\"id\":{},\"workload\":\"net-tcp\",\"role\":\"{}\",\"mode\":\"{}\",\"mac\":\"{}\",\
         \"ip\":\"{}\",\"peer\":",
        cfg.id,
        cfg.role.name(),
        cfg.mode.name(),
        mac_text(mac),
        ip_text(cfg.ip),
    );
    match cfg.peer {
        Some(p) => json_string(&mut s, &ip_text(p)),
        None => s.push_str("null"),
    }
    let _ = write!(
        s,
        ",\"port\":{},\"window\":{},\"bytes\":{},\"sent\":{},\"received\":{},\"verified\":{},\
         \"corrupt\":{},\"first_corrupt\":",
        cfg.port,
        cfg.window,
        cfg.total(),
        c.sent,
        c.received,
        c.received - c.corrupt.min(c.received),
        c.corrupt,
    );
    match c.first_corrupt {
        Some(at) => {
            let _ = write!(s, "{at}");
        }
        None => s.push_str("null"),
    }
    let _ = write!(
        s,
        ",\"elapsed_us\":{},\"tx_mb_s\":{:.2},\"rx_mb_s\":{:.2},\"count\":{},\"size\":{},\
         \"rounds\":{},\"rtt_us\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"segments\":{},\
         \"retransmits\":{},\"resets\":{},\"refused\":{},\"timeout\":{},\"closed\":{},\
         \"link_down\":{},\"link_samples\":{},\"errors\":{},\"first_error\":",
        c.elapsed_us,
        mb_s(c.sent, c.tx_us),
        mb_s(c.received, c.rx_us),
        if cfg.mode == TcpMode::Rr {
            cfg.count
        } else {
            0
        },
        if cfg.mode == TcpMode::Rr { cfg.size } else { 0 },
        c.rounds,
        c.rtt.percentile(500),
        c.rtt.percentile(990),
        c.rtt.max(),
        c.segments,
        c.retransmits,
        c.resets,
        c.refused,
        c.timeout,
        c.closed,
        c.link_down,
        c.link_samples,
        c.errors,
    );
    match &c.first_error {
        Some(e) => json_string(&mut s, e),
        None => s.push_str("null"),
    }
    s.push('}');
    println!("ddvm-workload: {s}");
}
