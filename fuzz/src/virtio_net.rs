//! The virtio-net device as the network service drives it: a client's RX, TX and control
//! queues (direct and indirect chains) served by `NetPort::transmit`, `complete_tx`,
//! `receive` and `control`, with resets in between.
//!
//! Input: the features the driver accepts (a byte: MRG_RXBUF, CTRL_VQ, EVENT_IDX), then ops,
//! each a selector byte (the queue) and an op byte. `op % 9`: 0 to 3 a driver step
//! ([`crate::virtq::Driver::step`]) on the selected queue; 4 a transmit pass whose backend
//! answers Queued, Done or Busy as the input says; 5 completes a frame the backend holds (or
//! one it completed already); 6 offers a frame for the client; 7 a control pass; 8 a reset and
//! re-activation.
//!
//! Checked: a frame handed to the backend is at most the largest frame; a completion returns
//! true exactly for a frame in flight of the current activation, once; the frames in flight
//! are what the backend holds; every used entry names a head the driver published and has
//! not had back; a delivered frame lands in at least one chain.

use std::sync::Arc;

use ddvm::net::device::{
    feature, NetConfig, NetPort, Rx, TxBackend, TxToken, TxVerdict, VirtioNet, CTRL_QUEUE_SIZE,
    QUEUE_SIZE,
};
use ddvm::virtio::{features, Interrupt, VirtioDevice};

use crate::virtq::{Driver, SeedDriver, Step, DATA, F_NEXT, F_WRITE};
use crate::{guest_memory, Input, Seed};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

struct Backend<'a> {
    verdicts: &'a [u8],
    held: Vec<TxToken>,
    max_frame: usize,
}

impl TxBackend for Backend<'_> {
    fn transmit(&mut self, token: TxToken, frame: &[u8]) -> TxVerdict {
        assert!(frame.len() <= self.max_frame, "frame of {}", frame.len());
        let (v, rest) = self.verdicts.split_first().unwrap_or((&0, &[]));
        self.verdicts = rest;
        match v % 3 {
            0 => {
                self.held.push(token);
                TxVerdict::Queued
            }
            1 => TxVerdict::Done,
            _ => TxVerdict::Busy,
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let accept = input.u8();
    let mut acked = features::VERSION_1 | features::INDIRECT_DESC | feature::MAC;
    for (bit, f) in [
        (1, feature::MRG_RXBUF),
        (
            2,
            feature::CTRL_VQ | feature::CTRL_RX | feature::CTRL_MAC_ADDR,
        ),
        (4, features::EVENT_IDX),
    ] {
        if accept & bit != 0 {
            acked |= f;
        }
    }
    let mem = guest_memory(1 << 20);
    let config = NetConfig {
        mac: MAC,
        mtu: 1500,
    };
    let port =
        NetPort::new("fuzz", mem.clone(), config, Interrupt::new(Arc::new(|| {}))).expect("port");
    let mut device = VirtioNet::new(port.clone());
    let sizes = [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE];
    let mut drivers: Vec<Driver> = (0..3)
        .map(|n| Driver::new(mem.clone(), n as u16, sizes[n]))
        .collect();
    let activate = |device: &mut VirtioNet, drivers: &mut [Driver]| {
        for d in drivers.iter_mut() {
            d.set_avail_idx(0);
            d.adopt_avail();
            d.used_seen = 0;
            let _ = vm_memory::Bytes::write_obj(
                &d.mem,
                0u16,
                vm_memory::GuestAddress(crate::virtq::USED + d.rings + 2),
            );
        }
        let queues = drivers.iter().map(|d| Some(d.queue())).collect();
        device.activate(acked, queues).expect("activation");
    };
    activate(&mut device, &mut drivers);
    let mut owed: Vec<Vec<u32>> = sizes.iter().map(|&s| vec![0; usize::from(s)]).collect();
    let mut held: Vec<TxToken> = Vec::new();
    let mut stale: Vec<TxToken> = Vec::new();
    // Per queue: its available ring was written behind the model's back (until a reset).
    let mut blind = [false; 3];
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        let sel = usize::from(input.u8()) % 3;
        let op = input.u8();
        match op % 9 {
            0..=3 => match drivers[sel].step(op, &mut input) {
                Some(Step::Published(head)) => {
                    let size = drivers[sel].size;
                    owed[sel][usize::from(head % size)] += 1;
                }
                Some(Step::AvailRings(mask)) => {
                    for (q, b) in blind.iter_mut().enumerate() {
                        *b |= mask >> q & 1 == 1;
                    }
                }
                None => {}
            },
            4 => {
                let budget = usize::from(input.u8() % 32);
                let verdicts = input.blob();
                let mut backend = Backend {
                    verdicts,
                    held: Vec::new(),
                    max_frame: config.max_frame(),
                };
                port.transmit(&mut backend, budget);
                held.extend(backend.held);
            }
            5 => {
                let pick = usize::from(input.u16());
                let from_held = input.u8() & 1 == 0;
                if from_held && !held.is_empty() {
                    let token = held.swap_remove(pick % held.len());
                    assert!(port.complete_tx(token), "a frame in flight completes");
                    stale.push(token);
                } else if !stale.is_empty() {
                    // A token names a head of an activation: one completed (or of an earlier
                    // activation) is refused, unless the head is in flight again.
                    let token = stale[pick % stale.len()];
                    if !held.contains(&token) {
                        assert!(!port.complete_tx(token), "a frame completes twice");
                    }
                }
            }
            6 => {
                let frame = input.blob();
                if let Rx::Delivered(n) = port.receive(frame) {
                    assert!(n >= 1);
                }
            }
            7 => {
                port.control(usize::from(input.u8() % 16));
            }
            _ => {
                device.reset();
                stale.append(&mut held);
                for (q, d) in drivers.iter_mut().enumerate() {
                    d.take_used();
                    owed[q].fill(0);
                }
                blind = [false; 3];
                activate(&mut device, &mut drivers);
            }
        }
        assert_eq!(port.tx_in_flight(), held.len());
        for (q, d) in drivers.iter_mut().enumerate() {
            blind[q] |= !d.avail_intact();
            for (id, _len) in d.take_used() {
                let n = owed[q]
                    .get_mut(id as usize)
                    .unwrap_or_else(|| panic!("used id {id} beyond queue {q}"));
                if !blind[q] {
                    assert!(*n > 0, "head {id} of queue {q} given back but not owed");
                }
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// Seeds: RX buffers posted and a frame received into them, a TX frame sent and completed,
/// a control command, and a reset with a frame in flight.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut s = Seed::new();
    s.u8(3); // MRG_RXBUF, CTRL_VQ
             // RX: two 2 KiB buffers.
    for i in 0..2u16 {
        s.u8(0)
            .desc(0, i, DATA + u64::from(i) * 0x800, 0x800, F_WRITE, 0);
        s.u8(0).publish(2, i);
    }
    let mut frame = vec![0u8; 60];
    frame[..6].copy_from_slice(&MAC);
    frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    s.u8(0).u8(6).blob(&frame);
    // TX: header and frame in two descriptors.
    let tx = 0x40000u64;
    let mut hdr_frame = vec![0u8; 12];
    let mut out = frame.clone();
    out[..6].copy_from_slice(&[0xff; 6]);
    out[6..12].copy_from_slice(&MAC);
    hdr_frame.extend_from_slice(&out);
    s.u8(1).poke(3, tx as u32, &hdr_frame);
    s.u8(1).desc(0, 0, tx, 12, F_NEXT, 1);
    s.u8(1).desc(0, 1, tx + 12, out.len() as u32, 0, 0);
    s.u8(1).publish(2, 0);
    s.u8(1).u8(4).u8(8).blob(&[0]);
    s.u8(1).u8(5).u16(0).u8(0);
    // Control: RX mode, promiscuous on.
    let ctrl = 0x48000u64;
    s.u8(2).poke(3, ctrl as u32, &[0, 0, 1]);
    s.u8(2).desc(0, 0, ctrl, 3, F_NEXT, 1);
    s.u8(2).desc(0, 1, ctrl + 0x10, 1, F_WRITE, 0);
    s.u8(2).publish(2, 0);
    s.u8(2).u8(7).u8(4);
    let all = s.finish();
    let mut reset = all.clone();
    reset.extend(
        Seed::new()
            .u8(1)
            .desc(0, 2, tx, 72, 0, 0)
            .u8(1)
            .publish(2, 2)
            .u8(1)
            .u8(4)
            .u8(8)
            .blob(&[0])
            .u8(0)
            .u8(8)
            .u8(1)
            .u8(5)
            .u16(0)
            .u8(1)
            .finish(),
    );
    vec![("traffic".into(), all), ("reset_in_flight".into(), reset)]
}
