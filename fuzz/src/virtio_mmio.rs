//! The virtio-mmio transport's register interface, with a virtio-blk device behind it: what
//! a client's vCPU reads and writes in the device's window, every width and offset.
//!
//! Input: ops. `op % 4`: 0 writes a register (offset, width, value), 1 reads one, 2 writes a
//! well-known register (the offset picked from the register list, so bring-up is easy to
//! reach), 3 reads the configuration space.
//!
//! Checked: the identity registers never change; FEATURES_OK is kept only for features the
//! device offers, VERSION_1 among them; DRIVER_OK only after FEATURES_OK; the device serves
//! queues only while the driver has DRIVER_OK and after a reset none; status 0 resets.

use std::sync::Arc;

use ddvm::blk::{BlockGeometry, ClientPort, LbaRange, VirtioBlock};
use ddvm::devices::BusDevice;
use ddvm::virtio::mmio::MmioTransport;
use ddvm::virtio::{features, status, Interrupt, VirtioDevice};
use virtio_bindings::virtio_mmio as r;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{guest_memory, Input, Seed};

/// Registers a driver writes, for op 2.
const REGS: [u32; 16] = [
    r::VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    r::VIRTIO_MMIO_DRIVER_FEATURES,
    r::VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    r::VIRTIO_MMIO_QUEUE_SEL,
    r::VIRTIO_MMIO_QUEUE_NUM,
    r::VIRTIO_MMIO_QUEUE_READY,
    r::VIRTIO_MMIO_QUEUE_NOTIFY,
    r::VIRTIO_MMIO_INTERRUPT_ACK,
    r::VIRTIO_MMIO_STATUS,
    r::VIRTIO_MMIO_QUEUE_DESC_LOW,
    r::VIRTIO_MMIO_QUEUE_DESC_HIGH,
    r::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    r::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    r::VIRTIO_MMIO_QUEUE_USED_LOW,
    r::VIRTIO_MMIO_QUEUE_USED_HIGH,
    r::VIRTIO_MMIO_CONFIG,
];

fn read32(t: &mut MmioTransport<VirtioBlock>, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest_memory(1 << 20);
    let geometry = BlockGeometry {
        range: LbaRange {
            first: 0,
            sectors: 1 << 16,
        },
        block_size: 512,
        read_only: false,
        discard: true,
        write_zeroes: true,
        serial: "fuzz".into(),
        queues: 2,
    };
    let port = ClientPort::new(
        "mmio",
        mem.clone(),
        geometry,
        Interrupt::new(Arc::new(|| {})),
    )
    .expect("port");
    let device = VirtioBlock::new(port.clone());
    let offered = device.features();
    let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut t = MmioTransport::new(device, mem, Interrupt::new(Arc::new(|| {})), notify);
    // The driver's features as the transport should have them (the model).
    let (mut sel, mut driver_features) = (0u32, 0u64);
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        let before = t.status();
        match input.u8() % 4 {
            op @ (0 | 2) => {
                let offset = if op == 0 {
                    u32::from(input.u16() % 0x1000)
                } else {
                    REGS[usize::from(input.u8()) % REGS.len()]
                };
                let width = [1usize, 2, 4, 8][usize::from(input.u8() % 4)];
                let value = input.u64();
                let bytes = value.to_le_bytes();
                let aligned = width == 4 && offset % 4 == 0;
                let low = value & 0xffff_ffff;
                if aligned && offset == r::VIRTIO_MMIO_DRIVER_FEATURES_SEL {
                    sel = value as u32;
                } else if aligned
                    && offset == r::VIRTIO_MMIO_DRIVER_FEATURES
                    && before & status::FEATURES_OK == 0
                {
                    match sel {
                        0 => driver_features = driver_features & !0xffff_ffff | low,
                        1 => driver_features = driver_features & 0xffff_ffff | low << 32,
                        _ => {}
                    }
                }
                t.write(u64::from(offset), &bytes[..width]);
                if aligned && offset == r::VIRTIO_MMIO_STATUS && value as u32 == 0 {
                    assert_eq!(t.status(), 0, "status 0 resets");
                    assert!(
                        port.lock().queues.is_empty(),
                        "a reset device serves nothing"
                    );
                    driver_features = 0;
                    sel = 0;
                }
            }
            1 => {
                let offset = u64::from(input.u16() % 0x1000);
                let width = [1usize, 2, 4, 8][usize::from(input.u8() % 4)];
                let mut b = [0u8; 8];
                t.read(offset, &mut b[..width]);
            }
            _ => {
                let offset = u64::from(r::VIRTIO_MMIO_CONFIG) + u64::from(input.u8());
                let width = usize::from(input.u8() % 9);
                let mut b = [0u8; 8];
                t.read(offset, &mut b[..width]);
            }
        }
        assert_eq!(read32(&mut t, r::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read32(&mut t, r::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read32(&mut t, r::VIRTIO_MMIO_DEVICE_ID), 2);
        let st = read32(&mut t, r::VIRTIO_MMIO_STATUS);
        assert_eq!(st, t.status());
        if st & status::FEATURES_OK != 0 {
            assert_eq!(
                driver_features & !offered,
                0,
                "features not offered accepted"
            );
            assert_ne!(
                driver_features & features::VERSION_1,
                0,
                "no VERSION_1 accepted"
            );
        }
        if st & status::DRIVER_OK != 0 {
            assert_ne!(st & status::FEATURES_OK, 0, "DRIVER_OK without FEATURES_OK");
        }
        if !port.lock().queues.is_empty() {
            assert_ne!(st & status::DRIVER_OK, 0, "queues served without DRIVER_OK");
        }
    }
}

/// A register write as op 2 makes it (`reg`: index in the register list).
fn reg(s: &mut Seed, reg: u8, value: u64) {
    s.u8(2).u8(reg).u8(2).u64(value);
}

/// Seeds: a driver's whole bring-up of queue 0 (and a reset), and one that asks for a
/// feature that is not offered.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let index = |offset: u32| REGS.iter().position(|&o| o == offset).unwrap_or(0) as u8;
    let mut s = Seed::new();
    reg(&mut s, index(r::VIRTIO_MMIO_STATUS), 1);
    reg(&mut s, index(r::VIRTIO_MMIO_STATUS), 3);
    reg(&mut s, index(r::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 1);
    reg(&mut s, index(r::VIRTIO_MMIO_DRIVER_FEATURES), 1);
    reg(&mut s, index(r::VIRTIO_MMIO_STATUS), 11);
    reg(&mut s, index(r::VIRTIO_MMIO_QUEUE_SEL), 0);
    reg(&mut s, index(r::VIRTIO_MMIO_QUEUE_NUM), 128);
    reg(&mut s, index(r::VIRTIO_MMIO_QUEUE_DESC_LOW), 0x1000);
    reg(&mut s, index(r::VIRTIO_MMIO_QUEUE_AVAIL_LOW), 0x2000);
    reg(&mut s, index(r::VIRTIO_MMIO_QUEUE_USED_LOW), 0x3000);
    reg(&mut s, index(r::VIRTIO_MMIO_QUEUE_READY), 1);
    reg(&mut s, index(r::VIRTIO_MMIO_STATUS), 15);
    s.u8(3).u8(0).u8(8);
    reg(&mut s, index(r::VIRTIO_MMIO_QUEUE_NOTIFY), 0);
    let bring_up = s.finish();
    let mut reset = bring_up.clone();
    reset.extend(Seed::new().u8(0).u16(0x70).u8(2).u64(0).finish());
    let mut bad = Seed::new();
    reg(&mut bad, index(r::VIRTIO_MMIO_STATUS), 3);
    reg(&mut bad, index(r::VIRTIO_MMIO_DRIVER_FEATURES), 0xffff_ffff);
    reg(&mut bad, index(r::VIRTIO_MMIO_STATUS), 11);
    vec![
        ("bring_up".into(), bring_up),
        ("reset".into(), reset),
        ("unoffered_feature".into(), bad.finish()),
    ]
}
