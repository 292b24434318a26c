//! The virtio-blk device a client guest sees, and the port it shares with the block service.
//!
//! The device lives on the client's MMIO bus (driven by its vCPU thread) and owns nothing but
//! its configuration; the queue goes to the [`ClientPort`], where the block service thread
//! serves it. The port's lock orders the two: a reset takes the queue away under the lock, and
//! the service completes a request only under the lock and only if the queue's generation is
//! still the one the request came from. So after a reset returns, nothing more is written into
//! the client's memory for requests it abandoned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_blk as b;
use virtio_queue::{Queue, QueueT};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::request::Limits;
use crate::memory::GuestMem;
use crate::virtio::{features, ActivateError, Interrupt, VirtioDevice};

/// Virtio device ID of a block device.
pub const DEVICE_ID: u32 = 2;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Segments per request advertised (SEG_MAX): the queue size less header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment advertised (SIZE_MAX).
pub const SIZE_MAX: u32 = 64 << 10;
/// Largest data of one request the device accepts (split into channel-sized parts): all a
/// driver that keeps to SEG_MAX and SIZE_MAX can send. (Without SIZE_MAX a Linux driver
/// sends requests of megabytes in few large segments, which a smaller limit failed.)
pub const MAX_REQUEST: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Most request queues a device offers (MQ): one per vCPU of the largest client.
pub const MAX_QUEUES: u16 = 32;
/// Optimal request size advertised (TOPOLOGY).
const OPT_IO: u64 = 1 << 20;

/// The client's window on the disk: device sectors `[first, first + sectors)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbaRange {
    /// First device sector.
    pub first: u64,
    /// Sectors.
    pub sectors: u64,
}

/// What the client's device looks like.
#[derive(Clone, Debug)]
pub struct BlockGeometry {
    /// The client's range of the disk.
    pub range: LbaRange,
    /// Logical block size (512 or 4096).
    pub block_size: u32,
    /// Refuse changes.
    pub read_only: bool,
    /// Offer DISCARD.
    pub discard: bool,
    /// Offer WRITE_ZEROES.
    pub write_zeroes: bool,
    /// ID string answered to GET_ID (at most 20 bytes).
    pub serial: String,
    /// Request queues offered (1 to [`MAX_QUEUES`]; more than one offers MQ).
    pub queues: u16,
}

impl BlockGeometry {
    /// The parser's limits.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.range.sectors,
            max_data: MAX_REQUEST,
            read_only: self.read_only,
            discard: self.discard,
            write_zeroes: self.write_zeroes,
            max_dwz_sectors: self.max_dwz_sectors(),
            block_sectors: u64::from(self.block_size / 512),
            max_segments: SEG_MAX,
        }
    }

    /// Largest discard / write-zeroes: one NVMe command's worth (65,536 blocks).
    fn max_dwz_sectors(&self) -> u32 {
        let per_block = u64::from(self.block_size / 512);
        self.range.sectors.min(65_536 * per_block) as u32
    }

    /// Features offered.
    pub fn features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::INDIRECT_DESC
            | features::EVENT_IDX
            | 1 << b::VIRTIO_BLK_F_SEG_MAX
            | 1 << b::VIRTIO_BLK_F_SIZE_MAX
            | 1 << b::VIRTIO_BLK_F_BLK_SIZE
            | 1 << b::VIRTIO_BLK_F_FLUSH
            | 1 << b::VIRTIO_BLK_F_TOPOLOGY;
        if self.read_only {
            f |= 1 << b::VIRTIO_BLK_F_RO;
        }
        if self.discard {
            f |= 1 << b::VIRTIO_BLK_F_DISCARD;
        }
        if self.write_zeroes {
            f |= 1 << b::VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.queues > 1 {
            f |= 1 << b::VIRTIO_BLK_F_MQ;
        }
        f
    }

    /// Request queues offered, within 1 to [`MAX_QUEUES`].
    pub fn queue_count(&self) -> u16 {
        self.queues.clamp(1, MAX_QUEUES)
    }

    /// The configuration space (struct virtio_blk_config, little endian).
    pub fn config(&self) -> b::virtio_blk_config {
        b::virtio_blk_config {
            capacity: self.range.sectors.to_le(),
            seg_max: SEG_MAX.to_le(),
            size_max: SIZE_MAX.to_le(),
            blk_size: self.block_size.to_le(),
            // One logical block per physical block.
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1u16.to_le(),
            opt_io_size: ((OPT_IO / u64::from(self.block_size)) as u32).to_le(),
            max_discard_sectors: self.max_dwz_sectors().to_le(),
            max_discard_seg: 1u32.to_le(),
            discard_sector_alignment: (self.block_size / 512).to_le(),
            max_write_zeroes_sectors: self.max_dwz_sectors().to_le(),
            max_write_zeroes_seg: 1u32.to_le(),
            write_zeroes_may_unmap: 0,
            num_queues: self.queue_count().to_le(),
            ..Default::default()
        }
    }
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Config(b::virtio_blk_config);
// SAFETY: virtio_blk_config is a plain repr(C) struct of integers; any bytes are a valid value.
unsafe impl ByteValued for Config {}

/// Counters of one client port.
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Times the queue was found unusable (DEVICE_NEEDS_RESET).
    pub needs_reset: AtomicU64,
}

/// The queues as the service sees them.
pub struct PortState {
    /// The request queues by index, while the driver has the device running (`None`: a
    /// queue it left unused).
    pub queues: Vec<Option<Queue>>,
    /// Bumped at every activation and reset.
    pub generation: u64,
    /// The service gave up on this queue until the driver resets the device.
    pub needs_reset: bool,
}

/// One client's virtio-blk device as the block service serves it.
pub struct ClientPort {
    /// Name (for logs and reports).
    pub name: String,
    /// The client's memory.
    pub mem: GuestMem,
    /// Geometry and the range of the disk.
    pub geometry: BlockGeometry,
    /// Queue notifications (the QueueNotify ioeventfd); activation also writes it.
    pub notify: EventFd,
    /// The client's interrupt.
    pub interrupt: Interrupt,
    /// Counters.
    pub counters: PortCounters,
    state: Mutex<PortState>,
}

impl ClientPort {
    /// A port for a client with memory `mem`.
    pub fn new(
        name: &str,
        mem: GuestMem,
        geometry: BlockGeometry,
        interrupt: Interrupt,
    ) -> std::io::Result<Arc<ClientPort>> {
        Ok(Arc::new(ClientPort {
            name: name.to_string(),
            mem,
            geometry,
            notify: EventFd::new(libc::EFD_NONBLOCK)?,
            interrupt,
            counters: PortCounters::default(),
            state: Mutex::new(PortState {
                queues: Vec::new(),
                generation: 0,
                needs_reset: false,
            }),
        }))
    }

    /// Locks the queue state (even if a holder panicked: the state stays consistent).
    pub fn lock(&self) -> MutexGuard<'_, PortState> {
        crate::sync::lock(&self.state)
    }
}

/// The virtio-blk device on the client's transport.
pub struct VirtioBlock {
    port: Arc<ClientPort>,
    config: Config,
    features: u64,
    queue_sizes: Vec<u16>,
}

impl VirtioBlock {
    /// The device for `port`.
    pub fn new(port: Arc<ClientPort>) -> Self {
        let config = Config(port.geometry.config());
        let features = port.geometry.features();
        let queue_sizes = vec![QUEUE_SIZE; usize::from(port.geometry.queue_count())];
        VirtioBlock {
            port,
            config,
            features,
            queue_sizes,
        }
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config.as_slice();
        let start = offset as usize;
        if let Some(src) = start
            .checked_add(data.len())
            .and_then(|end| bytes.get(start..end))
        {
            data.copy_from_slice(src);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing is writable (no CONFIG_WCE): writes are ignored.
    }

    fn activate(&mut self, _acked: u64, queues: Vec<Option<Queue>>) -> Result<(), ActivateError> {
        // A driver without MQ uses queue 0 only; with it, any of the queues offered.
        if queues.len() > self.queue_sizes.len() {
            return Err(ActivateError::TooManyQueues {
                given: queues.len(),
                offered: self.queue_sizes.len(),
            });
        }
        if queues.iter().flatten().next().is_none() {
            return Err(ActivateError::NoQueue);
        }
        if let Some(index) = queues
            .iter()
            .position(|q| q.as_ref().is_some_and(|q| !q.ready()))
        {
            return Err(ActivateError::QueueNotReady { index });
        }
        {
            let mut st = self.port.lock();
            st.queues = queues;
            st.generation += 1;
            st.needs_reset = false;
        }
        // The service may be asleep: wake it to look at the new queue.
        let _ = self.port.notify.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        let mut st = self.port.lock();
        st.queues.clear();
        st.generation += 1;
        st.needs_reset = false;
    }

    fn needs_reset(&self) -> bool {
        self.port.lock().needs_reset
    }
}

impl ClientPort {
    /// Counts and reports a queue the service cannot serve any more.
    pub fn give_up_queue(&self, st: &mut PortState, why: &str) {
        if !st.needs_reset {
            crate::limited!(
                warn,
                key: self.name,
                "{}: virtio-blk queue unusable ({why}); device needs reset",
                self.name
            );
            st.needs_reset = true;
            self.counters.needs_reset.fetch_add(1, Ordering::Relaxed);
            self.interrupt.raise(crate::virtio::interrupt::CONFIG);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_within_the_advertised_segment_limits_is_accepted() {
        let g = BlockGeometry {
            range: LbaRange {
                first: 0,
                sectors: 1 << 20,
            },
            block_size: 4096,
            read_only: false,
            discard: true,
            write_zeroes: true,
            serial: "t".into(),
            queues: 1,
        };
        let f = g.features();
        assert_ne!(f & 1 << b::VIRTIO_BLK_F_SEG_MAX, 0);
        assert_ne!(f & 1 << b::VIRTIO_BLK_F_SIZE_MAX, 0);
        let c = g.config();
        let (seg_max, size_max) = (u32::from_le(c.seg_max), u32::from_le(c.size_max));
        // The most a driver may send keeping to both is within what the parser takes.
        assert!(u64::from(seg_max) * u64::from(size_max) <= g.limits().max_data);
        assert!(g.limits().max_data >= 2 << 20, "Linux sends 2 MiB reads");
        assert_eq!(u32::from_le(c.opt_io_size) as u64 * 4096, OPT_IO);
    }

    #[test]
    fn several_queues_are_offered_as_mq() {
        let mut g = BlockGeometry {
            range: LbaRange {
                first: 0,
                sectors: 1 << 20,
            },
            block_size: 512,
            read_only: false,
            discard: false,
            write_zeroes: false,
            serial: "t".into(),
            queues: 1,
        };
        assert_eq!(
            g.features() & 1 << b::VIRTIO_BLK_F_MQ,
            0,
            "one queue: no MQ"
        );
        assert_eq!(u16::from_le(g.config().num_queues), 1);
        g.queues = 4;
        assert_ne!(g.features() & 1 << b::VIRTIO_BLK_F_MQ, 0);
        assert_eq!(u16::from_le(g.config().num_queues), 4);
        let port = ClientPort::new(
            "mq",
            crate::memory::create(4 << 20, 1 << 30).unwrap(),
            g,
            crate::virtio::Interrupt::new(Arc::new(|| {})),
        )
        .unwrap();
        let mut dev = VirtioBlock::new(port.clone());
        assert_eq!(dev.queue_max_sizes(), [QUEUE_SIZE; 4]);
        // num_queues at offset 34 of the configuration space, as a driver reads it.
        let mut n = [0u8; 2];
        dev.read_config(34, &mut n);
        assert_eq!(u16::from_le_bytes(n), 4);
        let ready = || {
            let mut q = Queue::new(QUEUE_SIZE).unwrap();
            q.set_ready(true);
            Some(q)
        };
        // More queues than offered, none at all, or one not ready: refused.
        assert!(dev.activate(0, (0..5).map(|_| ready()).collect()).is_err());
        assert!(dev.activate(0, vec![None, None]).is_err());
        let unready = Some(Queue::new(QUEUE_SIZE).unwrap());
        assert!(dev.activate(0, vec![ready(), unready]).is_err());
        // A driver may leave queues unused; the others keep their indices.
        dev.activate(0, vec![None, ready(), None, ready()]).unwrap();
        let present: Vec<bool> = port.lock().queues.iter().map(Option::is_some).collect();
        assert_eq!(present, [false, true, false, true]);
        dev.reset();
        assert!(port.lock().queues.is_empty());
    }
}
