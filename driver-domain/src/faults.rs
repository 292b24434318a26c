//! Fault injection inside the driver domain: the requests of `ddvm_abi::channel::fault`, taken
//! from the channel's fault word and argument (the VMM, in chaos runs) or from the command line
//! (`fault=N fault_arg=N`, right after ready).
//!
//! Every kind imitates a driver bug the VMM must survive, and every one is deliberate and easy
//! to find here:
//! - 1 to 5 end the domain at once, through the path a real bug takes (guest-kernel's `fault`);
//! - `fault::WILD_WRITE` scribbles on the channel right away (`wild_write`);
//! - `fault::BOGUS_TAG`, `fault::BOGUS_LEN`, `fault::STALE_EPOCH`, `fault::DMA_OUTSIDE`,
//!   `fault::SLOW`, `fault::FAIL_WRITE`, `fault::FAIL_FLUSH` and `fault::LINK_FLAP` arm a
//!   `Sabotage`, which the channel service consults when it takes a request, when it completes
//!   one, and on every pass (the network service's link check: `LINK_FLAP`);
//! - `fault::BITFLIP` flips random bits of the domain's own image (`bitflip`).
//!
//! All of it is in the image only when it is built with the `fault-injection` feature (a
//! build of ddvm with its own `fault-injection` feature builds it so); otherwise requests are
//! reported and ignored, and the channel service's hooks do nothing.

#![forbid(unsafe_code)]

#[cfg(feature = "fault-injection")]
pub use on::*;

#[cfg(not(feature = "fault-injection"))]
pub use off::*;

/// A fault-injection request: one of `ddvm_abi::channel::fault` and its argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    /// One of `ddvm_abi::channel::fault`.
    pub code: u32,
    /// `ChannelHeader::fault_arg` (or `fault_arg=N` on the command line).
    pub arg: u32,
}

/// What a request the service took is, as far as fault injection cares: the block class's
/// `FAIL_FLUSH` and `FAIL_WRITE` pick their victims by it; every other kind (and every net
/// request) is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// A block flush.
    Flush,
    /// A block write starting at `sector`.
    Write {
        /// First sector.
        sector: u64,
    },
    /// Anything else.
    Other,
}

/// The image built with fault injection (the `fault-injection` feature, which a build of ddvm
/// with its own `fault-injection` feature turns on).
#[cfg(feature = "fault-injection")]
mod on {
    use alloc::vec::Vec;
    use core::mem::{offset_of, size_of};

    use ddvm_abi::channel::{
        blk, fault, net, offset, ring, ChannelHeader, Completion, Entry, DEVICE_INFO_OFFSET,
    };
    use ddvm_abi::layout::PAGE_SIZE;
    use guest_kernel::{boot, println, time};

    use crate::service::ChannelService;

    use super::{Injection, Taken};

    /// Acts on `inj`. The kinds that work through the channel need `service`; without one
    /// (no channel) they are logged and ignored.
    pub fn inject(inj: Injection, service: Option<&mut dyn ChannelService>) {
        let Injection { code, arg } = inj;
        println!("fault injected: {code} arg {arg:#x}");
        match code {
            fault::PANIC => panic!("fault injected: panic"),
            fault::INVALID_OPCODE => guest_kernel::fault::invalid_opcode(),
            fault::PAGE_FAULT => guest_kernel::fault::page_fault(),
            fault::HANG => guest_kernel::fault::hang(),
            fault::TRIPLE_FAULT => guest_kernel::fault::triple_fault(),
            fault::BITFLIP => bitflip(arg),
            code if needs_service(code) => match service {
                Some(s) => on_channel(code, arg, s),
                None => println!("fault {code}: no channel to misbehave on: ignored"),
            },
            other => println!("ignoring unknown fault request {other}"),
        }
    }

    /// Whether fault `code` works through the channel service (rather than ending the domain).
    pub fn needs_service(code: u32) -> bool {
        matches!(
            code,
            fault::WILD_WRITE
                | fault::BOGUS_TAG
                | fault::BOGUS_LEN
                | fault::STALE_EPOCH
                | fault::DMA_OUTSIDE
                | fault::SLOW
                | fault::FAIL_WRITE
                | fault::FAIL_FLUSH
                | fault::LINK_FLAP
        )
    }

    /// The faults that misuse the channel or the device.
    fn on_channel(code: u32, arg: u32, s: &mut dyn ChannelService) {
        if code == fault::WILD_WRITE {
            return wild_write(s, arg, &mut Rng::new(time::ticks()));
        }
        let armed = s.sabotage();
        match code {
            fault::BOGUS_TAG => armed.bogus_tag = Some(if arg == 0 { u32::MAX } else { arg }),
            fault::BOGUS_LEN => armed.extra_len = Some(if arg == 0 { 512 } else { arg }),
            fault::STALE_EPOCH => armed.epochs_back = Some(arg.max(1)),
            fault::DMA_OUTSIDE => {
                let end = boot::info().mem_size.next_multiple_of(PAGE_SIZE);
                let addr = end + u64::from(arg) * PAGE_SIZE;
                println!("fault: the next read or write DMAs at {addr:#x}, past the memory's end");
                armed.dma_outside = Some(addr);
            }
            fault::FAIL_WRITE => armed.fail_write = Some(u64::from(arg)),
            fault::FAIL_FLUSH => armed.fail_flush = true,
            fault::LINK_FLAP => {
                armed.link_flap = Some(Flap {
                    remaining: if arg == 0 { 100 } else { arg },
                    down: false,
                    next: time::ticks(),
                });
            }
            fault::SLOW => {
                armed.slow = (arg & 0xffff != 0).then(|| Slow {
                    delay_ticks: time::us_to_ticks(u64::from(arg & 0xffff) * 1000),
                    remaining: (arg >> 16 != 0).then_some(arg >> 16),
                });
            }
            _ => unreachable!("not a channel fault: {code}"),
        }
    }

    /// A slow period: completions held back.
    #[derive(Clone, Copy, Debug)]
    pub struct Slow {
        delay_ticks: u64,
        /// Requests still to slow down (`None`: every one, until the next `SLOW`).
        remaining: Option<u32>,
    }

    /// A link flapping on purpose: the word to write next and when.
    #[derive(Clone, Copy, Debug)]
    pub struct Flap {
        remaining: u32,
        down: bool,
        next: u64,
    }

    /// Ticks between two rewrites of the link word while flapping (10 ms).
    fn flap_ticks() -> u64 {
        time::us_to_ticks(10_000)
    }

    /// What happens to one request's completion.
    #[derive(Clone, Copy, Debug)]
    struct Mark {
        tag: u32,
        /// The request's length (a bogus length is claimed beyond it).
        len: u32,
        extra_len: Option<u32>,
        epochs_back: u32,
        delay_ticks: u64,
    }

    /// Misbehaviour armed by fault requests, applied by the channel service. One-shot faults act
    /// on the next request taken; a bogus tag is posted as soon as the completion ring has room.
    #[derive(Debug, Default)]
    pub struct Sabotage {
        /// A completion to post for this tag, never given by the VMM.
        pub bogus_tag: Option<u32>,
        /// The next request completes claiming this many bytes more than it had.
        pub extra_len: Option<u32>,
        /// The next request completes with the epoch this many boots back.
        pub epochs_back: Option<u32>,
        /// The next read or write DMAs at this address instead of its bounce slot.
        pub dma_outside: Option<u64>,
        /// Completions of the next requests are held back.
        pub slow: Option<Slow>,
        /// The next write taken that starts at this sector completes with an I/O error.
        pub fail_write: Option<u64>,
        /// The next flush taken completes with an I/O error.
        pub fail_flush: bool,
        /// The link word is being flapped (a network domain).
        pub link_flap: Option<Flap>,
        /// Requests taken whose completion is tampered with.
        marked: Vec<Mark>,
        /// Completions held back, with the tick they are due.
        held: Vec<(u64, Completion)>,
    }

    impl Sabotage {
        /// The service took request `tag` of `len` bytes, of kind `what`: arms what applies
        /// to it. True when the request is to fail at once, with an I/O error, without
        /// reaching the device.
        pub fn taken(&mut self, tag: u32, len: u32, what: Taken) -> bool {
            if what == Taken::Flush && self.fail_flush {
                self.fail_flush = false;
                println!("fault: failing the flush of tag {tag}");
                return true;
            }
            if let Taken::Write { sector } = what {
                if self.fail_write == Some(sector) {
                    self.fail_write = None;
                    println!("fault: failing the write of tag {tag} at sector {sector}");
                    return true;
                }
            }
            let delay_ticks = match self.slow.as_mut() {
                Some(slow) => {
                    let delay = slow.delay_ticks;
                    if let Some(n) = slow.remaining.as_mut() {
                        *n -= 1;
                        if *n == 0 {
                            self.slow = None;
                        }
                    }
                    delay
                }
                None => 0,
            };
            let mark = Mark {
                tag,
                len,
                extra_len: self.extra_len.take(),
                epochs_back: self.epochs_back.take().unwrap_or(0),
                delay_ticks,
            };
            if mark.extra_len.is_some() || mark.epochs_back != 0 {
                println!("fault: tampering with the completion of tag {tag}: {mark:?}");
            }
            if mark.extra_len.is_some() || mark.epochs_back != 0 || delay_ticks != 0 {
                self.marked.push(mark);
            }
            false
        }

        /// Where a read or write of `tag` is to DMA instead of its bounce slot, if armed.
        pub fn redirect(&mut self, tag: u32) -> Option<u64> {
            let addr = self.dma_outside.take()?;
            println!("fault: tag {tag} submitted with its buffer at {addr:#x}");
            Some(addr)
        }

        /// A completion the service is about to post: returns it (tampered with if its request
        /// was marked), or `None` when it is held back (see [`Sabotage::due`]).
        pub fn complete(&mut self, mut c: Completion) -> Option<Completion> {
            let Some(at) = self.marked.iter().position(|m| m.tag == c.tag) else {
                return Some(c);
            };
            let m = self.marked.swap_remove(at);
            if let Some(extra) = m.extra_len {
                c.len = m.len.saturating_add(extra);
            }
            c.epoch = c.epoch.wrapping_sub(m.epochs_back);
            if m.delay_ticks == 0 {
                return Some(c);
            }
            self.held
                .push((time::ticks().saturating_add(m.delay_ticks), c));
            None
        }

        /// A held-back completion that is due now, if any.
        pub fn due(&mut self) -> Option<Completion> {
            let now = time::ticks();
            let at = self.held.iter().position(|&(due, _)| due <= now)?;
            Some(self.held.swap_remove(at).1)
        }

        /// Completions held back (each has completion ring room reserved).
        pub fn held(&self) -> usize {
            self.held.len()
        }

        /// Whether something is to be posted now (the domain must not wait).
        pub fn ready(&self) -> bool {
            let now = time::ticks();
            self.bogus_tag.is_some()
                || self.held.iter().any(|&(due, _)| due <= now)
                || self.link_flap.is_some_and(|f| f.next <= now)
        }

        /// Whether the link is being flapped (the domain must not wait longer than a
        /// millisecond).
        pub fn flapping(&self) -> bool {
            self.link_flap.is_some()
        }

        /// While the link flaps: `Some(Some(up))` when the link word is to be rewritten now
        /// with `up`, `Some(None)` when the flapping just ended (the NIC's own link goes back),
        /// `None` otherwise.
        pub fn flap(&mut self) -> Option<Option<bool>> {
            let f = self.link_flap.as_mut()?;
            let now = time::ticks();
            if f.next > now {
                return None;
            }
            if f.remaining == 0 {
                self.link_flap = None;
                println!("fault: link flapping over");
                return Some(None);
            }
            f.remaining -= 1;
            f.down = !f.down;
            f.next = now + flap_ticks();
            Some(Some(!f.down))
        }
    }

    /// [`fault::WILD_WRITE`]: garbage into the targets `arg` selects (0: all).
    fn wild_write(s: &mut dyn ChannelService, arg: u32, rng: &mut Rng) {
        let all = fault::WILD_WRITE_ENTRIES | fault::WILD_WRITE_HEADER | fault::WILD_WRITE_PRODUCER;
        let targets = if arg == 0 { all } else { arg };
        let region = s.channel().region();
        let h = *s.channel().header();
        if targets & fault::WILD_WRITE_ENTRIES != 0 {
            let entries = u64::from(h.cpl_ring) + ring::ENTRIES;
            for off in (0..u64::from(h.cpl_entries) * Completion::SIZE).step_by(8) {
                region.write::<u64>(entries + off, rng.next());
            }
        }
        if targets & fault::WILD_WRITE_HEADER != 0 {
            // What the VMM wrote (magic, version, epoch; size to max_transfer; class) and the
            // device info it checks at ready; not the live words (state, fault, ready_epoch,
            // heartbeat, flags): losing the ready mark would only hide the rest.
            let info = size_of::<blk::DeviceInfo>().max(size_of::<net::DeviceInfo>()) as u64;
            let fields = [
                0..offset::STATE,
                offset_of!(ChannelHeader, size) as u64..offset::FAULT_ARG,
                offset::CLASS..offset::CLASS + size_of::<u32>() as u64,
                DEVICE_INFO_OFFSET..DEVICE_INFO_OFFSET + info,
            ];
            for off in fields.into_iter().flat_map(|r| r.step_by(4)) {
                region.write::<u32>(off, rng.next() as u32);
            }
        }
        if targets & fault::WILD_WRITE_PRODUCER != 0 {
            // Past everything the ring can hold from any consumer index the VMM can have.
            s.skip_completion_producer(h.cpl_entries + 1 + (rng.next() as u32 >> 2));
        }
        println!("fault: wild write done (targets {targets:#x})");
    }

    /// [`fault::BITFLIP`]: flips `arg & 0xffff` bits (at least one) of the image, seeded by
    /// `arg >> 16` or, when 0, by the TSC (the seed is logged so the run can be repeated).
    fn bitflip(arg: u32) {
        let count = (arg & 0xffff).max(1);
        let seed = match arg >> 16 {
            0 => (time::ticks() % 0xffff) as u32 + 1,
            s => s,
        };
        let image = guest_kernel::fault::image();
        let mut rng = Rng::new(u64::from(seed));
        let flips: Vec<(u64, u32)> = (0..count)
            .map(|_| {
                let addr = image.start + rng.next() % (image.end - image.start);
                (addr, (rng.next() % 8) as u32)
            })
            .collect();
        println!(
            "fault: flipping {count} bits of the image {:#x}..{:#x} with seed {seed} \
             (fault_arg {:#x} repeats it); first: {:x?}",
            image.start,
            image.end,
            count | seed << 16,
            &flips[..flips.len().min(8)]
        );
        for &(addr, bit) in &flips {
            guest_kernel::fault::flip_image_bit(addr, bit);
        }
        println!("fault: {count} bits flipped");
    }

    /// A small, seedable random generator (SplitMix64).
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed)
        }

        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }
}

/// The image built without fault injection: requests are reported and ignored, and nothing is
/// ever armed, so none of the misbehaviour above is in the image.
#[cfg(not(feature = "fault-injection"))]
mod off {
    use ddvm_abi::channel::Completion;
    use guest_kernel::println;

    use super::{Injection, Taken};
    use crate::service::ChannelService;

    /// Reports a fault request this image cannot carry out.
    pub fn inject(inj: Injection, _service: Option<&mut dyn ChannelService>) {
        println!(
            "fault {} requested: this image is built without fault injection; ignored",
            inj.code
        );
    }

    /// No fault works through the channel service here.
    pub fn needs_service(_code: u32) -> bool {
        false
    }

    /// Nothing armed, ever.
    #[derive(Debug, Default)]
    pub struct Sabotage {
        /// Never set.
        pub bogus_tag: Option<u32>,
    }

    impl Sabotage {
        /// Never fails a request.
        pub fn taken(&mut self, _tag: u32, _len: u32, _what: Taken) -> bool {
            false
        }

        /// Never redirects a request.
        pub fn redirect(&mut self, _tag: u32) -> Option<u64> {
            None
        }

        /// Passes every completion through.
        pub fn complete(&mut self, c: Completion) -> Option<Completion> {
            Some(c)
        }

        /// Holds nothing back.
        pub fn due(&mut self) -> Option<Completion> {
            None
        }

        /// Holds nothing back.
        pub fn held(&self) -> usize {
            0
        }

        /// Has nothing to post.
        pub fn ready(&self) -> bool {
            false
        }

        /// Never flaps the link.
        pub fn flapping(&self) -> bool {
            false
        }

        /// Never flaps the link.
        pub fn flap(&mut self) -> Option<Option<bool>> {
            None
        }
    }
}
