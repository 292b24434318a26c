//! Virtio for client guests: the virtio-mmio transport (virtio 1.x, modern) and the devices
//! behind it.
//!
//! The transport owns the register file and the queues' configuration; when the driver sets
//! DRIVER_OK it hands the queues (virtio-queue [`Queue`]s) to the device, which serves them on
//! its own thread. A device reset takes them back. A queue the driver broke (an available index
//! that jumped, a descriptor chain that cannot be walked) is never served again until the driver
//! resets the device: the device sets DEVICE_NEEDS_RESET and raises a configuration interrupt.

pub mod mmio;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub use virtio_queue::Queue;

/// Vendor ID of ddvm's virtio devices ("DDVM", little endian).
pub const VENDOR_ID: u32 = 0x4d56_4444;

/// Feature bits common to every device (virtio 1.x, section 6).
pub mod features {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    /// VIRTIO_F_VERSION_1: the modern interface (required).
    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    /// VIRTIO_F_RING_INDIRECT_DESC.
    pub const INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
    /// VIRTIO_F_RING_EVENT_IDX.
    pub const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// DRIVER.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// FAILED.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Interrupt status bits (virtio-mmio InterruptStatus).
pub mod interrupt {
    /// The device used a buffer.
    pub const VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    /// The configuration (or the device status) changed.
    pub const CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
}

/// How a device tells its driver that something happened.
///
/// The interrupt status register is always kept. The signal itself depends on the guest: ddvm's
/// own guests poll and, when idle, block their vCPU in a wait exit, so the signal wakes that vCPU
/// (an eventfd write, no exit); a guest that takes interrupts gets an irqfd here.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    signal: Arc<dyn Fn() + Send + Sync>,
}

impl Interrupt {
    /// An interrupt line that calls `signal` when raised.
    pub fn new(signal: Arc<dyn Fn() + Send + Sync>) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            signal,
        }
    }

    /// Sets `bits` in the interrupt status and signals the driver.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        (self.signal)();
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// Why a device refused the queues a driver set up (the driver's error: the transport marks
/// the device DEVICE_NEEDS_RESET).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActivateError {
    /// More queues than the device offers.
    #[error("{given} queues set up; the device offers {offered}")]
    TooManyQueues {
        /// Queues the driver set up.
        given: usize,
        /// Queues the device offers.
        offered: usize,
    },
    /// No request queue at all.
    #[error("no request queue")]
    NoQueue,
    /// A queue the driver handed over is not ready.
    #[error("queue {index} is not ready")]
    QueueNotReady {
        /// Its index.
        index: usize,
    },
}

/// A device behind a virtio transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2: block).
    fn device_id(&self) -> u32;
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Maximum size of each queue (a power of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: serve `queues` (by index; `None` where the driver left a
    /// queue unused, at least one is there) with the features it accepted. An error means
    /// the configuration is unusable; the transport then sets DEVICE_NEEDS_RESET.
    fn activate(
        &mut self,
        acked_features: u64,
        queues: Vec<Option<Queue>>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving the queues. When this returns the device no
    /// longer touches the driver's memory.
    fn reset(&mut self);
    /// Whether the device has given up on the driver's queues until a reset.
    fn needs_reset(&self) -> bool;
}
