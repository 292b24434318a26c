//! What a written block holds, and how a read block is judged.
//!
//! Every block written starts with a 48-byte header (little-endian):
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic `DDVMBLK1` (u64) |
//! | 8 | run: a per-boot nonce, so blocks of an earlier run are told apart (u64) |
//! | 16 | client id (u32) |
//! | 20 | generation of this block, 1 at its first write in the run (u32) |
//! | 24 | block number, in units of `bs` from the start of the device (u64) |
//! | 32 | block size in bytes (u32) |
//! | 36 | zero (u32) |
//! | 40 | checksum of bytes 0..40 and 48..bs (u64) |
//!
//! and the rest is a payload generated from (id, run, block, generation) by a xorshift PRNG, so
//! a read can be checked word by word without keeping copies.

/// `DDVMBLK1`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"DDVMBLK1");
/// Header bytes.
pub const HEADER: usize = 48;
const CHECKSUM_AT: usize = 40;

/// Who wrote a block, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Client id.
    pub id: u32,
    /// Run nonce.
    pub run: u64,
    /// Block number.
    pub block: u64,
    /// Generation.
    pub gen: u32,
}

/// What a read block turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The block the last acknowledged write left.
    Ok,
    /// No header: never written, or zeroed.
    Unwritten,
    /// Checksum or payload wrong, or a generation never written.
    Corrupt(Corruption),
    /// A well-formed block of another client or block number.
    Misplaced {
        /// Its client id.
        id: u32,
        /// Its block number.
        block: u64,
    },
    /// A well-formed block older than the last acknowledged write.
    Lost {
        /// Its generation.
        gen: u32,
        /// Whether it is from an earlier run.
        earlier_run: bool,
    },
}

/// How a block is corrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// The header's block size is not `bs`.
    BlockSize(u32),
    /// The checksum does not match the contents.
    Checksum,
    /// The payload differs from the one the header implies, first at this byte.
    Payload(usize),
    /// A generation newer than any written.
    Future(u32),
}

fn word(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn put(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// SplitMix64's finaliser: a good 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The payload generator for `s` (never zero).
fn payload_seed(s: &Stamp) -> u64 {
    let a = mix(s.run ^ ((u64::from(s.id) << 32) | u64::from(s.gen)));
    mix(a ^ s.block.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// xorshift64*: next payload word.
#[inline]
fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// One step of the block checksum.
#[inline]
fn fold(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(0x100_0000_01b3).rotate_left(29)
}

const CHECKSUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Fills `buf` (the whole block, a multiple of 8 bytes, at least [`HEADER`]) for `s`.
pub fn fill(buf: &mut [u8], s: &Stamp) {
    let bs = buf.len();
    put(buf, 0, MAGIC);
    put(buf, 8, s.run);
    put(buf, 16, u64::from(s.id) | (u64::from(s.gen) << 32));
    put(buf, 24, s.block);
    put(buf, 32, bs as u64);
    let mut h = CHECKSUM_INIT;
    for at in (0..CHECKSUM_AT).step_by(8) {
        h = fold(h, word(buf, at));
    }
    let mut x = payload_seed(s);
    for chunk in buf[HEADER..].chunks_exact_mut(8) {
        let w = next(&mut x);
        h = fold(h, w);
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    put(buf, CHECKSUM_AT, h);
}

/// The stamp in `buf`'s header, if it has one (the magic).
pub fn header(buf: &[u8]) -> Option<Stamp> {
    (word(buf, 0) == MAGIC).then(|| Stamp {
        run: word(buf, 8),
        id: word(buf, 16) as u32,
        gen: (word(buf, 16) >> 32) as u32,
        block: word(buf, 24),
    })
}

/// Judges `buf` (a whole block) read where the last acknowledged write stored `expect`.
pub fn check(buf: &[u8], expect: &Stamp) -> Verdict {
    let Some(found) = header(buf) else {
        return Verdict::Unwritten;
    };
    let bs = word(buf, 32) as u32;
    if bs as usize != buf.len() {
        return Verdict::Corrupt(Corruption::BlockSize(bs));
    }
    let mut h = CHECKSUM_INIT;
    for at in (0..CHECKSUM_AT).step_by(8) {
        h = fold(h, word(buf, at));
    }
    let mut x = payload_seed(&found);
    let mut first_diff = None;
    for (i, chunk) in buf[HEADER..].chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        h = fold(h, w);
        if w != next(&mut x) && first_diff.is_none() {
            first_diff = Some(HEADER + 8 * i);
        }
    }
    if h != word(buf, CHECKSUM_AT) {
        return Verdict::Corrupt(Corruption::Checksum);
    }
    if let Some(at) = first_diff {
        return Verdict::Corrupt(Corruption::Payload(at));
    }
    if found.id != expect.id || found.block != expect.block {
        return Verdict::Misplaced {
            id: found.id,
            block: found.block,
        };
    }
    if found.run != expect.run || found.gen < expect.gen {
        return Verdict::Lost {
            gen: found.gen,
            earlier_run: found.run != expect.run,
        };
    }
    if found.gen > expect.gen {
        return Verdict::Corrupt(Corruption::Future(found.gen));
    }
    Verdict::Ok
}
