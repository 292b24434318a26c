//! Memory the device reads and writes: virtio-drivers' [`Hal`] for guest-kernel, and
//! [`DmaArea`], the request buffers of the block driver.
//!
//! Guest memory is identity-mapped (virtual = guest-physical) and the heap is one contiguous
//! range of RAM, so a page-aligned heap allocation is physically contiguous and its address is
//! the address the device uses: sharing a buffer is naming its address, unsharing is nothing.

#![allow(unsafe_code)]

use alloc::alloc::{alloc_zeroed, dealloc};
use core::alloc::Layout;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// virtio-drivers' hardware layer for ddvm guests.
pub struct GuestHal;

fn pages_layout(pages: usize) -> Option<Layout> {
    let size = pages.checked_mul(PAGE_SIZE)?;
    if size == 0 {
        return None;
    }
    Layout::from_size_align(size, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns fresh, zeroed, page-aligned heap memory that nothing else refers
// to until `dma_dealloc` frees it; addresses are identity-mapped, so the physical address the
// device uses is the pointer's address (`share`), and nothing needs copying back (`unshare`).
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = pages_layout(pages) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            // A physical address of 0 tells virtio-drivers the allocation failed.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = pages_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes back an allocation of `dma_alloc` with the same page count,
        // hence the same layout, freed once.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity map: only the PCI transport calls this, and this image uses virtio-mmio.
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Zeroed, page-aligned heap memory handed to the device in pieces, owned through a raw
/// pointer: no Rust reference into it outlives the accessor call that made it, so the device
/// may write any piece it was given while the driver works on the others.
pub struct DmaArea {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl DmaArea {
    /// `len` zeroed bytes (rounded up to whole pages); `None` when the heap has no room.
    pub fn new(len: usize) -> Option<Self> {
        let pages = len.div_ceil(PAGE_SIZE).max(1);
        let layout = pages_layout(pages)?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(DmaArea { ptr, layout })
    }

    fn checked(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.layout.size()),
            "DMA area access out of bounds: {offset:#x}+{len:#x} of {:#x}",
            self.layout.size()
        );
        // In bounds (checked above) of one allocation.
        self.ptr.as_ptr().wrapping_add(offset)
    }

    /// The `len` bytes at `offset`, shared.
    ///
    /// # Safety
    /// For the life of the slice the device must not write these bytes (no request naming them
    /// is in flight) and no mutable slice may overlap them.
    pub unsafe fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let p = self.checked(offset, len);
        // SAFETY: in bounds of the live allocation (checked); no concurrent writer or
        // overlapping mutable slice (the caller's contract).
        unsafe { core::slice::from_raw_parts(p, len) }
    }

    /// The `len` bytes at `offset`, writable.
    ///
    /// # Safety
    /// For the life of the slice no other slice may overlap these bytes and the device must not
    /// use them, except that the slice may be handed to virtio-drivers' `VirtQueue::add` for
    /// the device to use until the matching `pop_used`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        let p = self.checked(offset, len);
        // SAFETY: in bounds of the live allocation (checked); exclusive (the caller's
        // contract).
        unsafe { core::slice::from_raw_parts_mut(p, len) }
    }

    /// Copies one byte out (volatile: the device may have written it).
    pub fn read_u8(&self, offset: usize) -> u8 {
        let p = self.checked(offset, 1);
        // SAFETY: in bounds of the live allocation (checked); a volatile byte read cannot tear
        // and creates no reference.
        unsafe { core::ptr::read_volatile(p) }
    }
}

impl Drop for DmaArea {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with `self.layout`, freed once; the driver resets the
        // device before dropping the areas its requests named.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Descriptors per virtio-net queue (RX and TX) this image instantiates.
pub const NET_QUEUE: usize = 64;
/// Bytes of each receive buffer: the 12-byte `virtio_net_hdr_v1` and a 1514-byte frame fit.
const NET_RX_BUF: usize = 2048;
/// Offset of the `status` field in virtio-net's config space (after the 6-byte MAC).
const NET_STATUS: u64 = crate::device::reg::CONFIG + 6;

/// A virtio-net device driven through virtio-drivers' [`VirtIONetRaw`], its buffers owned
/// here so that every queue operation is safe to call: a buffer handed to the device stays in
/// this struct, untouched, until the device gives it back.
///
/// [`VirtIONetRaw`]: virtio_drivers::device::net::VirtIONetRaw
pub struct NetDevice {
    raw: virtio_drivers::device::net::VirtIONetRaw<
        GuestHal,
        virtio_drivers::transport::mmio::MmioTransport<'static>,
        NET_QUEUE,
    >,
    regs: guest_kernel::mmio::MmioRegion,
    /// TX buffers (header and frame) by token, while the device has them.
    tx: alloc::vec::Vec<Option<alloc::vec::Vec<u8>>>,
    /// RX buffers by token, while the device has them.
    rx: alloc::vec::Vec<Option<alloc::vec::Vec<u8>>>,
    /// Bytes of the virtio-net header.
    hdr: usize,
}

impl NetDevice {
    /// Brings up the virtio-net device in `found` and posts every receive buffer.
    pub fn open(found: &crate::device::Found) -> Result<Self, alloc::string::String> {
        use alloc::format;
        use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
        let header = NonNull::new(found.window.base as *mut VirtIOHeader)
            .ok_or_else(|| alloc::string::String::from("window at address 0"))?;
        // SAFETY: `device::windows` checked the window is inside the identity map and above
        // RAM (no Rust memory there), and `device::find` found the virtio-mmio magic and a
        // network device id in it; this transport is the only writer of the window from here
        // on (`regs` only reads the config space).
        let transport = unsafe { MmioTransport::new(header, found.window.size as usize) }
            .map_err(|e| format!("transport: {e}"))?;
        let raw = virtio_drivers::device::net::VirtIONetRaw::new(transport)
            .map_err(|e| format!("init: {e}"))?;
        let mut probe = [0u8; 32];
        let hdr = raw
            .fill_buffer_header(&mut probe)
            .map_err(|e| format!("header: {e}"))?;
        let mut dev = NetDevice {
            raw,
            regs: found.regs,
            tx: (0..NET_QUEUE).map(|_| None).collect(),
            rx: (0..NET_QUEUE).map(|_| None).collect(),
            hdr,
        };
        for _ in 0..NET_QUEUE {
            dev.post_rx(alloc::vec![0u8; NET_RX_BUF])?;
        }
        Ok(dev)
    }

    fn post_rx(&mut self, mut buf: alloc::vec::Vec<u8>) -> Result<(), alloc::string::String> {
        // SAFETY: the buffer is kept in `self.rx` under its token and not touched until
        // `receive` takes it back after the device used it.
        let token = unsafe { self.raw.receive_begin(&mut buf) }
            .map_err(|e| alloc::format!("posting a receive buffer: {e}"))?;
        let slot = self
            .rx
            .get_mut(usize::from(token))
            .ok_or_else(|| alloc::format!("receive token {token} out of range"))?;
        *slot = Some(buf);
        Ok(())
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    /// Whether the config space's status says LINK_UP.
    pub fn link_up(&self) -> bool {
        self.regs.read_only::<u16>(NET_STATUS).read() & 1 != 0
    }

    /// Frees the TX buffers the device is done with; returns how many.
    pub fn reclaim(&mut self) -> Result<usize, alloc::string::String> {
        let mut n = 0;
        while let Some(token) = self.raw.poll_transmit() {
            let buf = self
                .tx
                .get_mut(usize::from(token))
                .and_then(Option::take)
                .ok_or_else(|| alloc::format!("used TX token {token} not in flight"))?;
            // SAFETY: `buf` is the buffer `transmit_begin` was given for `token`.
            unsafe { self.raw.transmit_complete(token, &buf) }
                .map_err(|e| alloc::format!("TX completion: {e}"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Whether the TX queue has room for a frame (after freeing the buffers the device is done
    /// with).
    pub fn can_send(&mut self) -> Result<bool, alloc::string::String> {
        self.reclaim()?;
        Ok(self.raw.can_send())
    }

    /// Queues `frame` for transmission; `Ok(false)` when the TX queue is full.
    pub fn transmit(&mut self, frame: &[u8]) -> Result<bool, alloc::string::String> {
        self.reclaim()?;
        if !self.raw.can_send() {
            return Ok(false);
        }
        let mut buf = alloc::vec![0u8; self.hdr + frame.len()];
        self.raw
            .fill_buffer_header(&mut buf)
            .map_err(|e| alloc::format!("header: {e}"))?;
        buf[self.hdr..].copy_from_slice(frame);
        // SAFETY: the buffer is kept in `self.tx` under its token and not touched until
        // `reclaim` takes it back after the device used it.
        let token = match unsafe { self.raw.transmit_begin(&buf) } {
            Ok(t) => t,
            Err(virtio_drivers::Error::QueueFull) => return Ok(false),
            Err(e) => return Err(alloc::format!("transmit: {e}")),
        };
        let slot = self
            .tx
            .get_mut(usize::from(token))
            .ok_or_else(|| alloc::format!("TX token {token} out of range"))?;
        *slot = Some(buf);
        Ok(true)
    }

    /// Hands every received frame to `f` (without the virtio-net header) and posts its buffer
    /// again; returns how many.
    pub fn receive(&mut self, mut f: impl FnMut(&[u8])) -> Result<usize, alloc::string::String> {
        let mut n = 0;
        while let Some(token) = self.raw.poll_receive() {
            let mut buf = self
                .rx
                .get_mut(usize::from(token))
                .and_then(Option::take)
                .ok_or_else(|| alloc::format!("used RX token {token} not posted"))?;
            // SAFETY: `buf` is the buffer `receive_begin` was given for `token`.
            let (hdr, len) = unsafe { self.raw.receive_complete(token, &mut buf) }
                .map_err(|e| alloc::format!("RX completion: {e}"))?;
            let frame = buf
                .get(hdr..hdr + len)
                .ok_or_else(|| alloc::format!("RX length {len} beyond the buffer"))?;
            f(frame);
            self.post_rx(buf)?;
            n += 1;
        }
        Ok(n)
    }

    /// Turns used-buffer notifications on, and unless a frame arrived or a transmit completed
    /// meanwhile, waits in the VMM for at most `timeout_us`; turns them off again.
    pub fn wait(&mut self, timeout_us: u32) {
        self.raw.enable_interrupts();
        if self.raw.poll_receive().is_none() && self.raw.poll_transmit().is_none() {
            guest_kernel::vmm::wait(timeout_us);
        }
        self.raw.disable_interrupts();
        let _ = self.raw.ack_interrupt();
    }
}

impl Drop for NetDevice {
    /// Resets the device first: virtio-drivers' drop then finds its queues not ready (a
    /// transport may refuse QueueReady writes after DRIVER_OK), and the device lets go of
    /// every buffer before they are freed.
    fn drop(&mut self) {
        let status = self.regs.read_write::<u32>(crate::device::reg::STATUS);
        status.write(0);
        while status.read() != 0 {
            core::hint::spin_loop();
        }
    }
}
