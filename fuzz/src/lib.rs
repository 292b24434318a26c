//! ddvm's fuzz targets: what each one drives, its input format, and its seeds.
//!
//! Every target is a module here with `run(data)`, which the libFuzzer binary in
//! `fuzz_targets/` calls, and `seeds()`, the valid inputs the `seeds` binary writes into
//! `corpus/<target>/`. Inputs are read with [`Input`], which never fails: a short input reads
//! as zeros, so every byte string is an input and the fuzzer spends no time on a format.
//! Seeds are written with [`Seed`], its mirror image. `docs/FUZZING.md` says how to run them.

pub mod blk_intake;
pub mod bzimage;
pub mod config;
pub mod control;
pub mod desc_chain;
pub mod e1000;
pub mod elf;
pub mod host_channel;
pub mod log_panic;
pub mod nvme;
pub mod virtio_mmio;
pub mod virtio_net;
pub mod virtq;

use ddvm::memory::GuestMem;

/// Reads a fuzz input front to back; past its end every value is zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// An input over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A byte string: a u16 length, then that many bytes (fewer at the end).
    pub fn blob(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }
}

/// Writes an input in the format [`Input`] reads (seeds and regression inputs).
#[derive(Default)]
pub struct Seed(Vec<u8>);

impl Seed {
    /// An empty input.
    pub fn new() -> Self {
        Seed::default()
    }

    /// A byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// A byte string as [`Input::blob`] reads it.
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        let n = b.len().min(usize::from(u16::MAX));
        self.u16(n as u16).bytes(&b[..n])
    }

    /// The bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Guest memory of `size` bytes at address 0: vm-memory's `GuestMemoryMmap`, the type the
/// VMM gives its guests (without `ddvm::memory::create`'s 2 MiB rounding: a smaller
/// mapping is a faster execution).
pub fn guest_memory(size: u64) -> GuestMem {
    GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), size as usize)])
        .expect("fuzz guest memory")
}

/// A target's seeds: (name, input).
pub type SeedFn = fn() -> Vec<(String, Vec<u8>)>;

/// A target: its name, what runs one input, its seeds.
pub type Target = (&'static str, fn(&[u8]), SeedFn);

/// The targets (for the `seeds` binary).
pub const TARGETS: &[Target] = &[
    ("blk_intake", blk_intake::run, blk_intake::seeds),
    ("virtio_mmio", virtio_mmio::run, virtio_mmio::seeds),
    ("desc_chain", desc_chain::run, desc_chain::seeds),
    ("nvme", nvme::run, nvme::seeds),
    ("host_channel", host_channel::run, host_channel::seeds),
    ("log_panic", log_panic::run, log_panic::seeds),
    ("control", control::run, control::seeds),
    ("config", config::run, config::seeds),
    ("elf", elf::run, elf::seeds),
    ("bzimage", bzimage::run, bzimage::seeds),
    ("virtio_net", virtio_net::run, virtio_net::seeds),
    ("e1000", e1000::run, e1000::seeds),
];
