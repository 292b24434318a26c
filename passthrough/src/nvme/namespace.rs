//! Namespace 1: a file on the host, with an optional volatile write cache in front of it.
//!
//! Without the cache every write goes to the file with `pwrite`. With it (and while the driver
//! keeps it enabled) writes land in memory and reach the file only on Flush, on shutdown
//! notification, when the cache is switched off, or when it outgrows [`CACHE_LIMIT_BYTES`]
//! (written back then, as a real drive evicts). A reset drops whatever is still cached: the
//! worst a drive with a volatile cache may do, and what recovery has to cope with. Reads see
//! the cache. Write Zeroes and Deallocate go straight to the file (punching a hole), after
//! discarding cached blocks they supersede.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::volatile_memory::Error as VolatileError;
use vm_memory::{Bytes, VolatileSlice};

use crate::fileio;

/// Cached bytes beyond which the cache is written back to the file.
pub const CACHE_LIMIT_BYTES: usize = 64 << 20;
/// Largest run of cached blocks written back in one call.
const WRITE_BACK_CHUNK: usize = 1 << 20;

/// Errors opening a namespace's backing file.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// The logical block size is not supported.
    #[error("namespace {path}: logical block size {lba_size}; expected 512 or 4096")]
    LbaSize {
        /// Backing file.
        path: PathBuf,
        /// Requested size.
        lba_size: u32,
    },
    /// The size is zero or not a whole number of blocks.
    #[error("namespace {path}: size {size} bytes; expected a non-zero multiple of the {lba_size}-byte logical block")]
    Size {
        /// Backing file.
        path: PathBuf,
        /// Requested size.
        size: u64,
        /// Logical block size.
        lba_size: u32,
    },
    /// The file cannot be opened or created.
    #[error(
        "namespace backing file {path}: cannot open or create it for reading and writing: {source}"
    )]
    Open {
        /// Backing file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file cannot be extended to the namespace size.
    #[error("namespace backing file {path}: cannot extend it to {size} bytes: {source}")]
    SetLen {
        /// Backing file.
        path: PathBuf,
        /// Namespace size.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The namespace: geometry, backing file, cache.
pub struct Namespace {
    /// Shared with the controller's flusher thread, which syncs it.
    file: Arc<File>,
    lba_size: u32,
    blocks: u64,
    cache: BTreeMap<u64, Box<[u8]>>,
    cache_present: bool,
    cache_enabled: bool,
}

impl Namespace {
    /// Opens (or creates, sparse) `path` as a namespace of `size` bytes in `lba_size` blocks.
    /// A shorter file is extended; a longer one is left alone (only `size` bytes are used).
    pub fn open(
        path: &Path,
        size: u64,
        lba_size: u32,
        volatile_write_cache: bool,
    ) -> Result<Namespace, NamespaceError> {
        if lba_size != 512 && lba_size != 4096 {
            return Err(NamespaceError::LbaSize {
                path: path.to_path_buf(),
                lba_size,
            });
        }
        if size == 0 || !size.is_multiple_of(u64::from(lba_size)) {
            return Err(NamespaceError::Size {
                path: path.to_path_buf(),
                size,
                lba_size,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| NamespaceError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| NamespaceError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if len < size {
            file.set_len(size)
                .map_err(|source| NamespaceError::SetLen {
                    path: path.to_path_buf(),
                    size,
                    source,
                })?;
        }
        Ok(Namespace {
            file: Arc::new(file),
            lba_size,
            blocks: size / u64::from(lba_size),
            cache: BTreeMap::new(),
            cache_present: volatile_write_cache,
            cache_enabled: volatile_write_cache,
        })
    }

    /// The backing file, for a thread that syncs it ([`super::flusher`]).
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Logical block size in bytes.
    pub fn lba_size(&self) -> u32 {
        self.lba_size
    }

    /// Number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether `[slba, slba + nlb)` lies inside the namespace.
    pub fn in_range(&self, slba: u64, nlb: u64) -> bool {
        slba.checked_add(nlb).is_some_and(|end| end <= self.blocks)
    }

    /// Whether the device has a volatile write cache.
    pub fn cache_present(&self) -> bool {
        self.cache_present
    }

    /// Whether the volatile write cache is enabled (Set Features, Volatile Write Cache).
    pub fn cache_enabled(&self) -> bool {
        self.cache_present && self.cache_enabled
    }

    /// Blocks written but not yet in the file.
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Enables or disables the cache; disabling writes it back first.
    pub fn set_cache_enabled(&mut self, enabled: bool) -> io::Result<()> {
        if !enabled {
            self.flush()?;
        }
        self.cache_enabled = enabled;
        Ok(())
    }

    /// Enables the cache again if present (power-on default) and drops its contents; returns
    /// how many blocks were lost.
    pub fn reset(&mut self) -> u64 {
        let dropped = self.cache.len() as u64;
        self.cache.clear();
        self.cache_enabled = self.cache_present;
        dropped
    }

    fn offset(&self, lba: u64) -> u64 {
        lba * u64::from(self.lba_size)
    }

    /// Reads whole blocks starting at `slba` into `buf`; the caller checked the range.
    #[cfg(test)]
    pub fn read(&self, slba: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_into(slba, &[VolatileSlice::from(buf)])
    }

    /// Reads whole blocks starting at `slba` into `dst` (the slices in order: a command's
    /// data buffer in domain memory), straight from the file, then the cached blocks over
    /// them. The caller checked the range.
    pub fn read_into(&self, slba: u64, dst: &[VolatileSlice<'_>]) -> io::Result<()> {
        fileio::read_exact_at(&self.file, self.offset(slba), dst)?;
        if self.cache.is_empty() {
            return Ok(());
        }
        let lsz = self.lba_size as usize;
        let nlb = (dst.iter().map(|s| s.len()).sum::<usize>() / lsz) as u64;
        for (&lba, block) in self.cache.range(slba..slba + nlb) {
            at_offset(
                dst,
                ((lba - slba) as usize) * lsz,
                block.len(),
                |s, pos, r| s.write_slice(&block[pos..pos + r.len()], r.start),
            )?;
        }
        Ok(())
    }

    /// Writes whole blocks starting at `slba`; `fua` forces them to stable storage. The caller
    /// checked the range.
    #[cfg(test)]
    pub fn write(&mut self, slba: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let mut data = data.to_vec();
        self.write_from(slba, &[VolatileSlice::from(&mut data[..])], fua)
    }

    /// Writes whole blocks starting at `slba` from `src` (the slices in order): into the cache
    /// while it is enabled and `fua` is clear, else straight to the file. `fua` forces them to
    /// stable storage. The caller checked the range.
    pub fn write_from(
        &mut self,
        slba: u64,
        src: &[VolatileSlice<'_>],
        fua: bool,
    ) -> io::Result<()> {
        let lsz = self.lba_size as usize;
        let len: usize = src.iter().map(|s| s.len()).sum();
        if self.cache_enabled() && !fua {
            for i in 0..len / lsz {
                let mut block = vec![0u8; lsz].into_boxed_slice();
                at_offset(src, i * lsz, lsz, |s, pos, r| {
                    s.read_slice(&mut block[pos..pos + r.len()], r.start)
                })?;
                self.cache.insert(slba + i as u64, block);
            }
            if self.cache.len() * lsz > CACHE_LIMIT_BYTES {
                self.write_back()?;
            }
            return Ok(());
        }
        self.discard_cached(slba, (len / lsz) as u64);
        fileio::write_all_at(&self.file, self.offset(slba), src)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Makes `[slba, slba + nlb)` read as zeroes (Write Zeroes, Deallocate): a hole is punched
    /// in the file, or zeroes are written where the file system cannot punch.
    pub fn zero(&mut self, slba: u64, nlb: u64) -> io::Result<()> {
        self.discard_cached(slba, nlb);
        let len = nlb * u64::from(self.lba_size);
        fileio::zero_range(&self.file, self.offset(slba), len, true)
    }

    fn discard_cached(&mut self, slba: u64, nlb: u64) {
        if self.cache.is_empty() {
            return;
        }
        let stale: Vec<u64> = self
            .cache
            .range(slba..slba.saturating_add(nlb))
            .map(|(&lba, _)| lba)
            .collect();
        for lba in stale {
            self.cache.remove(&lba);
        }
    }

    /// Writes cached blocks to the file (coalescing runs of adjacent blocks), without sync:
    /// the first half of a Flush, whose sync may then run on another thread.
    pub fn write_back(&mut self) -> io::Result<()> {
        let lsz = u64::from(self.lba_size);
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        let mut next = None;
        for (&lba, block) in &self.cache {
            if next != Some(lba) && !run.is_empty() {
                self.file.write_all_at(&run, run_start * lsz)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = lba;
            }
            run.extend_from_slice(block);
            next = Some(lba + 1);
            if run.len() >= WRITE_BACK_CHUNK {
                self.file.write_all_at(&run, run_start * lsz)?;
                run.clear();
                next = None;
            }
        }
        if !run.is_empty() {
            self.file.write_all_at(&run, run_start * lsz)?;
        }
        self.cache.clear();
        Ok(())
    }

    /// Flush: every completed write reaches stable storage.
    pub fn flush(&mut self) -> io::Result<()> {
        self.write_back()?;
        self.file.sync_data()
    }
}

/// Calls `f(slice, pos, range)` for each piece of the bytes `[at, at + len)` of `slices` taken
/// as one buffer: `range` is the piece's place in `slice`, `pos` its offset from `at`.
fn at_offset(
    slices: &[VolatileSlice<'_>],
    at: usize,
    len: usize,
    mut f: impl FnMut(&VolatileSlice<'_>, usize, std::ops::Range<usize>) -> Result<(), VolatileError>,
) -> io::Result<()> {
    let (mut start, mut pos) = (0usize, 0usize);
    for s in slices {
        let end = start + s.len();
        let (from, to) = (at + pos, at + len);
        if from < end && from >= start {
            let r = (from - start)..(to.min(end) - start);
            let n = r.len();
            f(s, pos, r).map_err(io::Error::other)?;
            pos += n;
            if pos == len {
                return Ok(());
            }
        }
        start = end;
    }
    if pos == len {
        Ok(())
    } else {
        Err(io::Error::from(io::ErrorKind::UnexpectedEof))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A unique path under the temp directory, removed on drop.
    pub(crate) struct TempPath(pub PathBuf);

    impl TempPath {
        pub(crate) fn new(tag: &str) -> TempPath {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            TempPath(std::env::temp_dir().join(format!(
                "ddvm-passthrough-{tag}-{}-{n}.img",
                std::process::id()
            )))
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn creates_sparse_file_and_checks_geometry() {
        let p = TempPath::new("ns");
        let ns = Namespace::open(&p.0, 1 << 20, 512, false).unwrap();
        assert_eq!(ns.blocks(), 2048);
        assert_eq!(std::fs::metadata(&p.0).unwrap().len(), 1 << 20);
        assert!(ns.in_range(2047, 1) && !ns.in_range(2047, 2) && !ns.in_range(u64::MAX, 2));
        let e = Namespace::open(&p.0, 1000, 512, false).err().unwrap();
        assert!(e.to_string().contains("multiple of the 512-byte"), "{e}");
        let e = Namespace::open(&p.0, 4096, 1024, false).err().unwrap();
        assert!(e.to_string().contains("expected 512 or 4096"), "{e}");
        let e = Namespace::open(Path::new("/nonexistent-dir/x.img"), 4096, 512, false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent-dir/x.img"), "{e}");
    }

    #[test]
    fn cache_is_read_through_flushed_and_dropped() {
        let p = TempPath::new("ns");
        let mut ns = Namespace::open(&p.0, 1 << 20, 512, true).unwrap();
        ns.write(3, &[7u8; 1024], false).unwrap();
        let mut b = [0u8; 1536];
        ns.read(2, &mut b).unwrap();
        assert_eq!(&b[..512], &[0u8; 512][..]);
        assert_eq!(&b[512..], &[7u8; 1024][..]);
        ns.flush().unwrap();
        ns.write(10, &[9u8; 512], false).unwrap();
        assert_eq!(ns.reset(), 1);
        let mut c = [0u8; 512];
        ns.read(10, &mut c).unwrap();
        assert_eq!(c, [0u8; 512]);
        ns.read(4, &mut c).unwrap();
        assert_eq!(c, [7u8; 512]);
        ns.zero(3, 2).unwrap();
        ns.read(4, &mut c).unwrap();
        assert_eq!(c, [0u8; 512]);
    }
}
