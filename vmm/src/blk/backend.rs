//! What serves a disk's requests: a driver domain over its channel (the real path), or a file
//! read and written by the VMM itself (the baseline that measures what isolation costs).
//!
//! Both take their work from the same shadow queue and report finished parts the same way, so
//! the frontend and its tests are one code path for both.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ddvm_abi::channel::{op, status as cstatus, DeviceInfo};
use ddvm_recovery::shadow::{Op, ShadowQueue};

use super::device::ClientPort;
use super::request::status;
use super::service::{copy_part, Part, Pending, ServiceCounters};
use crate::channel::{DomainProtocolError, Done, HostChannel, SubmitError};
use crate::domain::Domain;

/// A part the backend finished.
#[derive(Clone, Copy, Debug)]
pub struct Finished {
    /// The part.
    pub part: Part,
    /// Virtio status byte for it.
    pub status: u8,
}

/// Why a backend stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The driver domain broke the channel protocol.
    #[error("driver domain broke the channel protocol: {0}")]
    Protocol(#[from] DomainProtocolError),
    /// A completion matched no shadow entry (cannot happen after the channel's checks).
    #[error("completion for tag {tag} matches no shadow entry")]
    Unmatched {
        /// Tag.
        tag: u32,
    },
    /// The service thread panicked.
    #[error("block service thread panicked")]
    Panicked,
    /// The service was already stopped.
    #[error("block service already stopped")]
    Stopped,
}

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

fn channel_op(o: Op) -> u16 {
    match o {
        Op::Read => op::READ,
        Op::Write => op::WRITE,
        Op::Flush => op::FLUSH,
        Op::WriteZeroes => op::WRITE_ZEROES,
        Op::Discard => op::DISCARD,
    }
}

fn virtio_status(channel_status: u16) -> u8 {
    match channel_status {
        cstatus::OK => status::OK,
        cstatus::UNSUPPORTED => status::UNSUPP,
        _ => status::IOERR,
    }
}

impl Backend {
    /// Largest part posted at once.
    pub fn max_transfer(&self) -> u64 {
        match self {
            Backend::Channel(c) => u64::from(c.channel.max_transfer()),
            Backend::File(_) => super::device::MAX_REQUEST,
        }
    }

    /// The disk as the backend sees it.
    pub fn info(&self) -> DiskInfo {
        match self {
            Backend::Channel(c) => c.disk,
            Backend::File(f) => f.disk,
        }
    }

    /// Posts queued parts while there is room.
    pub fn post(
        &mut self,
        shadow: &mut ShadowQueue<Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
    ) -> Result<usize, BackendError> {
        match self {
            Backend::Channel(c) => c.post(shadow, pending, ports, counters),
            Backend::File(f) => Ok(f.run(shadow, pending, ports, counters)),
        }
    }

    /// Takes finished parts into `out` (read data already copied to the client).
    pub fn collect(
        &mut self,
        shadow: &mut ShadowQueue<Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
        out: &mut Vec<Finished>,
    ) -> Result<usize, BackendError> {
        match self {
            Backend::Channel(c) => c.collect(shadow, pending, ports, counters, out),
            Backend::File(f) => {
                let n = f.done.len();
                out.append(&mut f.done);
                Ok(n)
            }
        }
    }

    /// Asks for (or stops asking for) a wake-up when completions arrive; returns whether
    /// some already did.
    pub fn arm(&mut self, on: bool) -> Result<bool, BackendError> {
        match self {
            Backend::Channel(c) => c.arm(on),
            Backend::File(f) => Ok(!f.done.is_empty()),
        }
    }

    /// The eventfd completions are signalled on.
    pub fn wait_fd(&self) -> Option<RawFd> {
        match self {
            Backend::Channel(c) => Some(c.domain.notify_eventfd().as_raw_fd()),
            Backend::File(_) => None,
        }
    }
}

/// A driver domain serving the disk over its channel.
pub struct ChannelBackend {
    domain: Domain,
    channel: HostChannel,
    disk: DiskInfo,
    done: Vec<Done>,
}

/// Why a channel backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelSetupError {
    /// The domain has no channel.
    #[error("domain {0} has no channel")]
    NoChannel(String),
    /// Its device info is invalid.
    #[error("domain {name}: {source}")]
    DeviceInfo {
        /// Domain.
        name: String,
        /// Cause.
        #[source]
        source: DomainProtocolError,
    },
    /// The domain serves no disk.
    #[error("domain {0} reports no disk")]
    NoDisk(String),
}

impl ChannelBackend {
    /// Serves through `domain`, which must be ready.
    pub fn new(domain: Domain) -> Result<ChannelBackend, ChannelSetupError> {
        let name = domain.name().to_string();
        let (Some(base), Some(header)) = (domain.channel(), domain.channel_header()) else {
            return Err(ChannelSetupError::NoChannel(name));
        };
        let mut channel = HostChannel::new(base, header);
        let info: DeviceInfo = channel.device_info(domain.memory()).map_err(|source| {
            ChannelSetupError::DeviceInfo {
                name: name.clone(),
                source,
            }
        })?;
        if info.capacity_sectors == 0 {
            return Err(ChannelSetupError::NoDisk(name));
        }
        let disk = DiskInfo {
            sectors: info.capacity_sectors,
            block_size: info.block_size,
            discard: info.flags & ddvm_abi::channel::device_flags::DISCARD != 0,
            write_zeroes: info.flags & ddvm_abi::channel::device_flags::WRITE_ZEROES != 0,
        };
        Ok(ChannelBackend {
            domain,
            channel,
            disk,
            done: Vec::new(),
        })
    }

    /// The domain.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The channel.
    pub fn channel(&self) -> &HostChannel {
        &self.channel
    }

    fn post(
        &mut self,
        shadow: &mut ShadowQueue<Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
    ) -> Result<usize, BackendError> {
        let mem = self.domain.memory().clone();
        let epoch = self.channel.epoch();
        let mut n = 0;
        while self.channel.has_room() {
            let Some(e) = shadow.next_queued() else { break };
            let (seq, o, sector, sectors, part) = (e.seq, e.op, e.sector, e.sectors, e.client);
            let Some(p) = pending.get(&part.rid) else {
                // Its client request is gone (cannot happen: entries leave with it).
                shadow.remove(seq);
                continue;
            };
            let client = &ports[p.port].mem;
            let r =
                self.channel
                    .submit_with(&mem, channel_op(o), sector, sectors, |dmem, gpa, len| {
                        let len = (len as u64).min(part.len);
                        let segments = p.data.slice(part.offset, len);
                        copy_part(client, &segments, dmem, gpa, false, counters);
                    });
            match r {
                Ok(tag) => {
                    shadow.posted(seq, tag, epoch, Instant::now());
                    n += 1;
                }
                Err(SubmitError::Full) => break,
                Err(SubmitError::Broken) => {
                    return Err(self
                        .channel
                        .broken()
                        .map_or(BackendError::Stopped, BackendError::Protocol))
                }
                Err(SubmitError::TooLarge { .. }) => {
                    // Parts are cut to the channel's limit; never reached.
                    shadow.remove(seq);
                }
            }
        }
        if n > 0 && self.channel.publish(&mem) {
            self.domain.kick();
        }
        Ok(n)
    }

    fn collect(
        &mut self,
        shadow: &mut ShadowQueue<Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
        out: &mut Vec<Finished>,
    ) -> Result<usize, BackendError> {
        let mem = self.domain.memory().clone();
        let epoch = self.channel.epoch();
        self.done.clear();
        let n = self.channel.poll(&mem, &mut self.done)?;
        for d in std::mem::take(&mut self.done) {
            let tag = d.request.tag;
            let entry = shadow
                .complete(tag, epoch)
                .map_err(|_| BackendError::Unmatched { tag })?;
            let part = entry.client;
            let mut st = virtio_status(d.status);
            if entry.op == Op::Read && st == status::OK {
                if u64::from(d.len) != part.len {
                    st = status::IOERR;
                } else if let Some(p) = pending.get(&part.rid) {
                    let port = &ports[p.port];
                    let guard = port.lock();
                    if guard.generation == p.generation {
                        let gpa = self.channel.slot_address(&d);
                        let segments = p.data.slice(part.offset, part.len);
                        if !copy_part(&port.mem, &segments, &mem, gpa, true, counters) {
                            st = status::IOERR;
                        }
                    }
                }
            }
            self.channel.finish(&mem, &d, None);
            out.push(Finished { part, status: st });
        }
        Ok(n)
    }

    fn arm(&mut self, on: bool) -> Result<bool, BackendError> {
        let mem = self.domain.memory().clone();
        self.channel.set_notify(&mem, on);
        if !on {
            let _ = self.domain.notify_eventfd().read();
            return Ok(false);
        }
        // A completion published before NOTIFY_ME was seen would not be notified: look.
        Ok(self.channel.poll_pending(&mem)?)
    }
}

/// A file served directly by the VMM (the baseline).
pub struct FileBackend {
    file: File,
    path: PathBuf,
    disk: DiskInfo,
    buf: Vec<u8>,
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
            buf: vec![0; super::device::MAX_REQUEST as usize],
            done: Vec::new(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs every queued part now.
    fn run(
        &mut self,
        shadow: &mut ShadowQueue<Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
    ) -> usize {
        let mut n = 0;
        while let Some(e) = shadow.next_queued() {
            let (seq, o, sector, sectors, part) = (e.seq, e.op, e.sector, e.sectors, e.client);
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
            let ok = match o {
                Op::Read => {
                    let buf = &mut self.buf[..part.len as usize];
                    self.file.read_exact_at(buf, offset).is_ok() && {
                        let guard = port.lock();
                        guard.generation != p.generation
                            || timed_copy(counters, part.len, || {
                                p.data
                                    .slice(part.offset, part.len)
                                    .write_from(&port.mem, buf)
                                    .is_ok()
                            })
                    }
                }
                Op::Write => {
                    let buf = &mut self.buf[..part.len as usize];
                    timed_copy(counters, part.len, || {
                        p.data
                            .slice(part.offset, part.len)
                            .read_into(&port.mem, buf)
                            .is_ok()
                    }) && self.file.write_all_at(buf, offset).is_ok()
                }
                Op::Flush => self.file.sync_data().is_ok(),
                Op::Discard => punch(&self.file, offset, bytes, libc::FALLOC_FL_PUNCH_HOLE),
                Op::WriteZeroes => punch(&self.file, offset, bytes, libc::FALLOC_FL_ZERO_RANGE),
            };
            self.done.push(Finished {
                part,
                status: if ok { status::OK } else { status::IOERR },
            });
        }
        n
    }
}

fn timed_copy(counters: &ServiceCounters, len: u64, f: impl FnOnce() -> bool) -> bool {
    use std::sync::atomic::Ordering;
    let t = Instant::now();
    let ok = f();
    counters
        .copy_ns
        .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    counters.copy_bytes.fetch_add(len, Ordering::Relaxed);
    ok
}

/// Deallocates (discard) or zeroes a byte range of the file, keeping its size.
fn punch(file: &File, offset: u64, len: u64, mode: libc::c_int) -> bool {
    // SAFETY: fallocate on a file descriptor we own, with plain integer arguments; it touches
    // no memory of ours.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    r == 0
}
