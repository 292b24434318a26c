//! The virtio-mmio transport, version 2 (virtio 1.x section 4.2), as a device on the MMIO bus.
//!
//! Register accesses come from the client's vCPU thread. Queue notifications do not: the
//! QueueNotify register is an ioeventfd served in the kernel, so a notification never exits to
//! userspace; a write that does reach us (no ioeventfd) is forwarded to the same eventfd.
//!
//! Everything the driver writes is checked: feature bits the device did not offer are refused
//! (FEATURES_OK is not kept), queue sizes must be powers of two no larger than the maximum, and a
//! queue whose rings do not fit in guest memory fails activation with DEVICE_NEEDS_RESET. Any
//! access of the wrong width or outside the registers is ignored (reads as zero).

use virtio_bindings::virtio_mmio as r;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{features, interrupt, status, Interrupt, VirtioDevice, VENDOR_ID};
use crate::devices::BusDevice;
use crate::memory::GuestMem;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Size of the register window of one device.
pub const WINDOW: u64 = 0x1000;

/// A virtio device behind the virtio-mmio transport.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMem,
    interrupt: Interrupt,
    notify: EventFd,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    config_generation: u32,
    activated: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport for `device` in a guest with memory `mem`. `notify` is the queue
    /// notification eventfd (registered as an ioeventfd on QueueNotify by the caller).
    pub fn new(device: D, mem: GuestMem, interrupt: Interrupt, notify: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            notify,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            activated: false,
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device status as the driver sees it.
    pub fn status(&self) -> u32 {
        let needs = if self.device.needs_reset() {
            status::NEEDS_RESET
        } else {
            0
        };
        self.status | needs
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, in the order of the spec (3.1.1).
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // Refused, and DRIVER_OK with it if it came in the same write: it may only
            // follow FEATURES_OK (3.1.1).
            self.status = value & !(status::FEATURES_OK | status::DRIVER_OK);
            return;
        }
        if added & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device.features() == 0
            && self.driver_features & features::VERSION_1 != 0
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & features::EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                queues.push(None);
                continue;
            }
            q.set_event_idx(event_idx);
            if !q.is_valid(&self.mem) {
                self.fail(format!(
                    "queue {i}: rings outside guest memory or misaligned"
                ));
                return;
            }
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(Some(copy)),
                Err(e) => {
                    self.fail(format!("queue {i}: {e}"));
                    return;
                }
            }
        }
        if queues.iter().all(Option::is_none) {
            self.fail("no queue is ready".into());
            return;
        }
        match self.device.activate(self.driver_features, queues) {
            Ok(()) => self.activated = true,
            Err(e) => self.fail(e.to_string()),
        }
    }

    fn fail(&mut self, why: String) {
        // The guest decides how often this happens: limited, per vCPU thread (so per guest).
        let vcpu = std::thread::current();
        let who = vcpu.name().unwrap_or("vcpu");
        crate::limited!(warn, key: who, "virtio-mmio ({who}): device needs reset: {why}");
        self.status |= status::NEEDS_RESET;
        self.interrupt.raise(interrupt::CONFIG);
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            r::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            r::VIRTIO_MMIO_VERSION => 2,
            r::VIRTIO_MMIO_DEVICE_ID => self.device.device_id(),
            r::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            r::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            r::VIRTIO_MMIO_QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size())),
            r::VIRTIO_MMIO_QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready())),
            r::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            r::VIRTIO_MMIO_STATUS => self.status(),
            r::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, v: u32) {
        // Queue layout may change only before DRIVER_OK.
        let configurable = self.status & status::DRIVER_OK == 0;
        match offset {
            r::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            r::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            r::VIRTIO_MMIO_DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            r::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            r::VIRTIO_MMIO_QUEUE_NUM if configurable => {
                if let (Some(q), Ok(size)) = (self.queue(), u16::try_from(v)) {
                    // Refused (and left at its old value) unless a power of two <= max.
                    let _ = q.try_set_size(size);
                }
            }
            r::VIRTIO_MMIO_QUEUE_READY if configurable => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            // virtio-queue refuses (and logs) a misaligned address, keeping the old value.
            r::VIRTIO_MMIO_QUEUE_DESC_LOW if configurable => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            r::VIRTIO_MMIO_QUEUE_DESC_HIGH if configurable => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            r::VIRTIO_MMIO_QUEUE_AVAIL_LOW if configurable => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            r::VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configurable => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            r::VIRTIO_MMIO_QUEUE_USED_LOW if configurable => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            r::VIRTIO_MMIO_QUEUE_USED_HIGH if configurable => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            r::VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally served by the ioeventfd and never seen here.
                let _ = self.notify.write(1);
            }
            r::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            r::VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queue() {
            f(q);
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(r::VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(r::VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = self.read_register(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(r::VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(r::VIRTIO_MMIO_CONFIG), data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let [a, b, c, d] = data else { return };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset as u32, u32::from_le_bytes([*a, *b, *c, *d]));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::virtio::ActivateError;

    /// A device of one queue that offers VERSION_1 alone and counts its activations.
    struct Probe {
        sizes: [u16; 1],
        activated: Arc<AtomicUsize>,
    }

    impl VirtioDevice for Probe {
        fn device_id(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            features::VERSION_1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _acked: u64,
            _queues: Vec<Option<Queue>>,
        ) -> Result<(), ActivateError> {
            self.activated.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn reset(&mut self) {}
        fn needs_reset(&self) -> bool {
            false
        }
    }

    fn write(t: &mut MmioTransport<Probe>, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }

    fn status(t: &mut MmioTransport<Probe>) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(r::VIRTIO_MMIO_STATUS), &mut b);
        u32::from_le_bytes(b)
    }

    /// Found by the `virtio_mmio` fuzz target: FEATURES_OK and DRIVER_OK written in one go
    /// for features the device does not offer kept DRIVER_OK (without FEATURES_OK and without
    /// an activation), which also froze the queue registers.
    #[test]
    fn driver_ok_is_refused_with_the_features_it_came_with() {
        let activated = Arc::new(AtomicUsize::new(0));
        let probe = Probe {
            sizes: [16],
            activated: activated.clone(),
        };
        let mem = crate::memory::create(2 << 20, 1 << 30).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(probe, mem, Interrupt::new(Arc::new(|| {})), notify);
        write(
            &mut t,
            r::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        write(&mut t, r::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        // VERSION_1 and a feature not offered.
        write(&mut t, r::VIRTIO_MMIO_DRIVER_FEATURES, 1 | 2);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write(&mut t, r::VIRTIO_MMIO_STATUS, all);
        let st = status(&mut t);
        assert_eq!(st & status::FEATURES_OK, 0, "{st:#x}");
        assert_eq!(st & status::DRIVER_OK, 0, "{st:#x}");
        assert_eq!(activated.load(Ordering::Relaxed), 0);
        // The queue is still the driver's to set up.
        write(&mut t, r::VIRTIO_MMIO_QUEUE_READY, 1);
        let mut b = [0u8; 4];
        t.read(u64::from(r::VIRTIO_MMIO_QUEUE_READY), &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        write(&mut t, r::VIRTIO_MMIO_QUEUE_READY, 0);
        // With acceptable features the same write brings the device up.
        write(&mut t, r::VIRTIO_MMIO_STATUS, 0);
        write(
            &mut t,
            r::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        write(&mut t, r::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut t, r::VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write(&mut t, r::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write(&mut t, r::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        write(&mut t, r::VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        write(&mut t, r::VIRTIO_MMIO_QUEUE_READY, 1);
        write(&mut t, r::VIRTIO_MMIO_STATUS, all);
        assert_eq!(status(&mut t), all);
        assert_eq!(activated.load(Ordering::Relaxed), 1);
    }
}
