//! The virtio-blk driver: virtio-drivers' [`MmioTransport`] and [`VirtQueue`] driven directly,
//! so that up to 128 requests are in flight (virtio-drivers' own `VirtIOBlk` has a fixed queue
//! of 16), with our own request header and status byte (virtio 1.x, 5.2.6).
//!
//! Costs shape it (exits are tens of µs under ddvm): requests are added in batches and the
//! device is notified once per batch, only when it asked for it (`RING_EVENT_IDX`'s
//! `avail_event`, else the used ring's NO_NOTIFY flag); completions are polled from the used
//! ring; used-buffer notifications stay off except around [`Disk::wait`], where they are turned
//! on, the used ring is checked once more, and the VMM is asked to block the vCPU until the
//! device completes something.
//!
//! Everything the device writes is validated before use: the used index may not move past what
//! is in flight, a used id must name a request in flight (checked before virtio-drivers, which
//! would panic on a bad one, sees it), a used length may not exceed the request's
//! device-writable bytes; any of these ends the run as a device protocol violation. The status
//! byte is preset to 0xff and handed up as the device left it: anything but OK fails the
//! request.
//!
//! The event-index fields virtio-drivers keeps private (`avail_event`, `used_event`) are
//! reached through the ring addresses the queue gave the transport ([`RingTransport`]), with
//! volatile accesses only: virtio-drivers' `set_dev_notify` does nothing under EVENT_IDX, and
//! its `should_notify` compares indices without wrapping (it misses a needed notification once
//! the 16-bit avail index wraps within a batch), so both are done here by the spec's rules.

#![allow(unsafe_code)]

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use bitflags::bitflags;
use guest_kernel::shared::SharedRegion;
use guest_kernel::{time, vmm};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion, VirtIOHeader};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::device::Found;
use crate::hal::{DmaArea, GuestHal};

bitflags! {
    /// Feature bits this driver knows (virtio 1.x, 5.2.3 and 6).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Features: u64 {
        /// `seg_max` in config space.
        const SEG_MAX = 1 << 2;
        /// The device is read-only.
        const RO = 1 << 5;
        /// `blk_size` in config space.
        const BLK_SIZE = 1 << 6;
        /// FLUSH requests.
        const FLUSH = 1 << 9;
        /// Topology fields in config space.
        const TOPOLOGY = 1 << 10;
        /// DISCARD requests.
        const DISCARD = 1 << 13;
        /// WRITE_ZEROES requests.
        const WRITE_ZEROES = 1 << 14;
        /// Indirect descriptors.
        const RING_INDIRECT_DESC = 1 << 28;
        /// `used_event` / `avail_event`.
        const RING_EVENT_IDX = 1 << 29;
        /// A virtio 1.x device.
        const VERSION_1 = 1 << 32;
    }
}

/// Request types (5.2.6).
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the volatile write cache.
    pub const FLUSH: u32 = 4;
    /// Device id string.
    pub const GET_ID: u32 = 8;
    /// Discard a range.
    pub const DISCARD: u32 = 11;
    /// Write zeroes to a range.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status values (5.2.6).
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported by the device.
    pub const UNSUPP: u8 = 2;
    /// What the status byte holds before the device writes it (no valid status).
    pub const UNSET: u8 = 0xff;

    /// A name for a status byte.
    pub fn name(s: u8) -> &'static str {
        match s {
            OK => "OK",
            IOERR => "IOERR",
            UNSUPP => "UNSUPP",
            UNSET => "not written",
            _ => "invalid",
        }
    }
}

/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// `WRITE_ZEROES` flag: the device may deallocate the range.
pub const WRITE_ZEROES_UNMAP: u32 = 1;

/// The request header (`struct virtio_blk_req`'s first part), little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ReqHeader {
    /// `req::*`.
    pub type_: u32,
    /// Zero.
    pub reserved: u32,
    /// First 512-byte sector.
    pub sector: u64,
}

/// The data of DISCARD and WRITE_ZEROES (`struct virtio_blk_discard_write_zeroes`).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RangeSegment {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub num_sectors: u32,
    /// `WRITE_ZEROES_UNMAP` or 0.
    pub flags: u32,
}

/// A request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `sector` into the slot's buffer.
    Read { sector: u64, len: usize },
    /// Write the slot buffer's first `len` bytes at `sector`.
    Write { sector: u64, len: usize },
    /// Flush.
    Flush,
    /// Read the device id into the slot's buffer ([`ID_BYTES`]).
    GetId,
    /// Discard `sectors` sectors at `sector`.
    Discard { sector: u64, sectors: u32 },
    /// Write zeroes to `sectors` sectors at `sector`.
    WriteZeroes {
        sector: u64,
        sectors: u32,
        flags: u32,
    },
}

/// What the device reported for a request.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The slot the request used.
    pub slot: usize,
    /// Its status byte.
    pub status: u8,
    /// TSC ticks from submission to the poll that saw it.
    pub ticks: u64,
}

/// Limits of DISCARD or WRITE_ZEROES from config space (one segment per request is always
/// allowed; requests here are aligned to the block size, which the device's alignment divides).
#[derive(Clone, Copy, Debug, Default)]
pub struct RangeLimits {
    /// Most sectors per segment.
    pub max_sectors: u32,
}

/// What the device is, after negotiation.
#[derive(Clone, Debug)]
pub struct DiskInfo {
    /// virtio-mmio version.
    pub version: u32,
    /// Features offered.
    pub offered: Features,
    /// Features negotiated.
    pub features: Features,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size (512 unless `BLK_SIZE`).
    pub blk_size: u32,
    /// DISCARD limits, when negotiated.
    pub discard: Option<RangeLimits>,
    /// WRITE_ZEROES limits, when negotiated.
    pub write_zeroes: Option<RangeLimits>,
    /// The queue's size.
    pub queue_size: u16,
    /// The device's largest queue size.
    pub queue_max: u32,
}

impl DiskInfo {
    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.features.contains(Features::RO)
    }

    /// Whether FLUSH was negotiated.
    pub fn flush(&self) -> bool {
        self.features.contains(Features::FLUSH)
    }
}

/// Why the driver stopped.
#[derive(Clone, Debug)]
pub enum DiskError {
    /// Bringing the device up failed.
    Init(String),
    /// virtio-drivers refused an operation.
    Queue(virtio_drivers::Error),
    /// The device broke the protocol (used ring contents).
    Device(String),
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::Init(m) => write!(f, "device init failed: {m}"),
            DiskError::Queue(e) => write!(f, "virtqueue: {e}"),
            DiskError::Device(m) => write!(f, "device protocol violation: {m}"),
        }
    }
}

/// Exits this driver caused.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// QueueNotify writes.
    pub notifies: u64,
    /// Batches the device did not need to be told about.
    pub notifies_suppressed: u64,
    /// `vmm::wait` calls.
    pub waits: u64,
}

/// A block device with a fixed set of request slots, each with a data buffer.
pub trait Disk {
    /// What the device is.
    fn info(&self) -> &DiskInfo;
    /// Number of slots (the most requests in flight).
    fn slots(&self) -> usize;
    /// Slot `slot`'s data buffer; panics when the slot is in flight.
    fn data(&self, slot: usize) -> &[u8];
    /// Slot `slot`'s data buffer, writable; panics when the slot is in flight.
    fn data_mut(&mut self, slot: usize) -> &mut [u8];
    /// Adds `op` on idle slot `slot` to the queue (the device is told at the next `kick`).
    fn submit(&mut self, slot: usize, op: Op) -> Result<(), DiskError>;
    /// Notifies the device of the requests added since the last kick, if it needs it.
    fn kick(&mut self);
    /// Appends every completed request to `out`; returns how many.
    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, DiskError>;
    /// Turns used-buffer notifications on, and unless something completed meanwhile, asks
    /// the VMM to block until the device completes something or `timeout_us` passes.
    fn wait(&mut self, timeout_us: u32);
    /// Requests in flight.
    fn in_flight(&self) -> usize;
    /// Exits caused so far.
    fn counters(&self) -> Counters;
}

/// Bytes of a slot's control block: header, range segment, status byte.
const CTL_STRIDE: usize = 64;
const CTL_HEADER: usize = 0;
const CTL_RANGE: usize = 16;
const CTL_STATUS: usize = 32;

/// Queue sizes this driver instantiates, largest first.
const QUEUE_SIZES: [u32; 4] = [256, 128, 64, 16];

/// Brings up the virtio-blk device in `found` with up to `want_slots` request slots of
/// `data_len` bytes each. Fewer slots when the queue cannot hold that many requests (3
/// descriptors each without indirect descriptors).
pub fn open(found: &Found, want_slots: usize, data_len: usize) -> Result<Box<dyn Disk>, DiskError> {
    let header = NonNull::new(found.window.base as *mut VirtIOHeader)
        .ok_or_else(|| DiskError::Init("window at address 0".into()))?;
    // SAFETY: `device::windows` checked the window is inside the identity map and above RAM
    // (no Rust memory there), and `device::find_block` found the virtio-mmio magic and a block
    // device id in it; this transport is the only user of the window from here on.
    let inner = unsafe { MmioTransport::new(header, found.window.size as usize) }
        .map_err(|e| DiskError::Init(format!("{e}")))?;
    if inner.device_type() != DeviceType::Block {
        return Err(DiskError::Init(format!(
            "device type {:?}",
            inner.device_type()
        )));
    }
    let version = match inner.version() {
        MmioVersion::Legacy => 1,
        MmioVersion::Modern => 2,
    };
    let mut transport = RingTransport {
        inner,
        queue0: None,
    };

    let wanted = Features::all()
        - if version == 1 {
            // A legacy device has no VERSION_1 to accept.
            Features::VERSION_1
        } else {
            Features::empty()
        };
    let features = transport.begin_init(wanted);
    let offered = Features::from_bits_retain(transport.read_device_features());
    if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
        transport.set_status(DeviceStatus::FAILED);
        return Err(DiskError::Init(format!(
            "the device refused features {:#x} (FEATURES_OK cleared)",
            features.bits()
        )));
    }
    if version == 2 && !features.contains(Features::VERSION_1) {
        transport.set_status(DeviceStatus::FAILED);
        return Err(DiskError::Init(
            "a modern virtio-mmio device that does not offer VERSION_1".into(),
        ));
    }
    let mut info = read_config(&transport, version, offered, features)
        .map_err(|e| DiskError::Init(format!("config space: {e}")))?;
    info.queue_max = transport.max_queue_size(0);
    let Some(size) = QUEUE_SIZES.into_iter().find(|&s| s <= info.queue_max) else {
        transport.set_status(DeviceStatus::FAILED);
        return Err(DiskError::Init(format!(
            "queue 0 holds {} descriptors, fewer than 16",
            info.queue_max
        )));
    };
    info.queue_size = size as u16;
    match size {
        256 => Blk::<256>::open(transport, info, want_slots, data_len),
        128 => Blk::<128>::open(transport, info, want_slots, data_len),
        64 => Blk::<64>::open(transport, info, want_slots, data_len),
        _ => Blk::<16>::open(transport, info, want_slots, data_len),
    }
}

/// Config space fields (5.2.4), at their offsets in `struct virtio_blk_config`.
fn read_config(
    t: &RingTransport,
    version: u32,
    offered: Features,
    features: Features,
) -> virtio_drivers::Result<DiskInfo> {
    let r = |off: usize| t.read_config_space::<u32>(off);
    let capacity = t.read_consistent(|| Ok(u64::from(r(0)?) | (u64::from(r(4)?) << 32)))?;
    let blk_size = if features.contains(Features::BLK_SIZE) {
        r(20)?
    } else {
        512
    };
    let discard = if features.contains(Features::DISCARD) {
        Some(RangeLimits {
            max_sectors: r(36)?,
        })
    } else {
        None
    };
    let write_zeroes = if features.contains(Features::WRITE_ZEROES) {
        Some(RangeLimits {
            max_sectors: r(48)?,
        })
    } else {
        None
    };
    Ok(DiskInfo {
        version,
        offered,
        features,
        capacity,
        blk_size: if blk_size == 0 { 512 } else { blk_size },
        discard,
        write_zeroes,
        queue_size: 0,
        queue_max: 0,
    })
}

/// Ring addresses queue 0 was given.
#[derive(Clone, Copy, Debug)]
struct RingAddrs {
    size: u32,
    driver_area: PhysAddr,
    device_area: PhysAddr,
}

/// The MMIO transport, remembering where queue 0's rings are (see the module documentation).
struct RingTransport {
    inner: MmioTransport<'static>,
    queue0: Option<RingAddrs>,
}

impl Transport for RingTransport {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if queue == 0 {
            self.queue0 = Some(RingAddrs {
                size,
                driver_area,
                device_area,
            });
        }
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        if queue == 0 {
            self.queue0 = None;
        }
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}

/// Where a slot's request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Idle,
    /// In flight with this shape, from this head descriptor, since these ticks.
    InFlight {
        shape: Shape,
        head: u16,
        since: u64,
    },
}

/// The buffers of a request: what `add` was given, rebuilt for `pop_used`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Header; status.
    Bare,
    /// Header, `len` data bytes; status.
    Out(usize),
    /// Header; `len` data bytes, status.
    In(usize),
    /// Header, range segment; status.
    Range,
}

impl Shape {
    /// Bytes the device may write.
    fn writable(self) -> usize {
        match self {
            Shape::In(len) => len + 1,
            _ => 1,
        }
    }

    /// Descriptors without indirect descriptors.
    const MAX_DESCRIPTORS: usize = 3;
}

/// The driver for a queue of `N` descriptors.
struct Blk<const N: usize> {
    transport: RingTransport,
    queue: VirtQueue<GuestHal, N>,
    info: DiskInfo,
    /// The avail ring (we write `used_event`) and used ring (we read it).
    avail: SharedRegion,
    used: SharedRegion,
    event_idx: bool,
    ctl: DmaArea,
    data: DmaArea,
    data_len: usize,
    data_stride: usize,
    slots: Vec<SlotState>,
    /// Slot + 1 of the request whose chain starts at each descriptor (0: none).
    heads: Vec<u16>,
    /// Our copies of the avail index, its value at the last kick, and the used index consumed.
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    notify_on: bool,
    in_flight: usize,
    counters: Counters,
}

impl<const N: usize> Blk<N> {
    const AVAIL_USED_EVENT: u64 = 4 + 2 * N as u64;
    const AVAIL_LEN: u64 = Self::AVAIL_USED_EVENT + 2;
    const USED_IDX: u64 = 2;
    const USED_RING: u64 = 4;
    const USED_AVAIL_EVENT: u64 = 4 + 8 * N as u64;
    const USED_LEN: u64 = Self::USED_AVAIL_EVENT + 2;

    fn open(
        mut transport: RingTransport,
        info: DiskInfo,
        want_slots: usize,
        data_len: usize,
    ) -> Result<Box<dyn Disk>, DiskError> {
        let indirect = info.features.contains(Features::RING_INDIRECT_DESC);
        let event_idx = info.features.contains(Features::RING_EVENT_IDX);
        let fail = |t: &mut RingTransport, e: DiskError| {
            t.set_status(DeviceStatus::FAILED);
            Err(e)
        };
        let queue = match VirtQueue::<GuestHal, N>::new(&mut transport, 0, indirect, event_idx) {
            Ok(q) => q,
            Err(e) => return fail(&mut transport, DiskError::Queue(e)),
        };
        let Some(rings) = transport.queue0.filter(|r| r.size as usize == N) else {
            return fail(
                &mut transport,
                DiskError::Init("the queue did not name its rings".into()),
            );
        };
        // SAFETY: the rings virtio-drivers allocated for this queue through `GuestHal` (heap
        // pages nothing else uses), alive as long as `queue`, which is dropped with these
        // regions. VirtQueue keeps raw pointers to them, no lasting references; the only
        // fields touched through these regions are the used index, used elements and
        // `avail_event` (read) and `used_event` (written), all with volatile accesses.
        let (avail, used) = unsafe {
            (
                SharedRegion::new(rings.driver_area, Self::AVAIL_LEN),
                SharedRegion::new(rings.device_area, Self::USED_LEN),
            )
        };
        let per_request = if indirect { 1 } else { Shape::MAX_DESCRIPTORS };
        let slots = want_slots.clamp(1, N / per_request);
        let data_stride = data_len.next_multiple_of(512);
        let (Some(ctl), Some(data)) = (
            DmaArea::new(slots * CTL_STRIDE),
            DmaArea::new(slots * data_stride),
        ) else {
            return fail(
                &mut transport,
                DiskError::Init(format!(
                    "no memory for {slots} request buffers of {data_len} bytes"
                )),
            );
        };
        transport.finish_init();
        let mut blk = Blk {
            transport,
            queue,
            info,
            avail,
            used,
            event_idx,
            ctl,
            data,
            data_len,
            data_stride,
            slots: vec![SlotState::Idle; slots],
            heads: vec![0; N],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            notify_on: true,
            in_flight: 0,
            counters: Counters::default(),
        };
        blk.set_notify(false);
        Ok(Box::new(blk))
    }

    fn used_idx(&self) -> u16 {
        self.used.read::<u16>(Self::USED_IDX)
    }

    /// Used-buffer notifications on or off (see the module documentation).
    fn set_notify(&mut self, on: bool) {
        self.notify_on = on;
        if self.event_idx {
            // Off: an event index half the ring space away, which the device's used index
            // cannot reach while at most N requests are outstanding.
            let event = if on {
                self.last_used
            } else {
                self.last_used.wrapping_add(0x8000)
            };
            self.avail.write::<u16>(Self::AVAIL_USED_EVENT, event);
        } else {
            self.queue.set_dev_notify(on);
        }
    }

    fn ctl_offset(slot: usize) -> usize {
        slot * CTL_STRIDE
    }

    fn data_offset(&self, slot: usize) -> usize {
        slot * self.data_stride
    }

    fn idle(&self, slot: usize) -> bool {
        self.slots[slot] == SlotState::Idle
    }

    /// Adds (`pop` false) or pops (`pop` true) the request of `slot` with `shape` and returns
    /// what virtio-drivers returned (the head, or the used length).
    ///
    /// # Safety
    /// Adding: `slot` is idle and its control block and the first bytes of its data buffer
    /// are filled in. Popping: the request of `slot` was added with this `shape` and its head
    /// is the next used element.
    unsafe fn queue_op(
        &mut self,
        slot: usize,
        shape: Shape,
        pop: Option<u16>,
    ) -> virtio_drivers::Result<u32> {
        let c = Self::ctl_offset(slot);
        let d = self.data_offset(slot);
        // SAFETY: the slot's control block and data buffer are in bounds (checked by
        // `DmaArea`), disjoint from each other and from every other slot's; nothing else
        // refers to them while the request is in flight. The slices only live for this call;
        // the device uses the memory between `add` and `pop_used`, as virtio-drivers requires.
        let (header, range, status, data) = unsafe {
            (
                self.ctl.bytes(c + CTL_HEADER, size_of::<ReqHeader>()),
                self.ctl.bytes(c + CTL_RANGE, size_of::<RangeSegment>()),
                self.ctl.bytes_mut(c + CTL_STATUS, 1),
                self.data.bytes_mut(d, self.data_len),
            )
        };
        let mut empty: [u8; 0] = [];
        let (inputs, n_in, mut outputs, n_out): ([&[u8]; 2], usize, [&mut [u8]; 2], usize) =
            match shape {
                Shape::Bare => ([header, &[]], 1, [status, &mut empty], 1),
                Shape::Range => ([header, range], 2, [status, &mut empty], 1),
                Shape::Out(len) => ([header, &data[..len]], 2, [status, &mut empty], 1),
                Shape::In(len) => ([header, &[]], 1, [&mut data[..len], status], 2),
            };
        let (inputs, outputs) = (&inputs[..n_in], &mut outputs[..n_out]);
        match pop {
            None => {
                // SAFETY: the buffers stay allocated and untouched by the driver until the
                // matching `pop_used` (the caller marks the slot in flight).
                let head = unsafe { self.queue.add(inputs, outputs) };
                head.map(u32::from)
            }
            // SAFETY: the same buffers, in the same order, as the `add` of this request.
            Some(head) => unsafe { self.queue.pop_used(head, inputs, outputs) },
        }
    }
}

impl<const N: usize> Disk for Blk<N> {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn data(&self, slot: usize) -> &[u8] {
        assert!(self.idle(slot), "data of slot {slot} while in flight");
        // SAFETY: the slot is idle, so the device does not use its buffer; the slice borrows
        // `self`, so no mutable slice of it (`data_mut` takes `&mut self`) can coexist.
        unsafe { self.data.bytes(self.data_offset(slot), self.data_len) }
    }

    fn data_mut(&mut self, slot: usize) -> &mut [u8] {
        assert!(self.idle(slot), "data of slot {slot} while in flight");
        // SAFETY: as in `data`, and `&mut self` makes this slice the only one.
        unsafe { self.data.bytes_mut(self.data_offset(slot), self.data_len) }
    }

    fn submit(&mut self, slot: usize, op: Op) -> Result<(), DiskError> {
        assert!(self.idle(slot), "submit on slot {slot} while in flight");
        let (type_, sector, range, shape) = match op {
            Op::Read { sector, len } => (req::IN, sector, None, Shape::In(len)),
            Op::Write { sector, len } => (req::OUT, sector, None, Shape::Out(len)),
            Op::Flush => (req::FLUSH, 0, None, Shape::Bare),
            Op::GetId => (req::GET_ID, 0, None, Shape::In(ID_BYTES)),
            Op::Discard { sector, sectors } => (
                req::DISCARD,
                0,
                Some(RangeSegment {
                    sector: sector.to_le(),
                    num_sectors: sectors.to_le(),
                    flags: 0,
                }),
                Shape::Range,
            ),
            Op::WriteZeroes {
                sector,
                sectors,
                flags,
            } => (
                req::WRITE_ZEROES,
                0,
                Some(RangeSegment {
                    sector: sector.to_le(),
                    num_sectors: sectors.to_le(),
                    flags: flags.to_le(),
                }),
                Shape::Range,
            ),
        };
        if let Shape::In(len) | Shape::Out(len) = shape {
            assert!(
                len > 0 && len <= self.data_len,
                "request of {len} bytes on {}-byte buffers",
                self.data_len
            );
        }
        let header = ReqHeader {
            type_: type_.to_le(),
            reserved: 0,
            sector: sector.to_le(),
        };
        let c = Self::ctl_offset(slot);
        // SAFETY: the slot is idle (asserted above): the device does not use its control
        // block, and this slice is the only one for the duration of the copy.
        let ctl = unsafe { self.ctl.bytes_mut(c, CTL_STRIDE) };
        ctl[CTL_HEADER..CTL_HEADER + size_of::<ReqHeader>()].copy_from_slice(header.as_bytes());
        if let Some(range) = range {
            ctl[CTL_RANGE..CTL_RANGE + size_of::<RangeSegment>()].copy_from_slice(range.as_bytes());
        }
        ctl[CTL_STATUS] = status::UNSET;
        // SAFETY: the slot is idle and its control block and data are filled in.
        let head = unsafe { self.queue_op(slot, shape, None) }.map_err(DiskError::Queue)? as u16;
        let entry = self
            .heads
            .get_mut(usize::from(head))
            .filter(|e| **e == 0)
            .expect("virtio-drivers returned a head that is in use");
        *entry = slot as u16 + 1;
        self.slots[slot] = SlotState::InFlight {
            shape,
            head,
            since: time::ticks(),
        };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
        Ok(())
    }

    fn kick(&mut self) {
        if self.avail_idx == self.kicked_idx {
            return;
        }
        // The avail index is published (VirtQueue::add); the device's suppression state must
        // be read after that store: a full fence (virtio 1.x, 2.7.10).
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            let event = self.used.read::<u16>(Self::USED_AVAIL_EVENT);
            // vring_need_event: the device asked to be told once avail passes `event`.
            self.avail_idx.wrapping_sub(event).wrapping_sub(1)
                < self.avail_idx.wrapping_sub(self.kicked_idx)
        } else {
            self.queue.should_notify()
        };
        self.kicked_idx = self.avail_idx;
        if needed {
            self.transport.notify(0);
            self.counters.notifies += 1;
        } else {
            self.counters.notifies_suppressed += 1;
        }
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, DiskError> {
        let mut n = 0;
        loop {
            let used_idx = self.used_idx();
            if used_idx == self.last_used {
                break;
            }
            let ahead = used_idx.wrapping_sub(self.last_used);
            if usize::from(ahead) > self.in_flight {
                return Err(DiskError::Device(format!(
                    "used index {used_idx} is {ahead} past {} with {} requests in flight",
                    self.last_used, self.in_flight
                )));
            }
            // Read the element only after seeing the index that publishes it.
            fence(Ordering::Acquire);
            let elem = Self::USED_RING + 8 * u64::from(self.last_used % N as u16);
            let id = self.used.read::<u32>(elem);
            let slot = usize::try_from(id)
                .ok()
                .and_then(|id| self.heads.get(id))
                .copied()
                .filter(|&s| s != 0)
                .map(|s| usize::from(s) - 1)
                .ok_or_else(|| {
                    DiskError::Device(format!("used id {id} is not the head of a request"))
                })?;
            let SlotState::InFlight { shape, head, since } = self.slots[slot] else {
                unreachable!("heads only name slots in flight");
            };
            // SAFETY: `head` (= the used id) is the head of slot's request, added with `shape`.
            let used_len = unsafe { self.queue_op(slot, shape, Some(head)) }
                .map_err(|e| DiskError::Device(format!("used element changed under us: {e}")))?;
            let ticks = time::ticks().saturating_sub(since);
            self.heads[usize::from(head)] = 0;
            self.slots[slot] = SlotState::Idle;
            self.in_flight -= 1;
            self.last_used = self.last_used.wrapping_add(1);
            if used_len as usize > shape.writable() {
                return Err(DiskError::Device(format!(
                    "used length {used_len} is larger than the {} device-writable bytes",
                    shape.writable()
                )));
            }
            let status = self.ctl.read_u8(Self::ctl_offset(slot) + CTL_STATUS);
            out.push(Completion {
                slot,
                status,
                ticks,
            });
            n += 1;
        }
        if n > 0 && self.event_idx && !self.notify_on {
            // `pop_used` moved `used_event` along (turning notifications on): off again.
            self.set_notify(false);
        }
        Ok(n)
    }

    fn wait(&mut self, timeout_us: u32) {
        self.set_notify(true);
        // Publish the event index before looking at the used ring a last time (2.7.10).
        fence(Ordering::SeqCst);
        if self.used_idx() == self.last_used {
            vmm::wait(timeout_us);
            self.counters.waits += 1;
        }
        self.set_notify(false);
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn counters(&self) -> Counters {
        self.counters
    }
}

impl<const N: usize> Drop for Blk<N> {
    fn drop(&mut self) {
        // Reset first: the device must stop using the rings and buffers before they are freed.
        self.transport.set_status(DeviceStatus::empty());
        self.transport.queue_unset(0);
    }
}
