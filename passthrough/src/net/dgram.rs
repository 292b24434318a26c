//! A Unix datagram socket speaking QEMU's `-netdev dgram` framing: one frame per datagram.
//!
//! Connect mode ([`DgramWire::connect`]) binds a local path and sends to the peer's (QEMU with
//! `-netdev dgram,local.type=unix,local.path=L,remote.type=unix,remote.path=R`, the paths
//! crossed); listen mode ([`DgramWire::listen`]) binds a local path and answers whoever sent
//! the last datagram: frames sent before anyone did are dropped and counted.
//!
//! A datagram shorter than an Ethernet header or longer than [`Wire::max_frame`] is dropped
//! and counted. A datagram socket has no connection to lose: a peer that is gone or not
//! reading makes sends drop (counted), and the wire never closes.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

use super::{check_buffer, check_frame, would_block, Wire, WireError, WireStats, MIN_FRAME};

/// A wire over a Unix datagram socket (see the module docs).
pub struct DgramWire {
    socket: UnixDatagram,
    local: PathBuf,
    /// Where frames go: fixed in connect mode, the last sender in listen mode.
    peer: Option<PathBuf>,
    /// Listen mode: follow the last sender.
    learn: bool,
    max_frame: usize,
    /// Receive buffer: one byte more than the largest frame, to see an oversized datagram.
    scratch: Vec<u8>,
    stats: WireStats,
}

impl DgramWire {
    /// Binds `local` (which must not exist) and sends to `remote`; frames up to `max_frame`
    /// bytes.
    pub fn connect(local: &Path, remote: &Path, max_frame: usize) -> Result<DgramWire, WireError> {
        let mut w = DgramWire::bind(local, max_frame)?;
        w.peer = Some(remote.to_path_buf());
        Ok(w)
    }

    /// Binds `local` (which must not exist) and answers the last sender; frames up to
    /// `max_frame` bytes.
    pub fn listen(local: &Path, max_frame: usize) -> Result<DgramWire, WireError> {
        let mut w = DgramWire::bind(local, max_frame)?;
        w.learn = true;
        Ok(w)
    }

    fn bind(local: &Path, max_frame: usize) -> Result<DgramWire, WireError> {
        let io = |what: &str| {
            let what = format!("datagram wire on {}: {what}", local.display());
            move |source| WireError::Io { what, source }
        };
        let socket = UnixDatagram::bind(local).map_err(io("bind"))?;
        socket
            .set_nonblocking(true)
            .map_err(io("non-blocking mode"))?;
        Ok(DgramWire {
            socket,
            local: local.to_path_buf(),
            peer: None,
            learn: false,
            max_frame,
            scratch: vec![0; max_frame + 1],
            stats: WireStats::default(),
        })
    }

    /// The local socket's path.
    pub fn local(&self) -> &Path {
        &self.local
    }

    /// Where frames go now, if anywhere.
    pub fn peer(&self) -> Option<&Path> {
        self.peer.as_deref()
    }

    fn learn_from(&mut self, from: &SocketAddr) {
        if self.learn {
            if let Some(p) = from.as_pathname() {
                if self.peer.as_deref() != Some(p) {
                    self.peer = Some(p.to_path_buf());
                }
            }
        }
    }
}

impl Wire for DgramWire {
    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        check_frame(frame, self.max_frame)?;
        let Some(peer) = &self.peer else {
            self.stats.send_dropped += 1;
            return Ok(());
        };
        match self.socket.send_to(frame, peer) {
            Ok(n) if n == frame.len() => self.stats.sent += 1,
            // A short datagram send does not happen on Unix sockets; count it as lost.
            Ok(_) => self.stats.send_dropped += 1,
            // Full (EAGAIN), peer gone (ECONNREFUSED, ENOENT): the frame is lost, as on a
            // network.
            Err(_) => self.stats.send_dropped += 1,
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        check_buffer(buf, self.max_frame)?;
        loop {
            let (n, from) = match self.socket.recv_from(&mut self.scratch) {
                Ok(r) => r,
                Err(e) if would_block(&e) => return Ok(None),
                // A pending socket error is reported once and consumed: count it as a lost
                // frame and go on.
                Err(_) => {
                    self.stats.recv_dropped += 1;
                    continue;
                }
            };
            if !(MIN_FRAME..=self.max_frame).contains(&n) {
                self.stats.recv_dropped += 1;
                continue;
            }
            self.learn_from(&from);
            buf[..n].copy_from_slice(&self.scratch[..n]);
            self.stats.received += 1;
            return Ok(Some(n));
        }
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn stats(&self) -> WireStats {
        self.stats
    }
}

impl Drop for DgramWire {
    fn drop(&mut self) {
        // The path was ours: bind created it.
        let _ = std::fs::remove_file(&self.local);
    }
}
