//! The host side of a block channel: requests posted by the VMM, completions and ring
//! indices written by a hostile driver domain, taken by `HostChannel::poll`, which checks
//! each against the channel's table of requests in flight.
//!
//! Input: ops. `op % 6`: 0 submits a request (operation, sector, sectors), 1 publishes, 2
//! the domain completes (a tag in flight picked by index, or any tag; status, length and
//! epoch as given or as they should be) and publishes its producer index, 3 the domain
//! writes any ring index, 4 polls, 5 the domain writes device info and the VMM checks it.
//!
//! Checked: no completion is accepted for a tag that is not in flight, twice, with another
//! epoch or longer than its request; what is accepted is exactly the request posted for that
//! tag; a violation breaks the channel for good (every later poll and submit refused); the
//! requests in flight and the free bounce slots always add up.

use std::collections::HashMap;

use ddvm::host_channel::{HostChannel, SubmitError};
use ddvm_abi::channel::blk::{op, DeviceInfo, Request};
use ddvm_abi::channel::ring::{CONSUMER, ENTRIES, PRODUCER};
use ddvm_abi::channel::{class, DEVICE_INFO_OFFSET};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::{guest_memory, Input, Seed};

const BASE: u64 = 1 << 20;
const EPOCH: u64 = 0x1_0000_0007;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest_memory(2 << 20);
    let header =
        ddvm::domain::channel_header("fuzz", class::BLK, EPOCH, 1 << 20).expect("geometry");
    mem.write_obj(header, GuestAddress(BASE)).expect("header");
    let mut ch = HostChannel::new(BASE, header);
    let slots = ch.free_slots();
    let mut model: HashMap<u32, Request> = HashMap::new();
    let mut tags: Vec<u32> = Vec::new();
    let mut cpl_producer = 0u32;
    let mut done = Vec::new();
    let mut ops = 0;
    while !input.is_empty() && ops < 1024 {
        ops += 1;
        match input.u8() % 6 {
            0 => {
                let operation = u16::from(input.u8() % 8);
                let sector = u64::from(input.u32());
                let sectors = u32::from(input.u8());
                let write = vec![0xa5u8; sectors as usize * 512];
                match ch.submit(&mem, operation, sector, sectors, Some(&write)) {
                    Ok(tag) => {
                        assert!(
                            !model.contains_key(&tag),
                            "tag {tag} reused while in flight"
                        );
                        let len = match operation {
                            op::READ | op::WRITE => sectors * 512,
                            _ => 0,
                        };
                        let r = Request {
                            tag,
                            op: operation,
                            flags: 0,
                            sector,
                            sectors,
                            len,
                            data: 0,
                        };
                        model.insert(tag, r);
                        tags.push(tag);
                    }
                    Err(SubmitError::Broken) => assert!(ch.broken().is_some()),
                    Err(SubmitError::Full) => {}
                    Err(SubmitError::TooLarge { len, max }) => assert!(len > u64::from(max)),
                    // Whatever the domain wrote, the VMM's own ring keeps its invariant.
                    Err(SubmitError::RingInvariant) => {
                        panic!("the request ring took no entry although it had a free one")
                    }
                }
            }
            1 => {
                ch.publish(&mem);
            }
            2 => {
                let pick = input.u16();
                let mode = input.u8();
                let tag = if mode & 1 == 0 && !tags.is_empty() {
                    tags[usize::from(pick) % tags.len()]
                } else {
                    u32::from(pick)
                };
                let right_len = model.get(&tag).map_or(0, |r| r.len);
                let len = if mode & 2 == 0 {
                    right_len
                } else {
                    input.u32()
                };
                let epoch = if mode & 4 == 0 {
                    EPOCH as u32
                } else {
                    input.u32()
                };
                let status = u16::from(input.u8() % 4);
                let mut entry = [0u8; 16];
                entry[..4].copy_from_slice(&tag.to_le_bytes());
                entry[4..6].copy_from_slice(&status.to_le_bytes());
                entry[8..12].copy_from_slice(&len.to_le_bytes());
                entry[12..16].copy_from_slice(&epoch.to_le_bytes());
                let ring = u64::from(header.cpl_ring);
                let slot = u64::from(cpl_producer % header.cpl_entries);
                mem.write_slice(&entry, GuestAddress(BASE + ring + ENTRIES + slot * 16))
                    .expect("in the channel");
                cpl_producer = cpl_producer.wrapping_add(1);
                mem.write_obj(cpl_producer, GuestAddress(BASE + ring + PRODUCER))
                    .expect("in the channel");
            }
            3 => {
                let which = input.u8();
                let value = input.u32();
                let ring = if which & 1 == 0 {
                    header.req_ring
                } else {
                    header.cpl_ring
                };
                let index = if which & 2 == 0 { PRODUCER } else { CONSUMER };
                mem.write_obj(value, GuestAddress(BASE + u64::from(ring) + index))
                    .expect("in the channel");
                if which & 3 == 1 {
                    cpl_producer = value;
                }
            }
            4 => {
                done.clear();
                let was_broken = ch.broken();
                match ch.poll(&mem, &mut done) {
                    Ok(n) => {
                        assert!(was_broken.is_none());
                        assert_eq!(n, done.len());
                    }
                    Err(e) => {
                        assert_eq!(ch.broken(), Some(e), "a violation breaks the channel");
                        assert!(matches!(
                            ch.submit(&mem, op::FLUSH, 0, 0, None),
                            Err(SubmitError::Broken)
                        ));
                    }
                }
                for d in &done {
                    let tag = d.request.tag;
                    let posted = model
                        .remove(&tag)
                        .unwrap_or_else(|| panic!("tag {tag} accepted without being in flight"));
                    assert_eq!(
                        (
                            d.request.op,
                            d.request.sector,
                            d.request.sectors,
                            d.request.len
                        ),
                        (posted.op, posted.sector, posted.sectors, posted.len)
                    );
                    assert!(d.len <= posted.len, "length {} over {}", d.len, posted.len);
                    tags.retain(|&t| t != tag);
                    let mut buf = vec![0u8; d.len as usize];
                    ch.finish(&mem, d, Some(&mut buf));
                }
            }
            _ => {
                let mut info = DeviceInfo::default();
                let bytes = input.bytes(info.as_slice().len());
                info.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
                mem.write_obj(info, GuestAddress(BASE + DEVICE_INFO_OFFSET))
                    .expect("in the channel");
                if let Ok(got) = ch.device_info(&mem) {
                    assert_eq!(got, info);
                    assert!(got.capacity_sectors > 0);
                    assert!(got.block_size == 512 || got.block_size == 4096);
                    assert!(got.max_transfer > 0 && got.max_transfer <= ch.max_transfer());
                }
            }
        }
        assert_eq!(ch.in_flight(), model.len());
        assert!(ch.free_slots() + ch.in_flight() == slots || ch.broken().is_some());
    }
}

/// Seeds: requests of every kind completed in order and out of order, an unknown tag, a
/// stale epoch, an overlong completion, a producer index that jumps, and device info.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let submit = |s: &mut Seed, operation: u8, sector: u32, sectors: u8| {
        s.u8(0).u8(operation).u32(sector).u8(sectors);
    };
    let complete = |s: &mut Seed, pick: u16| {
        s.u8(2).u16(pick).u8(0).u8(0);
    };
    let mut good = Seed::new();
    submit(&mut good, op::WRITE as u8, 0, 8);
    submit(&mut good, op::READ as u8, 8, 1);
    submit(&mut good, op::FLUSH as u8, 0, 0);
    good.u8(1);
    complete(&mut good, 1);
    complete(&mut good, 0);
    good.u8(4);
    complete(&mut good, 0);
    good.u8(4);
    let good = good.finish();

    let bad = |tail: &dyn Fn(&mut Seed)| {
        let mut s = Seed::new();
        submit(&mut s, op::READ as u8, 0, 2);
        s.u8(1);
        tail(&mut s);
        s.u8(4);
        s.finish()
    };
    let info = DeviceInfo {
        capacity_sectors: 1 << 20,
        block_size: 4096,
        max_transfer: 8192,
        ..Default::default()
    };
    let mut info_seed = Seed::new();
    info_seed.u8(5).bytes(info.as_slice());
    vec![
        ("in_order".into(), good),
        (
            "unknown_tag".into(),
            bad(&|s| {
                s.u8(2).u16(99).u8(1).u8(0);
            }),
        ),
        (
            "stale_epoch".into(),
            bad(&|s| {
                s.u8(2).u16(0).u8(4).u32(6).u8(0);
            }),
        ),
        (
            "overlong".into(),
            bad(&|s| {
                s.u8(2).u16(0).u8(2).u32(4096).u8(0);
            }),
        ),
        (
            "index_jump".into(),
            bad(&|s| {
                s.u8(3).u8(1).u32(1000);
            }),
        ),
        ("device_info".into(), info_seed.finish()),
    ]
}
