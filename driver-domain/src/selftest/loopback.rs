//! The channel service against a stand-in VMM: a channel in the domain's own memory, with this
//! module playing the VMM's side of the rings (`Producer<Request>`, `Consumer<Completion>`),
//! so the whole request path (validation, PRPs into bounce slots, flow control, completions,
//! event flags) runs against a real controller without ddvm.
//!
//! Checks: data written through slots reads back through other slots; malformed requests
//! complete `BAD_REQUEST`/`UNSUPPORTED` without touching the device; a full completion ring
//! stops the service from taking requests; Write Zeroes, Discard and Flush complete; every
//! completion carries a known tag, the expected status and length, and the epoch. Last, each
//! fault injected into the service (`faults`) shows up as the VMM is to see it: a bogus length,
//! a stale epoch, an unknown tag, an I/O error for DMA outside the domain (under ddvm, whose DMA
//! window refuses it), a late completion, and a completion producer index past the ring.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ddvm_abi::channel::blk::{device_flags, op, Request};
use ddvm_abi::channel::ring::{Consumer, Producer, SharedMemory, CONSUMER};
use ddvm_abi::channel::{
    class, domain_flags, offset, status, vmm_flags, ChannelHeader, Completion,
};
use guest_kernel::dma::{DmaBuffer, PAGE_SIZE};
use guest_kernel::shared::SharedRegion;
use guest_kernel::time::Instant;

use crate::driver::BlockDriver;
use crate::nvme::Controller;
use crate::service::{self, Service};
use crate::vmm_channel::Channel;

/// Epoch of the stand-in channel.
const EPOCH: u64 = 0x1_0000_0007;
/// Ring entries (as the VMM's).
const ENTRIES: u32 = 64;
/// Channel size: header and rings, then 64 slots of 128 KiB.
const CHANNEL_SIZE: u64 = 0x4000 + 64 * (128 << 10);
/// Give up on a batch after this long.
const BATCH_TIMEOUT_US: u64 = 10_000_000;

/// The stand-in VMM.
struct Vmm {
    region: SharedRegion,
    header: ChannelHeader,
    req: Producer<Request>,
    cpl: Consumer<Completion>,
    next_tag: u32,
    /// Expected (status, len) per tag in flight.
    expect: BTreeMap<u32, (u16, u32)>,
    requests: u64,
}

impl Vmm {
    fn slot(&self, i: u32) -> u64 {
        u64::from(self.header.data) + u64::from(i) * u64::from(self.header.max_transfer)
    }

    /// Posts a request expecting `(status, len)`; returns its tag.
    fn post(&mut self, mut r: Request, expect: (u16, u32)) -> Result<u32, String> {
        r.tag = self.next_tag;
        self.next_tag += 1;
        if self.req.free() == 0 {
            self.req
                .refresh(&self.region)
                .map_err(|e| format!("{e:?}"))?;
        }
        if !self.req.push(&self.region, &r) {
            return Err(format!("request ring full posting {r:?}"));
        }
        self.expect.insert(r.tag, expect);
        self.requests += 1;
        Ok(r.tag)
    }

    /// Publishes, runs the service until the next completion and takes it unchecked (its
    /// expectation is dropped).
    #[cfg(feature = "fault-injection")]
    fn next(&mut self, svc: &mut Service) -> Result<Completion, String> {
        self.req.publish(&self.region);
        let start = Instant::now();
        loop {
            svc.pass();
            if self
                .cpl
                .refresh(&self.region)
                .map_err(|e| format!("{e:?}"))?
                > 0
            {
                let c = self.cpl.pop(&self.region).ok_or("no completion to pop")?;
                self.cpl.release(&self.region);
                self.expect.remove(&c.tag);
                return Ok(c);
            }
            if start.elapsed_us() > BATCH_TIMEOUT_US {
                return Err(String::from("no completion"));
            }
        }
    }

    /// Takes and checks completions.
    fn reap(&mut self) -> Result<usize, String> {
        self.cpl
            .refresh(&self.region)
            .map_err(|e| format!("{e:?}"))?;
        let mut n = 0;
        while let Some(c) = self.cpl.pop(&self.region) {
            let Some((st, len)) = self.expect.remove(&c.tag) else {
                return Err(format!("completion for unknown tag: {c:?}"));
            };
            if c.status != st || c.len != len || c.epoch != EPOCH as u32 {
                return Err(format!(
                    "completion {c:?}, expected status {st} len {len} epoch {}",
                    EPOCH as u32
                ));
            }
            n += 1;
        }
        self.cpl.release(&self.region);
        Ok(n)
    }

    /// Publishes and runs the service until every request has completed.
    fn settle(&mut self, svc: &mut Service) -> Result<(), String> {
        self.req.publish(&self.region);
        let start = Instant::now();
        while !self.expect.is_empty() {
            svc.pass();
            self.reap()?;
            if start.elapsed_us() > BATCH_TIMEOUT_US {
                return Err(format!("{} requests never completed", self.expect.len()));
            }
        }
        Ok(())
    }
}

/// A read or write of `sectors` at `sector` through slot `slot`.
fn rw(vmm: &Vmm, write: bool, sector: u64, sectors: u32, slot: u32) -> Request {
    Request {
        op: if write { op::WRITE } else { op::READ },
        sector,
        sectors,
        len: sectors * 512,
        data: vmm.slot(slot),
        ..Default::default()
    }
}

fn word(sector: u64, i: u64) -> u64 {
    (sector << 20 | i) ^ 0x5eed_0000_0000_0000
}

/// Runs the loopback test with `disk`; returns (requests, bytes moved).
pub fn run(disk: Controller) -> Result<(u64, u64), String> {
    let pages = (CHANNEL_SIZE / PAGE_SIZE) as usize;
    let region = DmaBuffer::new(pages)
        .ok_or_else(|| String::from("out of memory for the stand-in channel"))?
        .leak();
    let header = ChannelHeader::new(class::BLK, EPOCH, CHANNEL_SIZE, ENTRIES, 128 << 10);
    region.write(0, header);
    region.write(offset::VMM_FLAGS, vmm_flags::NOTIFY_ME);

    let ch = Channel::open(region).map_err(|e| format!("{e}"))?;
    ch.check_geometry().map_err(|e| format!("{e}"))?;
    let info = service::device_info(&disk.properties(), header.max_transfer);
    ch.write_device_info(&info);
    ch.mark_ready();
    if !region.read::<ChannelHeader>(0).is_ready_for(EPOCH) {
        return Err(String::from("channel not marked ready"));
    }
    let mut svc = Service::new(ch, Some(Box::new(disk)), info);
    let mut vmm = Vmm {
        region,
        header,
        req: Producer::new(u64::from(header.req_ring), ENTRIES),
        cpl: Consumer::new(u64::from(header.cpl_ring), ENTRIES),
        next_tag: 1,
        expect: BTreeMap::new(),
        requests: 0,
    };

    let per_block = u64::from(info.block_size / 512);
    let capacity = info.capacity_sectors;
    let max_sectors = info.max_transfer / 512;
    // 48 extents of mixed sizes spread over the device, in slots 0..48.
    let extents: Vec<(u64, u32)> = (0..48u64)
        .map(|i| {
            let sectors = (((i % 8) + 1) * 8 * per_block).min(u64::from(max_sectors)) as u32;
            let sector = (capacity / 48 * i) / per_block * per_block;
            (sector, sectors)
        })
        .collect();
    let mut bytes = 0;

    for (slot, &(sector, sectors)) in extents.iter().enumerate() {
        let base = vmm.slot(slot as u32);
        for i in 0..u64::from(sectors) * 64 {
            region.write::<u64>(base + i * 8, word(sector, i));
        }
        let r = rw(&vmm, true, sector, sectors, slot as u32);
        vmm.post(r, (status::OK, sectors * 512))?;
        bytes += u64::from(sectors) * 512;
    }
    vmm.settle(&mut svc)?;

    // Malformed requests: none reaches the device.
    let good = rw(&vmm, false, 0, per_block as u32, 0);
    let bad = [
        (Request { op: 99, ..good }, status::UNSUPPORTED),
        (Request { flags: 1, ..good }, status::UNSUPPORTED),
        (
            Request {
                len: good.len + 512,
                ..good
            },
            status::BAD_REQUEST,
        ),
        (
            Request {
                sector: capacity,
                ..good
            },
            status::BAD_REQUEST,
        ),
        (
            Request {
                sector: u64::MAX - 1,
                ..good
            },
            status::BAD_REQUEST,
        ),
        (
            Request {
                sectors: 0,
                len: 0,
                ..good
            },
            status::BAD_REQUEST,
        ),
        (Request { data: 0, ..good }, status::BAD_REQUEST),
        (
            Request {
                data: header.size - u64::from(good.len) + 512,
                ..good
            },
            status::BAD_REQUEST,
        ),
        (
            Request {
                data: good.data + 2,
                ..good
            },
            status::BAD_REQUEST,
        ),
        (
            Request {
                op: op::FLUSH,
                sectors: 1,
                len: 0,
                ..good
            },
            status::BAD_REQUEST,
        ),
        (
            Request {
                op: op::WRITE_ZEROES,
                ..good
            },
            if info.flags & device_flags::WRITE_ZEROES != 0 {
                status::BAD_REQUEST
            } else {
                status::UNSUPPORTED
            },
        ),
        (rw(&vmm, false, 0, max_sectors + 8, 0), status::BAD_REQUEST),
    ];
    for (r, st) in bad {
        vmm.post(r, (st, 0))?;
    }
    if per_block > 1 {
        let r = rw(&vmm, false, 1, per_block as u32, 0);
        vmm.post(r, (status::BAD_REQUEST, 0))?;
    }
    vmm.settle(&mut svc)?;

    // Read back through other slots (reversed), after poisoning them.
    let n = extents.len() as u32;
    for (i, &(sector, sectors)) in extents.iter().enumerate() {
        let slot = n - 1 - i as u32;
        region.fill(vmm.slot(slot), u64::from(sectors) * 512, 0xa5);
        let r = rw(&vmm, false, sector, sectors, slot);
        vmm.post(r, (status::OK, sectors * 512))?;
    }
    vmm.settle(&mut svc)?;
    for (i, &(sector, sectors)) in extents.iter().enumerate() {
        let base = vmm.slot(n - 1 - i as u32);
        for w in 0..u64::from(sectors) * 64 {
            let got = region.read::<u64>(base + w * 8);
            if got != word(sector, w) {
                return Err(format!(
                    "channel read of sector {sector} word {w}: {got:#x}"
                ));
            }
        }
        bytes += u64::from(sectors) * 512;
    }

    // Flow control: with the completion ring full, no request is taken.
    let req_consumer = u64::from(header.req_ring) + CONSUMER;
    for i in 0..ENTRIES {
        let r = rw(&vmm, false, extents[0].0, per_block as u32, i % n);
        vmm.post(r, (status::OK, (per_block * 512) as u32))?;
    }
    vmm.req.publish(&region);
    let start = Instant::now();
    while region.load_u32(req_consumer) != vmm.req.index() {
        svc.pass();
        if start.elapsed_us() > BATCH_TIMEOUT_US {
            return Err(String::from("service did not take a full ring of requests"));
        }
    }
    while svc.in_flight() > 0 {
        svc.pass();
    }
    svc.pass();
    for _ in 0..ENTRIES {
        let r = rw(&vmm, false, extents[0].0, per_block as u32, 0);
        vmm.post(r, (status::OK, (per_block * 512) as u32))?;
    }
    vmm.req.publish(&region);
    let taken = region.load_u32(req_consumer);
    for _ in 0..1000 {
        svc.pass();
    }
    if region.load_u32(req_consumer) != taken {
        return Err(String::from(
            "service took requests with the completion ring full",
        ));
    }
    vmm.settle(&mut svc)?;

    // Write Zeroes, Discard, Flush.
    let (sector, sectors) = extents[1];
    let zeroes = info.flags & device_flags::WRITE_ZEROES != 0;
    let discard = info.flags & device_flags::DISCARD != 0;
    let plain = |o: u16| Request {
        op: o,
        sector,
        sectors,
        ..Default::default()
    };
    let unsupported = (status::UNSUPPORTED, 0);
    vmm.post(
        plain(op::WRITE_ZEROES),
        if zeroes { (status::OK, 0) } else { unsupported },
    )?;
    vmm.settle(&mut svc)?;
    region.fill(vmm.slot(5), u64::from(sectors) * 512, 0xa5);
    let r = rw(&vmm, false, sector, sectors, 5);
    vmm.post(r, (status::OK, sectors * 512))?;
    vmm.settle(&mut svc)?;
    if zeroes && (0..u64::from(sectors) * 64).any(|w| region.read::<u64>(vmm.slot(5) + w * 8) != 0)
    {
        return Err(String::from("channel Write Zeroes did not zero"));
    }
    vmm.post(
        plain(op::DISCARD),
        if discard {
            (status::OK, 0)
        } else {
            unsupported
        },
    )?;
    let flush = Request {
        op: op::FLUSH,
        ..Default::default()
    };
    vmm.post(flush, (status::OK, 0))?;
    vmm.settle(&mut svc)?;

    // Nothing left: the service may wait, and says so.
    if !svc.prepare_wait() {
        return Err(String::from("service refused to wait with nothing to do"));
    }
    if region.read::<u32>(offset::DOMAIN_FLAGS) & domain_flags::WAITING == 0 {
        return Err(String::from("WAITING not set before waiting"));
    }
    svc.woke();
    if region.read::<u32>(offset::DOMAIN_FLAGS) & domain_flags::WAITING != 0 {
        return Err(String::from("WAITING still set after waking"));
    }
    #[cfg(feature = "fault-injection")]
    injected_faults(&mut vmm, &mut svc, extents[2])?;
    #[cfg(not(feature = "fault-injection"))]
    guest_kernel::println!(
        "loopback: fault injection is not built into this image; its checks skipped"
    );
    Ok((vmm.requests, bytes))
}

/// Each fault injected into the service, as the VMM sees it. Leaves the channel broken (the
/// completion producer index past the ring).
#[cfg(feature = "fault-injection")]
fn injected_faults(
    vmm: &mut Vmm,
    svc: &mut Service,
    (sector, sectors): (u64, u32),
) -> Result<(), String> {
    use ddvm_abi::boot::Platform;
    use ddvm_abi::channel::fault;
    use ddvm_abi::channel::ring::IndexError;
    use guest_kernel::boot;

    use crate::faults::{self, Injection};

    let inject = |svc: &mut Service, code, arg| faults::inject(Injection { code, arg }, Some(svc));
    let len = sectors * 512;
    let epoch = EPOCH as u32;
    let read = |vmm: &mut Vmm| vmm.post(rw(vmm, false, sector, sectors, 0), (status::OK, len));
    let check = |what: &str, ok: bool, c: &Completion| {
        if ok {
            Ok(())
        } else {
            Err(format!("fault {what}: completion {c:?}"))
        }
    };

    inject(svc, fault::BOGUS_LEN, 0);
    let tag = read(vmm)?;
    let c = vmm.next(svc)?;
    check("bogus length", c.tag == tag && c.len == len + 512, &c)?;

    inject(svc, fault::STALE_EPOCH, 0);
    let tag = read(vmm)?;
    let c = vmm.next(svc)?;
    let stale = c.epoch == epoch.wrapping_sub(1) && c.len == len;
    check("stale epoch", c.tag == tag && stale, &c)?;

    inject(svc, fault::BOGUS_TAG, 0xdead);
    let c = vmm.next(svc)?;
    check("bogus tag", c.tag == 0xdead && c.epoch == epoch, &c)?;

    // Only where the VMM's DMA window plays the IOMMU: under QEMU nothing stops the device.
    if boot::platform() != Platform::QemuPvh {
        inject(svc, fault::DMA_OUTSIDE, 0);
        let tag = read(vmm)?;
        let c = vmm.next(svc)?;
        let refused = c.status == status::IO_ERROR && c.len == 0;
        check("DMA outside", c.tag == tag && refused, &c)?;
    }

    // One request 20 ms late.
    inject(svc, fault::SLOW, 20 | 1 << 16);
    let start = Instant::now();
    let tag = read(vmm)?;
    let c = vmm.next(svc)?;
    let late = start.elapsed_us() >= 20_000 && c.status == status::OK;
    check("slow", c.tag == tag && late, &c)?;
    let tag = read(vmm)?;
    let c = vmm.next(svc)?;
    check(
        "after slow",
        c.tag == tag && c.epoch == epoch && c.len == len,
        &c,
    )?;

    inject(svc, fault::WILD_WRITE, fault::WILD_WRITE_PRODUCER);
    svc.pass();
    match vmm.cpl.refresh(&vmm.region) {
        Err(IndexError::ProducerTooFar { .. }) => Ok(()),
        other => Err(format!(
            "fault wild write: completion ring refresh {other:?}"
        )),
    }
}
