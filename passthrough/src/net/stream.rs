//! A Unix stream socket speaking QEMU's `-netdev stream` framing: each frame is preceded by
//! its length as a 4-byte big-endian number.
//!
//! Connect mode ([`StreamWire::connect`]) joins a peer listening on a path (QEMU with
//! `-netdev stream,server=on,addr.type=unix,addr.path=P`); listen mode
//! ([`StreamWire::listen`], then [`StreamListener::accept`]) waits for one peer to connect
//! (QEMU with `server=off`).
//!
//! Receiving reassembles frames from reads of any size. A frame shorter than an Ethernet header
//! ([`super::MIN_FRAME`]) is dropped and counted; a length above [`Wire::max_frame`] cannot be resynchronised and is a
//! protocol error that closes the wire, as does the peer closing the socket. Sending never
//! blocks: what the socket cannot take yet waits in a buffer of at most
//! [`SEND_BACKLOG`] bytes and goes out with the next send or receive; a frame that would
//! overflow the backlog is dropped whole (a frame is never cut, which would break the framing).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    check_buffer, check_frame, poll_readable, would_block, Wire, WireError, WireStats, MIN_FRAME,
};

/// Bytes of frames a stream wire keeps waiting for the socket before it drops new frames.
pub const SEND_BACKLOG: usize = 64 * 1024;
/// Bytes of the length prefix.
const HEADER: usize = 4;

/// A listening socket waiting for the peer of a [`StreamWire`].
pub struct StreamListener {
    listener: UnixListener,
    path: PathBuf,
    max_frame: usize,
}

impl StreamListener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for a peer to connect and returns the wire to it.
    pub fn accept(&self, timeout: Duration) -> Result<StreamWire, WireError> {
        let what = || format!("stream wire on {}: accept", self.path.display());
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        if !poll_readable(&[self.listener.as_raw_fd()], ms)[0] {
            return Err(WireError::Io {
                what: what(),
                source: io::ErrorKind::TimedOut.into(),
            });
        }
        let (stream, _) = self.listener.accept().map_err(|source| WireError::Io {
            what: what(),
            source,
        })?;
        StreamWire::new(stream, self.max_frame, self.path.clone())
    }
}

impl Drop for StreamListener {
    fn drop(&mut self) {
        // The path was ours: bind created it.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A wire over a connected Unix stream socket (see the module docs).
pub struct StreamWire {
    stream: UnixStream,
    path: PathBuf,
    max_frame: usize,
    /// Bytes read and not yet returned as frames (at most one length prefix and one frame).
    rx: Vec<u8>,
    /// Bytes of frames not yet written to the socket.
    tx: Vec<u8>,
    /// Why the wire closed, once it did.
    closed: Option<String>,
    stats: WireStats,
}

impl StreamWire {
    /// Connects to a peer listening at `path`; frames up to `max_frame` bytes.
    pub fn connect(path: &Path, max_frame: usize) -> Result<StreamWire, WireError> {
        let stream = UnixStream::connect(path).map_err(|source| WireError::Io {
            what: format!("stream wire: connect to {}", path.display()),
            source,
        })?;
        StreamWire::new(stream, max_frame, path.to_path_buf())
    }

    /// Listens at `path` (which must not exist) for one peer; frames up to `max_frame` bytes.
    pub fn listen(path: &Path, max_frame: usize) -> Result<StreamListener, WireError> {
        let listener = UnixListener::bind(path).map_err(|source| WireError::Io {
            what: format!("stream wire: listen on {}", path.display()),
            source,
        })?;
        Ok(StreamListener {
            listener,
            path: path.to_path_buf(),
            max_frame,
        })
    }

    /// A wire over `stream`, already connected (a socketpair, for instance).
    pub fn new(
        stream: UnixStream,
        max_frame: usize,
        path: PathBuf,
    ) -> Result<StreamWire, WireError> {
        stream
            .set_nonblocking(true)
            .map_err(|source| WireError::Io {
                what: format!("stream wire on {}: non-blocking mode", path.display()),
                source,
            })?;
        Ok(StreamWire {
            stream,
            path,
            max_frame,
            rx: Vec::with_capacity(HEADER + max_frame),
            tx: Vec::new(),
            closed: None,
            stats: WireStats::default(),
        })
    }

    /// Why the wire closed, if it did.
    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    fn close(&mut self, reason: String) -> WireError {
        tracing::warn!("stream wire on {}: {reason}", self.path.display());
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.rx.clear();
        self.tx.clear();
        self.closed = Some(reason.clone());
        WireError::Closed { reason }
    }

    fn check_open(&self) -> Result<(), WireError> {
        match &self.closed {
            Some(reason) => Err(WireError::Closed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Writes as much of the backlog as the socket takes now.
    fn flush(&mut self) -> Result<(), WireError> {
        while !self.tx.is_empty() {
            match self.stream.write(&self.tx) {
                Ok(0) => return Err(self.close("the peer stopped reading".into())),
                Ok(n) => {
                    self.tx.drain(..n);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(self.close(format!("write: {e}"))),
            }
        }
        Ok(())
    }

    /// A complete frame at the start of `rx`: its length, or `None` if more bytes are
    /// needed. A length above the limit closes the wire.
    fn buffered_frame(&mut self) -> Result<Option<usize>, WireError> {
        let Some(header) = self.rx.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        if len > self.max_frame {
            let max = self.max_frame;
            return Err(self.close(format!(
                "the peer announced a frame of {len} bytes; the limit is {max}"
            )));
        }
        Ok((self.rx.len() >= HEADER + len).then_some(len))
    }
}

impl Wire for StreamWire {
    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        self.check_open()?;
        check_frame(frame, self.max_frame)?;
        self.flush()?;
        if self.tx.len() + HEADER + frame.len() > SEND_BACKLOG {
            self.stats.send_dropped += 1;
            return Ok(());
        }
        self.tx
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.tx.extend_from_slice(frame);
        self.stats.sent += 1;
        self.flush()
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        self.check_open()?;
        check_buffer(buf, self.max_frame)?;
        self.flush()?;
        loop {
            if let Some(len) = self.buffered_frame()? {
                let frame = &self.rx[HEADER..HEADER + len];
                let n = frame.len();
                buf[..n].copy_from_slice(frame);
                self.rx.drain(..HEADER + len);
                if n < MIN_FRAME {
                    self.stats.recv_dropped += 1;
                    continue;
                }
                self.stats.received += 1;
                return Ok(Some(n));
            }
            // Read no further than the end of the frame under way, so `rx` stays bounded.
            let want = match self.rx.first_chunk::<HEADER>() {
                Some(h) => HEADER + u32::from_be_bytes(*h) as usize,
                None => HEADER,
            };
            let have = self.rx.len();
            self.rx.resize(want, 0);
            match self.stream.read(&mut self.rx[have..]) {
                Ok(0) => {
                    self.rx.truncate(have);
                    return Err(self.close("the peer closed the connection".into()));
                }
                Ok(n) => self.rx.truncate(have + n),
                Err(e) if would_block(&e) => {
                    self.rx.truncate(have);
                    return Ok(None);
                }
                Err(e) => {
                    self.rx.truncate(have);
                    return Err(self.close(format!("read: {e}")));
                }
            }
        }
    }

    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn stats(&self) -> WireStats {
        self.stats
    }
}
