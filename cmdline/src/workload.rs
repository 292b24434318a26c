//! The command line: what to run, parsed and checked before any device is touched.
//!
//! Every key and its default is documented in the workload client's crate documentation
//! (`guest-kernel/workload/src/main.rs`). A value that
//! does not parse or is out of range is a [`BadArg`] naming the key and what was expected; the
//! image then exits with status 1.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::hostile::Case;
use crate::Cmdline;

/// Largest queue depth (`qd`).
pub const MAX_QD: u32 = 128;
/// Largest block size (`bs`).
pub const MAX_BS: u64 = 1 << 20;
/// Sector size of virtio-blk addresses.
pub const SECTOR: u64 = 512;
/// The command-line key naming a virtio-mmio device (Linux's syntax).
pub const DEVICE_KEY: &str = "virtio_mmio.device";

/// Every key the workload client reads; other tokens are reported once and ignored.
pub const KEYS: &[&str] = &[
    "workload",
    "rwmix",
    "bs",
    "qd",
    "count",
    "duration_ms",
    "seed",
    "id",
    "span",
    "prefill",
    "flush_every",
    "flush",
    "verify_pass",
    "timeout_ms",
    "hostile",
    "role",
    "peer",
    "window",
    "retry_ms",
    "ip",
    "port",
    "mode",
    "bytes",
    "size",
    DEVICE_KEY,
];

/// The `workload` value of the network mode.
pub const NET_ECHO: &str = "net-echo";
/// Largest `window` of the network mode.
pub const MAX_WINDOW: u64 = 32;
/// The `workload` value of the TCP mode.
pub const NET_TCP: &str = "net-tcp";
/// Largest `size` (bytes of one request or response) of the TCP mode's `mode=rr`.
pub const MAX_RR_SIZE: u64 = 1 << 20;
/// Largest `bytes` of the TCP mode's `mode=bulk` (each direction).
pub const MAX_BULK_BYTES: u64 = 1 << 40;
/// Default `window` of the TCP mode: the bytes of each socket buffer (RX and TX), and so of
/// the window, 11 full segments in flight each way. A NIC domain has 24 receive buffers
/// posted by the VMM (`RX_POSTED` in `vmm/src/net/class.rs`) and its e1000 drops what arrives
/// beyond them, so a larger window overruns the far NIC in bursts on a loaded host, and
/// smoltcp, without selective acknowledgements, recovers from such losses slowly. Between
/// clients of one NIC domain (hairpinned, no e1000 on the way) a larger one is faster.
pub const TCP_WINDOW: u64 = 16 << 10;
/// Smallest and largest `window` of the TCP mode (above 64 KiB smoltcp scales the window).
pub const TCP_WINDOW_RANGE: core::ops::RangeInclusive<u64> = 2048..=(1 << 20);

/// The access pattern of the timed phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Random reads and writes (`rwmix` percent reads).
    RandRw,
    /// Sequential reads, wrapping at the end of the span.
    SeqRead,
    /// Sequential writes, wrapping at the end of the span.
    SeqWrite,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::RandRead,
        Workload::RandWrite,
        Workload::RandRw,
        Workload::SeqRead,
        Workload::SeqWrite,
    ];

    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::RandRw => "randrw",
            Workload::SeqRead => "seqread",
            Workload::SeqWrite => "seqwrite",
        }
    }

    /// Whether the timed phase reads.
    pub fn reads(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandRw | Workload::SeqRead
        )
    }

    /// Whether the timed phase writes.
    pub fn writes(self) -> bool {
        matches!(
            self,
            Workload::RandWrite | Workload::RandRw | Workload::SeqWrite
        )
    }

    /// Whether blocks are picked at random (else in order).
    pub fn random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }
}

/// The workload, as the command line asks for it.
#[derive(Clone, Debug)]
pub struct Config {
    /// Access pattern.
    pub workload: Workload,
    /// Percent reads of `randrw`.
    pub rwmix: u32,
    /// Block size in bytes (a multiple of 512).
    pub bs: u64,
    /// Requests in flight at most.
    pub qd: u32,
    /// Requests in the timed phase at most (`None`: until `duration_ms`).
    pub count: Option<u64>,
    /// Length of the timed phase at most.
    pub duration_ms: Option<u64>,
    /// Seed of the request sequence.
    pub seed: u64,
    /// Client id, stamped into every block written.
    pub id: u32,
    /// Bytes of the device used, from its start (`None`: all of it).
    pub span: Option<u64>,
    /// Write every block of the span before the timed phase.
    pub prefill: bool,
    /// FLUSH after every this many acknowledged writes (0: only at the end).
    pub flush_every: u64,
    /// Send FLUSH at all (pre-check, `flush_every`, the end of the timed phase).
    pub flush: bool,
    /// Read back and check every written block after the timed phase.
    pub verify_pass: bool,
    /// A request not completed after this long is an error that ends the run.
    pub timeout_ms: u64,
}

/// What the image does.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Run the verified workload.
    Workload(Config),
    /// Submit one malformed request and report what the device did.
    Hostile(Case),
    /// Exchange verified frames over the virtio-net device.
    NetEcho(NetConfig),
    /// A verified TCP transfer (smoltcp) over the virtio-net device.
    NetTcp(TcpConfig),
}

/// Which end of the TCP connection a client is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpRole {
    /// Listens on `port` and takes one connection.
    Server,
    /// Connects to `peer:port`.
    Client,
}

impl TcpRole {
    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            TcpRole::Server => "server",
            TcpRole::Client => "client",
        }
    }
}

/// What the TCP connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpMode {
    /// Each side sends `bytes` of its stream and checks the other's, both at once.
    Bulk,
    /// The client sends `count` requests of `size` bytes, one at a time; the server answers
    /// each with `size` bytes once it has the whole request.
    Rr,
}

impl TcpMode {
    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            TcpMode::Bulk => "bulk",
            TcpMode::Rr => "rr",
        }
    }
}

/// The TCP mode, as the command line asks for it.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Server or client.
    pub role: TcpRole,
    /// This client's IPv4 address.
    pub ip: [u8; 4],
    /// Its prefix length (the subnet everything is on: there is no gateway).
    pub prefix: u8,
    /// The other end's address (required of a client; a server given one takes a connection
    /// only from it).
    pub peer: Option<[u8; 4]>,
    /// The server's port.
    pub port: u16,
    /// Bulk or request/response.
    pub mode: TcpMode,
    /// Bytes each way of `mode=bulk`.
    pub bytes: u64,
    /// Round trips of `mode=rr`.
    pub count: u64,
    /// Bytes of each request and each response of `mode=rr`.
    pub size: u64,
    /// Bytes of each socket buffer (and so of the window each way).
    pub window: usize,
    /// Seed of both streams (both ends must be given the same).
    pub seed: u64,
    /// Client id, in the report.
    pub id: u32,
    /// The whole run (connecting included) ends with an error after this long.
    pub timeout_ms: u64,
}

impl TcpConfig {
    /// Bytes each side sends (and so receives).
    pub fn total(&self) -> u64 {
        match self.mode {
            TcpMode::Bulk => self.bytes,
            TcpMode::Rr => self.count * self.size,
        }
    }
}

/// Which side of the exchange a network client is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends numbered frames to the peer and checks what comes back.
    Send,
    /// Sends every frame back to where it came from.
    Echo,
}

/// The network mode, as the command line asks for it.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Sender or echo.
    pub role: Role,
    /// The sender's peer (required for `role=send`).
    pub peer: Option<[u8; 6]>,
    /// Frames to deliver (sender; `None`: until `duration_ms`).
    pub count: Option<u64>,
    /// Stop starting frames after this long (sender), then wait for those in flight.
    pub duration_ms: Option<u64>,
    /// Frames in flight at most (sender).
    pub window: usize,
    /// Seed of the payloads.
    pub seed: u64,
    /// Client id, in the report.
    pub id: u32,
    /// A frame not echoed after this long is sent again (sender).
    pub retry_ms: u64,
    /// The run ends with an error after this long (the echo: after this long without a frame).
    pub timeout_ms: u64,
}

/// A command-line value that is not what the image expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadArg {
    /// The key.
    pub key: &'static str,
    /// The value found (empty when the key is missing).
    pub value: String,
    /// What was expected, as a phrase.
    pub expected: String,
}

impl BadArg {
    /// `key=value` is not `expected`.
    pub fn new(key: &'static str, value: &str, expected: impl Into<String>) -> Self {
        BadArg {
            key,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

impl fmt::Display for BadArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: missing; expected {}", self.key, self.expected)
        } else {
            write!(f, "{}={}: expected {}", self.key, self.value, self.expected)
        }
    }
}

/// Parses the mode and its settings. Returns the tokens that name no known key too.
pub fn parse(cmdline: Cmdline<'_>) -> Result<(Mode, Vec<&str>), BadArg> {
    let unknown = cmdline
        .tokens()
        .filter(|t| {
            let key = t.split_once('=').map_or(*t, |(k, _)| k);
            !KEYS.contains(&key)
        })
        .collect();
    if let Some(v) = cmdline.value("hostile") {
        let case = Case::parse(v)
            .ok_or_else(|| BadArg::new("hostile", v, alloc::format!("one of {}", Case::names())))?;
        return Ok((Mode::Hostile(case), unknown));
    }
    if cmdline.value("workload") == Some(NET_TCP) {
        return Ok((Mode::NetTcp(parse_tcp(cmdline)?), unknown));
    }
    if cmdline.value("workload") == Some(NET_ECHO) {
        return Ok((Mode::NetEcho(parse_net(cmdline)?), unknown));
    }
    Ok((Mode::Workload(parse_workload(cmdline)?), unknown))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `a.b.c.d`.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    s.parse::<core::net::Ipv4Addr>().ok().map(|a| a.octets())
}

/// A unicast host address: not 0.0.0.0/8, multicast, broadcast or reserved (240/4).
fn unicast_ipv4(a: [u8; 4]) -> bool {
    a[0] != 0 && a[0] < 224
}

fn parse_tcp(c: Cmdline<'_>) -> Result<TcpConfig, BadArg> {
    let role = match c.value("role") {
        Some("server") => TcpRole::Server,
        Some("client") => TcpRole::Client,
        v => return Err(BadArg::new("role", v.unwrap_or(""), "server or client")),
    };
    const IP: &str = "a unicast IPv4 address and prefix length such as 10.0.0.1/24";
    let ip_text = c.value("ip").ok_or_else(|| BadArg::new("ip", "", IP))?;
    let (ip, prefix) = ip_text
        .split_once('/')
        .and_then(|(a, p)| Some((parse_ipv4(a)?, p.parse::<u8>().ok()?)))
        .filter(|(a, p)| unicast_ipv4(*a) && (1..=30).contains(p))
        .ok_or_else(|| BadArg::new("ip", ip_text, IP))?;
    const PEER: &str = "the other end's IPv4 address (e.g. 10.0.0.2), in the subnet of ip=";
    let peer = match c.value("peer") {
        None if role == TcpRole::Client => return Err(BadArg::new("peer", "", PEER)),
        None => None,
        Some(v) => {
            let mask = u32::MAX << (32 - u32::from(prefix));
            let same_net = |p: [u8; 4]| {
                u32::from_be_bytes(p) & mask == u32::from_be_bytes(ip) & mask && p != ip
            };
            Some(
                parse_ipv4(v)
                    .filter(|p| unicast_ipv4(*p) && same_net(*p))
                    .ok_or_else(|| BadArg::new("peer", v, PEER))?,
            )
        }
    };
    let port = number(c, "port", 5001, 1, 65535, "a TCP port, 1 to 65535")? as u16;
    let mode = match c.value("mode") {
        None | Some("bulk") => TcpMode::Bulk,
        Some("rr") => TcpMode::Rr,
        Some(v) => return Err(BadArg::new("mode", v, "bulk or rr")),
    };
    let bytes = match size(c, "bytes")? {
        None => 1 << 20,
        Some(n) if (1..=MAX_BULK_BYTES).contains(&n) => n,
        Some(_) => {
            return Err(BadArg::new(
                "bytes",
                c.value("bytes").unwrap_or(""),
                "a byte count from 1 to 1T (K, M, G, T suffixes allowed)",
            ))
        }
    };
    let count = number(
        c,
        "count",
        1000,
        1,
        u64::from(u32::MAX),
        "a number of round trips, 1 to 2^32-1",
    )?;
    let window = match size(c, "window")? {
        None => TCP_WINDOW,
        Some(n) if TCP_WINDOW_RANGE.contains(&n) => n,
        Some(_) => {
            return Err(BadArg::new(
                "window",
                c.value("window").unwrap_or(""),
                "bytes of each socket buffer, 2K to 1M (K and M suffixes allowed)",
            ))
        }
    };
    let size = match size(c, "size")? {
        None => 64,
        Some(n) if (1..=MAX_RR_SIZE).contains(&n) => n,
        Some(_) => {
            return Err(BadArg::new(
                "size",
                c.value("size").unwrap_or(""),
                "bytes of a request, 1 to 1M (K and M suffixes allowed)",
            ))
        }
    };
    Ok(TcpConfig {
        role,
        ip,
        prefix,
        peer,
        port,
        mode,
        bytes,
        count,
        size,
        window: window as usize,
        seed: number(c, "seed", 1, 0, u64::MAX, "a number")?,
        id: number(c, "id", 0, 0, u64::from(u32::MAX), "a 32-bit client id")? as u32,
        timeout_ms: number(
            c,
            "timeout_ms",
            60_000,
            1,
            u64::MAX / 1000,
            "milliseconds, at least 1",
        )?,
    })
}

fn parse_net(c: Cmdline<'_>) -> Result<NetConfig, BadArg> {
    let role = match c.value("role") {
        Some("send") => Role::Send,
        Some("echo") => Role::Echo,
        v => return Err(BadArg::new("role", v.unwrap_or(""), "send or echo")),
    };
    let peer =
        match c.value("peer") {
            None => None,
            Some(v) => Some(parse_mac(v).filter(|m| m[0] & 1 == 0).ok_or_else(|| {
                BadArg::new("peer", v, "a unicast MAC such as 52:54:00:00:00:0b")
            })?),
        };
    let count = optional(c, "count", 1, "a number of frames, at least 1")?;
    if count.is_some_and(|n| n > u64::from(u32::MAX)) {
        return Err(BadArg::new(
            "count",
            c.value("count").unwrap_or(""),
            "at most 2^32-1 frames",
        ));
    }
    let duration_ms = optional(c, "duration_ms", 1, "milliseconds, at least 1")?;
    let count = match (count, duration_ms) {
        (None, None) => Some(1000),
        (count, _) => count,
    };
    if role == Role::Send && peer.is_none() {
        return Err(BadArg::new("peer", "", "the echo client's MAC (role=send)"));
    }
    Ok(NetConfig {
        role,
        peer,
        count,
        duration_ms,
        window: number(c, "window", 8, 1, MAX_WINDOW, "frames in flight, 1 to 32")? as usize,
        seed: number(c, "seed", 1, 0, u64::MAX, "a number")?,
        id: number(c, "id", 0, 0, u64::from(u32::MAX), "a 32-bit client id")? as u32,
        retry_ms: number(c, "retry_ms", 50, 1, 60_000, "milliseconds, 1 to 60000")?,
        timeout_ms: number(
            c,
            "timeout_ms",
            60_000,
            1,
            u64::MAX,
            "milliseconds, at least 1",
        )?,
    })
}

fn parse_workload(c: Cmdline<'_>) -> Result<Config, BadArg> {
    let workload = match c.value("workload") {
        None => Workload::RandRw,
        Some(v) => Workload::ALL
            .into_iter()
            .find(|w| w.name() == v)
            .ok_or_else(|| {
                BadArg::new(
                    "workload",
                    v,
                    "randread, randwrite, randrw, seqread or seqwrite",
                )
            })?,
    };
    let rwmix = number(c, "rwmix", 70, 0, 100, "a percentage from 0 to 100")?;
    let bs = size(c, "bs")?.unwrap_or(4096);
    if !bs.is_multiple_of(SECTOR) || !(SECTOR..=MAX_BS).contains(&bs) {
        return Err(BadArg::new(
            "bs",
            c.value("bs").unwrap_or(""),
            "a multiple of 512 from 512 to 1M (bytes; K and M suffixes allowed)",
        ));
    }
    let qd = number(
        c,
        "qd",
        32,
        1,
        u64::from(MAX_QD),
        "a queue depth from 1 to 128",
    )?;
    let count = optional(c, "count", 1, "a number of requests, at least 1")?;
    let duration_ms = optional(c, "duration_ms", 1, "milliseconds, at least 1")?;
    let count = match (count, duration_ms) {
        (None, None) => Some(10_000),
        (count, _) => count,
    };
    let seed = number(c, "seed", 1, 0, u64::MAX, "a number")?;
    let id = number(c, "id", 0, 0, u64::from(u32::MAX), "a 32-bit client id")?;
    let span = size(c, "span")?;
    if let Some(span) = span {
        if span < bs {
            return Err(BadArg::new(
                "span",
                c.value("span").unwrap_or(""),
                alloc::format!("at least one block (bs={bs})"),
            ));
        }
    }
    let prefill = flag(c, "prefill", workload.reads())?;
    let flush_every = number(c, "flush_every", 0, 0, u64::MAX, "a number of writes")?;
    let flush = flag(c, "flush", true)?;
    let verify_pass = flag(c, "verify_pass", true)?;
    let timeout_ms = number(
        c,
        "timeout_ms",
        30_000,
        1,
        u64::MAX,
        "milliseconds, at least 1",
    )?;
    Ok(Config {
        workload,
        rwmix: rwmix as u32,
        bs,
        qd: qd as u32,
        count,
        duration_ms,
        seed,
        id: id as u32,
        span,
        prefill,
        flush_every,
        flush,
        verify_pass,
        timeout_ms,
    })
}

/// `key=N` within `min..=max`, or `default` when absent.
fn number(
    c: Cmdline<'_>,
    key: &'static str,
    default: u64,
    min: u64,
    max: u64,
    expected: &'static str,
) -> Result<u64, BadArg> {
    Ok(optional(c, key, min, expected)?
        .map(|n| {
            if n > max {
                Err(BadArg::new(key, c.value(key).unwrap_or(""), expected))
            } else {
                Ok(n)
            }
        })
        .transpose()?
        .unwrap_or(default))
}

/// `key=N` at least `min`, if present.
fn optional(
    c: Cmdline<'_>,
    key: &'static str,
    min: u64,
    expected: &'static str,
) -> Result<Option<u64>, BadArg> {
    let Some(v) = c.value(key) else {
        return Ok(None);
    };
    match parse_u64(v) {
        Some(n) if n >= min => Ok(Some(n)),
        _ => Err(BadArg::new(key, v, expected)),
    }
}

/// `key=0|1`, or `default` when absent.
fn flag(c: Cmdline<'_>, key: &'static str, default: bool) -> Result<bool, BadArg> {
    match c.value(key) {
        None => Ok(default),
        Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(v) => Err(BadArg::new(key, v, "0 or 1")),
    }
}

/// A byte count with an optional K, M, G or T suffix (powers of 1024).
fn size(c: Cmdline<'_>, key: &'static str) -> Result<Option<u64>, BadArg> {
    let Some(v) = c.value(key) else {
        return Ok(None);
    };
    parse_size(v)
        .map(Some)
        .ok_or_else(|| BadArg::new(key, v, "a byte count (K, M, G, T suffixes allowed)"))
}

/// A decimal number, or hexadecimal after `0x`.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A number (as [`parse_u64`]) with an optional K, M, G or T suffix, either case (as Linux's
/// `memparse`).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n = parse_u64(digits)?;
    n.checked_mul(1u64 << shift)
}
