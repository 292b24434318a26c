//! What serves a disk's requests: a driver domain over its channel (the real path), or a file
//! read and written by the VMM itself (the baseline that measures what isolation costs).
//!
//! Both take their work from the same shadow queue and report finished parts the same way, so
//! the frontend and its tests are one code path for both.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ddvm_passthrough::fileio;
use ddvm_recovery::shadow::ShadowQueue;

use super::replay::{BlockOp, Op};

use super::device::ClientPort;
use super::request::status;
use super::service::{Part, Pending, ServiceCounters};

/// A part the backend finished.
#[derive(Clone, Copy, Debug)]
pub struct Finished {
    /// The part.
    pub part: Part,
    /// Virtio status byte for it.
    pub status: u8,
}

/// Why a block service could not hand its backend back. (Backends never stop serving on
/// their own: a failing driver domain is restarted, not reported.)
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The service thread panicked.
    #[error("block service thread panicked")]
    Panicked,
    /// The service was already stopped.
    #[error("block service already stopped")]
    Stopped,
}

pub use super::class::ChannelBackend;

/// A disk's backend.
pub enum Backend {
    /// Through a driver domain.
    Channel(Box<ChannelBackend>),
    /// Directly from a file.
    File(FileBackend),
}

/// The geometry a backend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Discard is supported.
    pub discard: bool,
    /// Write zeroes is supported.
    pub write_zeroes: bool,
}

impl Backend {
    /// Largest part posted at once.
    pub fn max_transfer(&self) -> u64 {
        match self {
            Backend::Channel(c) => u64::from(c.max_transfer()),
            Backend::File(_) => super::device::MAX_REQUEST,
        }
    }

    /// The disk as the backend sees it.
    pub fn info(&self) -> DiskInfo {
        match self {
            Backend::Channel(c) => c.disk(),
            Backend::File(f) => f.disk,
        }
    }

    /// Posts queued parts while there is room.
    pub fn post(
        &mut self,
        shadow: &mut ShadowQueue<BlockOp, Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
    ) -> usize {
        match self {
            Backend::Channel(c) => c.post(shadow, pending, ports, counters),
            Backend::File(f) => f.run(shadow, pending, ports),
        }
    }

    /// Takes finished parts into `out` (read data already copied to the client).
    pub fn collect(
        &mut self,
        shadow: &mut ShadowQueue<BlockOp, Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
        out: &mut Vec<Finished>,
    ) -> usize {
        match self {
            Backend::Channel(c) => c.collect(shadow, pending, ports, counters, out),
            Backend::File(f) => {
                let n = f.done.len();
                out.append(&mut f.done);
                n
            }
        }
    }

    /// Asks for (or stops asking for) a wake-up when completions arrive; returns whether
    /// some already did.
    pub fn arm(&mut self, on: bool) -> bool {
        match self {
            Backend::Channel(c) => c.arm(on),
            Backend::File(f) => !f.done.is_empty(),
        }
    }

    /// Eventfds that wake the service for the backend.
    pub fn wait_fds(&self) -> Vec<RawFd> {
        match self {
            Backend::Channel(c) => c.wait_fds(),
            Backend::File(_) => Vec::new(),
        }
    }

    /// Whether a driver domain's waits watch the clients' notifications now (see
    /// [`super::ChannelBackend::clients_watched`]): the service need not.
    pub fn clients_watched(&self) -> bool {
        match self {
            Backend::Channel(c) => c.clients_watched(),
            Backend::File(_) => false,
        }
    }

    /// Longest sleep the backend allows (its timers).
    pub fn sleep_limit(&self) -> std::time::Duration {
        match self {
            Backend::Channel(c) => c.sleep_limit(),
            Backend::File(_) => std::time::Duration::from_millis(50),
        }
    }

    /// Whether an orderly stop may go on to its final flush (see [`crate::stop`]).
    pub fn settled(&self, shadow: &ShadowQueue<BlockOp, Part>) -> bool {
        match self {
            Backend::Channel(c) => c.settled(shadow),
            Backend::File(_) => true,
        }
    }

    /// The end of an orderly stop that began at `started`: everything acknowledged made
    /// durable, the device shut down (see [`crate::stop`]). `unanswered`: client requests
    /// the stop stopped waiting for.
    pub fn shut_down(&mut self, started: Instant, unanswered: usize) -> crate::stop::StopReport {
        match self {
            Backend::Channel(c) => c.shut_down(started, unanswered),
            Backend::File(f) => {
                let how = match f.file.sync_data() {
                    Ok(()) => crate::stop::StopHow::File,
                    Err(e) => crate::stop::StopHow::Failed {
                        why: format!("fdatasync: {e}"),
                    },
                };
                crate::stop::StopReport {
                    disk: f.path.display().to_string(),
                    how,
                    took: started.elapsed(),
                    unanswered,
                    at_risk: 0,
                }
            }
        }
    }
}

/// A file served directly by the VMM (the baseline).
pub struct FileBackend {
    file: File,
    path: PathBuf,
    disk: DiskInfo,
    done: Vec<Finished>,
}

impl FileBackend {
    /// Opens `path` (it must exist, a whole number of `block_size` blocks).
    pub fn open(path: &Path, block_size: u32) -> std::io::Result<FileBackend> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(FileBackend {
            file,
            path: path.to_path_buf(),
            disk: DiskInfo {
                sectors: len / u64::from(block_size) * u64::from(block_size) / 512,
                block_size,
                discard: true,
                write_zeroes: true,
            },
            done: Vec::new(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs every queued part now, the data going straight between the file and the client's
    /// buffers (no copy, as a production virtio-blk backend does).
    fn run(
        &mut self,
        shadow: &mut ShadowQueue<BlockOp, Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
    ) -> usize {
        let mut n = 0;
        while let Some(e) = shadow.next_queued() {
            let (seq, o, sector, sectors, part) =
                (e.seq, e.op.kind, e.op.sector, e.op.sectors, e.client);
            let now = Instant::now();
            shadow.posted(seq, seq as u32, 0, now);
            let _ = shadow.complete(seq as u32, 0);
            n += 1;
            let Some(p) = pending.get(&part.rid) else {
                continue;
            };
            let port = &ports[p.port];
            let offset = sector * 512;
            let bytes = u64::from(sectors) * 512;
            let segs = p.data.slice(part.offset, part.len);
            // A client that reset its device since wants no answer, and its buffers may hold
            // something else now: nothing is read from them or written into them, and the
            // request is not executed. Reads and writes copy under the port's lock, so a
            // reset cannot pass between this check and the copy.
            let current = port.lock();
            if current.generation != p.generation {
                drop(current);
                self.done.push(Finished {
                    part,
                    status: status::IOERR,
                });
                continue;
            }
            let ok = match o {
                Op::Read => segs
                    .with_slices(&port.mem, |s| fileio::read_exact_at(&self.file, offset, s))
                    .is_ok_and(|r| r.is_ok()),
                Op::Write => segs
                    .with_slices(&port.mem, |s| fileio::write_all_at(&self.file, offset, s))
                    .is_ok_and(|r| r.is_ok()),
                Op::Flush | Op::Discard | Op::WriteZeroes => {
                    drop(current);
                    match o {
                        Op::Flush => self.file.sync_data().is_ok(),
                        Op::Discard => fileio::zero_range(&self.file, offset, bytes, true).is_ok(),
                        _ => fileio::zero_range(&self.file, offset, bytes, false).is_ok(),
                    }
                }
            };
            self.done.push(Finished {
                part,
                status: if ok { status::OK } else { status::IOERR },
            });
        }
        n
    }
}
