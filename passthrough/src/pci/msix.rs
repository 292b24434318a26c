//! MSI-X as a driver domain sees it: the table and Pending Bit Array in a BAR, and the
//! capability's MSI-X Enable and Function Mask.
//!
//! A domain never takes a real interrupt: an MSI-X message is a wake-up of its vCPU (a write
//! of 1 to the domain's wake eventfd, [`WakeDomain`]). The address and data the driver programs
//! are kept and read back but mean nothing; the mask bits, the pending bits and the two
//! control bits decide whether a message is sent now, later or never. An emulated device
//! calls [`Msix::raise`]; a VFIO device's vectors go to the wake eventfd in the kernel, and
//! this table only answers the domain's accesses.
//!
//! Everything here is driven by the domain: any access of any length or alignment is handled
//! (dword and qword accesses as the PCI specification says; others are ignored and read as
//! zeros), the PBA is read-only, and nothing panics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::WakeDomain;
use crate::sync::lock;

/// Most vectors an MSI-X capability can have (Table Size is 11 bits, 0's based).
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Bytes of one table entry: message address (low, high), message data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector Control: Mask Bit.
const VECTOR_MASKED: u32 = 1;

/// Where a function's MSI-X table and Pending Bit Array are, and how many vectors it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    /// Number of vectors (1 to [`MSIX_MAX_VECTORS`]).
    pub vectors: u16,
    /// BAR holding the table (Table BIR).
    pub table_bar: u8,
    /// Offset of the table in that BAR (a multiple of 8).
    pub table_offset: u64,
    /// BAR holding the Pending Bit Array (PBA BIR).
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (a multiple of 8).
    pub pba_offset: u64,
}

impl MsixLayout {
    /// Bytes of the table.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    /// Bytes of the PBA (one bit per vector, in qwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// The MSI-X state of one function, shared (`Arc<Msix>`) by its [`super::PciDevice`], which
/// serves the domain's accesses, and an emulated backend, which raises vectors from its own
/// threads. One short mutex guards it.
pub struct Msix {
    layout: MsixLayout,
    state: Mutex<State>,
    delivered: AtomicU64,
}

struct State {
    /// Per vector: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    /// Pending bits, 64 vectors a qword.
    pba: Vec<u64>,
    enabled: bool,
    function_mask: bool,
    /// The domain to wake, while the function serves one.
    wake: Option<WakeDomain>,
}

impl State {
    fn power_on(vectors: u16) -> State {
        State {
            table: vec![[0, 0, 0, VECTOR_MASKED]; usize::from(vectors)],
            pba: vec![0; usize::from(vectors).div_ceil(64)],
            enabled: false,
            function_mask: false,
            wake: None,
        }
    }

    fn active(&self) -> bool {
        self.enabled && !self.function_mask
    }

    fn masked(&self, v: usize) -> bool {
        self.table[v][3] & VECTOR_MASKED != 0
    }

    fn pending(&self, v: usize) -> bool {
        self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        let bit = 1u64 << (v % 64);
        if on {
            self.pba[v / 64] |= bit;
        } else {
            self.pba[v / 64] &= !bit;
        }
    }

    /// Sends vector `v`'s message: a wake-up of the domain, if one is attached.
    fn send(&self, delivered: &AtomicU64) -> bool {
        let Some(wake) = &self.wake else {
            return false;
        };
        // Fails only when the counter would overflow: the domain is already woken.
        let _ = wake.write(1);
        delivered.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Sends the pending vectors that may be sent now, clearing their bits.
    fn deliver_pending(&mut self, delivered: &AtomicU64) {
        if !self.active() {
            return;
        }
        for v in 0..self.table.len() {
            if self.pending(v) && !self.masked(v) {
                self.set_pending(v, false);
                self.send(delivered);
            }
        }
    }
}

/// Whether an access of `len` bytes at `offset` is an aligned dword or qword.
fn aligned_access(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
}

impl Msix {
    /// Power-on state for `layout` (its vector count clamped to 1..=[`MSIX_MAX_VECTORS`]):
    /// disabled, every vector masked, nothing pending, no domain to wake.
    pub fn new(layout: MsixLayout) -> Msix {
        let layout = MsixLayout {
            vectors: layout.vectors.clamp(1, MSIX_MAX_VECTORS),
            ..layout
        };
        Msix {
            state: Mutex::new(State::power_on(layout.vectors)),
            layout,
            delivered: AtomicU64::new(0),
        }
    }

    /// Where the table and the PBA are.
    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// The device signals `vector`: if MSI-X is enabled, the function not masked and the
    /// vector unmasked, the domain is woken now; otherwise the vector's pending bit is set and
    /// the message goes when that changes. Returns whether a message was sent now. A vector
    /// the function does not have is ignored.
    pub fn raise(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        if v >= usize::from(self.layout.vectors) {
            return false;
        }
        let mut s = lock(&self.state);
        if s.active() && !s.masked(v) {
            s.send(&self.delivered)
        } else {
            s.set_pending(v, true);
            false
        }
    }

    /// Messages sent so far (wake-ups of the domain).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// The domain reads the table at `offset` (from the table's start). An aligned dword or
    /// qword inside the table reads the entries; anything else reads zeros.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned_access(offset, data.len())
            || offset.saturating_add(data.len() as u64) > self.layout.table_size()
        {
            return;
        }
        let s = lock(&self.state);
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let dword = offset / 4 + i as u64;
            let entry = s.table[(dword / 4) as usize];
            chunk.copy_from_slice(&entry[(dword % 4) as usize].to_le_bytes());
        }
    }

    /// The domain writes the table at `offset`. An aligned dword or qword inside the table
    /// writes the entries (only the Mask Bit of Vector Control, and the low address bits
    /// above 1:0, are writable); unmasking a pending vector sends its message. Anything else
    /// is ignored.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        if !aligned_access(offset, data.len())
            || offset.saturating_add(data.len() as u64) > self.layout.table_size()
        {
            return;
        }
        let mut s = lock(&self.state);
        for (i, chunk) in data.chunks(4).enumerate() {
            let dword = offset / 4 + i as u64;
            let (v, field) = ((dword / 4) as usize, (dword % 4) as usize);
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            s.table[v][field] = match field {
                0 => value & !0b11,
                3 => value & VECTOR_MASKED,
                _ => value,
            };
        }
        s.deliver_pending(&self.delivered);
    }

    /// The domain reads the Pending Bit Array at `offset` (from its start): an aligned dword
    /// or qword inside it reads the bits; anything else reads zeros. The PBA is read-only:
    /// writes to it are dropped by the caller.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned_access(offset, data.len())
            || offset.saturating_add(data.len() as u64) > self.layout.pba_size()
        {
            return;
        }
        let s = lock(&self.state);
        let qword = s.pba[(offset / 8) as usize].to_le_bytes();
        let at = (offset % 8) as usize;
        data.copy_from_slice(&qword[at..at + data.len()]);
    }

    /// Message Control's MSI-X Enable and Function Mask as the domain wrote them; becoming
    /// able to send (enabled and not function-masked) sends the pending unmasked vectors.
    pub fn set_control(&self, enabled: bool, function_mask: bool) {
        let mut s = lock(&self.state);
        s.enabled = enabled;
        s.function_mask = function_mask;
        s.deliver_pending(&self.delivered);
    }

    /// MSI-X Enable.
    pub fn enabled(&self) -> bool {
        lock(&self.state).enabled
    }

    /// Function Mask.
    pub fn function_masked(&self) -> bool {
        lock(&self.state).function_mask
    }

    /// Whether `vector`'s Mask Bit is set (true for a vector the function does not have).
    pub fn masked(&self, vector: u16) -> bool {
        let s = lock(&self.state);
        usize::from(vector) >= s.table.len() || s.masked(usize::from(vector))
    }

    /// Whether `vector`'s pending bit is set.
    pub fn pending(&self, vector: u16) -> bool {
        let s = lock(&self.state);
        usize::from(vector) < s.table.len() && s.pending(usize::from(vector))
    }

    /// Back to power-on (function reset): disabled, not function-masked, every vector masked
    /// with address and data zero, nothing pending. The domain to wake is kept.
    pub fn reset(&self) {
        let mut s = lock(&self.state);
        let wake = s.wake.take();
        *s = State::power_on(self.layout.vectors);
        s.wake = wake;
    }

    /// From now on messages wake the domain behind `wake`.
    pub fn attach(&self, wake: WakeDomain) {
        lock(&self.state).wake = Some(wake);
    }

    /// The domain is going: once this returns its wake eventfd is never written again (a
    /// message in progress holds the same lock).
    pub fn detach(&self) {
        lock(&self.state).wake = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    fn layout(vectors: u16) -> MsixLayout {
        MsixLayout {
            vectors,
            table_bar: 0,
            table_offset: 0x2000,
            pba_bar: 0,
            pba_offset: 0x3000,
        }
    }

    fn wake() -> WakeDomain {
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    /// Wake-ups since the last call.
    fn woken(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    fn unmask(m: &Msix, v: u16) {
        m.table_write(u64::from(v) * 16 + 12, &0u32.to_le_bytes());
    }

    fn mask(m: &Msix, v: u16) {
        m.table_write(u64::from(v) * 16 + 12, &1u32.to_le_bytes());
    }

    #[test]
    fn a_raise_wakes_only_when_enabled_unmasked_and_not_function_masked() {
        let m = Msix::new(layout(4));
        let fd = wake();
        m.attach(fd.clone());
        // Power-on: disabled, all masked.
        assert!(!m.raise(1));
        assert!(m.pending(1));
        assert_eq!(woken(&fd), 0);
        m.set_control(true, true);
        unmask(&m, 1);
        assert_eq!(woken(&fd), 0, "function mask holds it");
        assert!(m.pending(1));
        m.set_control(true, false);
        assert_eq!(
            woken(&fd),
            1,
            "pending message sent when the function mask clears"
        );
        assert!(!m.pending(1));
        assert!(m.raise(1));
        assert_eq!(woken(&fd), 1);
        // A masked vector stays pending until unmasked.
        assert!(!m.raise(2));
        assert!(m.pending(2));
        assert_eq!(woken(&fd), 0);
        unmask(&m, 2);
        assert_eq!(woken(&fd), 1);
        assert!(!m.pending(2));
        // Disabled: pending again, delivered at enable.
        m.set_control(false, false);
        assert!(!m.raise(1));
        assert_eq!(woken(&fd), 0);
        m.set_control(true, false);
        assert_eq!(woken(&fd), 1);
        assert_eq!(m.delivered(), 4);
        // A vector the function does not have is ignored.
        assert!(!m.raise(4));
        assert!(!m.pending(4));
        mask(&m, 1);
        assert!(m.masked(1) && !m.masked(2) && m.masked(9));
    }

    #[test]
    fn the_table_reads_back_with_reserved_bits_clear_and_the_pba_is_read_only() {
        let m = Msix::new(layout(65));
        let entry: [u32; 4] = [0xfee0_0003, 0x1, 0x4041, 0xffff_fffe];
        let bytes: Vec<u8> = entry.iter().flat_map(|d| d.to_le_bytes()).collect();
        m.table_write(64 * 16, &bytes[..8]);
        m.table_write(64 * 16 + 8, &bytes[8..]);
        let mut q = [0u8; 8];
        m.table_read(64 * 16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_0000);
        let mut d = [0u8; 4];
        m.table_read(64 * 16 + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4041);
        m.table_read(64 * 16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "only the mask bit is writable");
        m.raise(3);
        m.raise(64);
        let mut p = [0u8; 8];
        m.pba_read(8, &mut p);
        assert_eq!(u64::from_le_bytes(p), 1, "vector 64 pending");
        m.pba_read(0, &mut p);
        assert_eq!(u64::from_le_bytes(p), 1 << 3);
        m.pba_read(4, &mut d);
        assert_eq!(d, [0; 4]);
        m.reset();
        assert!(!m.enabled() && !m.function_masked());
        assert!(!m.pending(3) && m.masked(64));
        m.table_read(64 * 16, &mut q);
        assert_eq!(q, [0; 8]);
    }

    #[test]
    fn hostile_accesses_are_ignored_without_panicking() {
        let m = Msix::new(layout(2));
        let fd = wake();
        m.attach(fd.clone());
        m.set_control(true, false);
        for len in 0..=16usize {
            for off in [
                0u64,
                1,
                2,
                3,
                4,
                6,
                12,
                16,
                24,
                28,
                31,
                32,
                0xffff_ffff_ffff_fffc,
            ] {
                let mut buf = vec![0xaau8; len];
                m.table_read(off, &mut buf);
                m.pba_read(off, &mut buf);
                m.table_write(off, &vec![0u8; len]);
            }
        }
        // Only the aligned dword and qword writes inside the table unmasked anything.
        assert!(!m.masked(0) && !m.masked(1));
        m.raise(0);
        assert_eq!(woken(&fd), 1);
        let big = Msix::new(MsixLayout {
            vectors: u16::MAX,
            ..layout(0)
        });
        assert_eq!(big.layout().vectors, MSIX_MAX_VECTORS);
        assert!(!big.raise(u16::MAX));
    }

    #[test]
    fn a_detached_msix_never_writes_the_old_eventfd() {
        let m = Msix::new(layout(2));
        let old = wake();
        m.attach(old.clone());
        m.set_control(true, false);
        unmask(&m, 0);
        m.detach();
        assert!(!m.raise(0));
        m.reset();
        assert!(!m.raise(0));
        assert_eq!(woken(&old), 0);
        let new = wake();
        m.attach(new.clone());
        m.set_control(true, false);
        unmask(&m, 0);
        assert_eq!(woken(&new), 1, "the new domain gets what was pending");
        assert_eq!(woken(&old), 0);
    }
}
