//! A TAP device of the host: frames written to it enter the host's network stack on that
//! interface, frames the host sends out of it are read here.
//!
//! [`TapWire::open`] attaches to (or creates, which needs `CAP_NET_ADMIN`) the interface in
//! the calling thread's network namespace through `/dev/net/tun` with `IFF_TAP | IFF_NO_PI`
//! (raw Ethernet frames, no packet information header), non-blocking. Bringing the interface
//! up and addressing it is the operator's business. A frame the host sends that is longer
//! than [`Wire::max_frame`] (an interface MTU above it) is dropped and counted; a frame the
//! device cannot take now (`EAGAIN`) is dropped and counted.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{check_buffer, check_frame, would_block, Wire, WireError, WireStats, MIN_FRAME};

/// The clone device.
const TUN_PATH: &str = "/dev/net/tun";
/// Reads take up to this much, so a frame longer than the wire's limit is seen whole and
/// dropped rather than truncated.
const READ_BUFFER: usize = 64 * 1024;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags (a union of 24 bytes on
/// 64-bit Linux, of which only the leading `short` is used here).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// A wire over a TAP interface (see the module docs).
pub struct TapWire {
    file: File,
    name: String,
    max_frame: usize,
    scratch: Vec<u8>,
    stats: WireStats,
}

impl TapWire {
    /// Opens the TAP interface `name` (created if it does not exist; at most 15 bytes) for
    /// frames up to `max_frame` bytes.
    pub fn open(name: &str, max_frame: usize) -> Result<TapWire, WireError> {
        let io = |what: &str| {
            let what = format!("TAP {name}: {what}");
            move |source| WireError::Io { what, source }
        };
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io("name")(std::io::ErrorKind::InvalidInput.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(io("open /dev/net/tun"))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _rest: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its layout and size
        // (40 bytes: a 16-byte name and a 24-byte union) and lives across the call, and the
        // descriptor is the clone device we just opened.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(io("TUNSETIFF")(std::io::Error::last_os_error()));
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        Ok(TapWire {
            file,
            name: String::from_utf8_lossy(&req.name[..end]).into_owned(),
            max_frame,
            scratch: vec![0; READ_BUFFER.max(max_frame + 1)],
            stats: WireStats::default(),
        })
    }

    /// The interface's name as the kernel knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another wire on the same open TAP (a duplicated descriptor: the same interface, in
    /// the network namespace the first was opened in), with counters of its own.
    pub fn try_clone(&self) -> Result<TapWire, WireError> {
        let file = self.file.try_clone().map_err(|source| WireError::Io {
            what: format!("TAP {}: duplicate the descriptor", self.name),
            source,
        })?;
        Ok(TapWire {
            file,
            name: self.name.clone(),
            max_frame: self.max_frame,
            scratch: vec![0; self.scratch.len()],
            stats: WireStats::default(),
        })
    }
}

impl Wire for TapWire {
    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        check_frame(frame, self.max_frame)?;
        match self.file.write(frame) {
            Ok(n) if n == frame.len() => self.stats.sent += 1,
            // Short write (does not happen on a TAP), full queue, interface down: lost.
            Ok(_) | Err(_) => self.stats.send_dropped += 1,
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        check_buffer(buf, self.max_frame)?;
        loop {
            let n = match self.file.read(&mut self.scratch) {
                Ok(n) => n,
                Err(e) if would_block(&e) => return Ok(None),
                Err(e) => {
                    return Err(WireError::Io {
                        what: format!("TAP {}: read", self.name),
                        source: e,
                    })
                }
            };
            if !(MIN_FRAME..=self.max_frame).contains(&n) {
                self.stats.recv_dropped += 1;
                continue;
            }
            buf[..n].copy_from_slice(&self.scratch[..n]);
            self.stats.received += 1;
            return Ok(Some(n));
        }
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn stats(&self) -> WireStats {
        self.stats
    }
}
