//! Positioned file I/O straight into and out of guest memory.
//!
//! A device's DMA moves data between its medium and memory without a CPU copy, and so does this:
//! `preadv`/`pwritev` between a file and a list of vm-memory [`VolatileSlice`]s, the way a
//! production virtio-blk backend reads into guest buffers. Going through a bounce buffer costs
//! an allocation, a zeroing and a copy per command, which on a 128 KiB write is a sizeable part
//! of what the emulated controller spends (and real hardware spends nothing).
//!
//! The kernel reads and writes the memory, never a Rust reference: the slices stay valid for the
//! call because they borrow the guest memory mapping.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Most slices passed to one system call (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Reads exactly the slices' total length from `file` at `offset` into the slices, in order.
/// Reading past the end of the file is an [`io::ErrorKind::UnexpectedEof`] error.
pub fn read_exact_at<B: BitmapSlice>(
    file: &File,
    offset: u64,
    slices: &[VolatileSlice<'_, B>],
) -> io::Result<()> {
    transfer(file, offset, slices, Direction::ToMemory)?;
    for s in slices {
        s.bitmap().mark_dirty(0, s.len());
    }
    Ok(())
}

/// Writes the slices, in order, to `file` at `offset`.
pub fn write_all_at<B: BitmapSlice>(
    file: &File,
    offset: u64,
    slices: &[VolatileSlice<'_, B>],
) -> io::Result<()> {
    transfer(file, offset, slices, Direction::FromMemory)
}

/// Largest buffer of zeroes written when the file system can neither punch nor zero a range.
const ZERO_CHUNK: usize = 1 << 20;

/// Makes `len` bytes of `file` at `offset` read as zeroes, keeping the file's size.
///
/// `deallocate` says the blocks may be freed (a discard, an unmapping write-zeroes): a hole is
/// punched. Otherwise the range is zeroed in place (`FALLOC_FL_ZERO_RANGE`), and a hole is the
/// second choice. Where the file system has neither (tmpfs has no zero-range; some have no
/// holes), zeroes are written.
pub fn zero_range(file: &File, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
    let modes: &[libc::c_int] = if deallocate {
        &[libc::FALLOC_FL_PUNCH_HOLE]
    } else {
        &[libc::FALLOC_FL_ZERO_RANGE, libc::FALLOC_FL_PUNCH_HOLE]
    };
    zero_range_with(file, offset, len, modes)
}

/// [`zero_range`] with the `fallocate` modes to try, in order, before writing zeroes.
fn zero_range_with(file: &File, offset: u64, len: u64, modes: &[libc::c_int]) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    for &mode in modes {
        // SAFETY: fallocate takes integers only; the fd is owned by `file` and stays open for
        // the call.
        let rc =
            unsafe { libc::fallocate(file.as_raw_fd(), mode | libc::FALLOC_FL_KEEP_SIZE, off, n) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
        ) {
            return Err(e);
        }
    }
    let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(file, &zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToMemory,
    FromMemory,
}

fn transfer<B: BitmapSlice>(
    file: &File,
    mut offset: u64,
    slices: &[VolatileSlice<'_, B>],
    dir: Direction,
) -> io::Result<()> {
    // The slices' pointers, each kept valid by its guard until the transfer is done.
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    // Where the transfer stands: the slice, and the bytes of it already done.
    let (mut first, mut skip) = (0usize, 0usize);
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(slices.len().min(IOV_MAX));
    while first < slices.len() {
        iov.clear();
        for (i, (s, g)) in slices
            .iter()
            .zip(&guards)
            .skip(first)
            .take(IOV_MAX)
            .enumerate()
        {
            let done = if i == 0 { skip } else { 0 };
            iov.push(libc::iovec {
                // A pointer into the guest memory mapping; only the kernel dereferences it.
                iov_base: g.as_ptr().wrapping_add(done).cast(),
                iov_len: s.len() - done,
            });
        }
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: every iovec describes memory inside a VolatileSlice borrowed for this call,
        // its pointer held valid by its guard in `guards`; the kernel reads or writes only
        // those bytes.
        // No Rust reference to that memory exists: the guest may change it concurrently, as it
        // may during a device's DMA. `iov.len()` is at most IOV_MAX.
        let n = unsafe {
            match dir {
                Direction::ToMemory => {
                    libc::preadv(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off)
                }
                Direction::FromMemory => {
                    libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off)
                }
            }
        };
        let mut n = match n {
            n if n > 0 => n as usize,
            0 if dir == Direction::ToMemory => {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof))
            }
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        offset += n as u64;
        // Advance past what was transferred (a short transfer resumes mid-slice).
        while n > 0 && first < slices.len() {
            let left = slices[first].len() - skip;
            if n >= left {
                n -= left;
                first += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
        while first < slices.len() && slices[first].len() == skip {
            first += 1;
            skip = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;
    use crate::nvme::namespace::tests::TempPath;

    fn setup(tag: &str) -> (TempPath, File, GuestMemoryMmap<()>) {
        let path = TempPath::new(tag);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path.0)
            .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (path, file, mem)
    }

    #[test]
    fn scattered_slices_read_and_write_in_order() {
        let (_p, file, mem) = setup("fileio-rw");
        let data: Vec<u8> = (0..12288u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        file.write_all_at(&data, 4096).unwrap();
        // Three pieces, out of address order, of 4096 + 100 + 8092 bytes.
        let at = [(0x8000u64, 4096usize), (0x100, 100), (0x20000, 8092)];
        let slices: Vec<_> = at
            .iter()
            .map(|&(a, n)| mem.get_slice(GuestAddress(a), n).unwrap())
            .collect();
        read_exact_at(&file, 4096, &slices).unwrap();
        let mut pos = 0;
        for &(a, n) in &at {
            let mut got = vec![0u8; n];
            mem.read_slice(&mut got, GuestAddress(a)).unwrap();
            assert_eq!(got, data[pos..pos + n], "piece at {a:#x}");
            pos += n;
        }
        // Back out to another place in the file, and compare.
        write_all_at(&file, 65536, &slices).unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 65536).unwrap();
        assert_eq!(back, data);
    }

    /// A file of `blocks` 4 KiB blocks of 0xa5, as `file`.
    fn filled(file: &File, blocks: u64) {
        file.write_all_at(&vec![0xa5u8; (blocks * 4096) as usize], 0)
            .unwrap();
    }

    /// The file's bytes, as (block, every byte of it equal to) pairs.
    fn blocks(file: &File, blocks: u64) -> Vec<Option<u8>> {
        let mut data = vec![0u8; (blocks * 4096) as usize];
        file.read_exact_at(&mut data, 0).unwrap();
        data.chunks(4096)
            .map(|b| b.iter().all(|&x| x == b[0]).then_some(b[0]))
            .collect()
    }

    #[test]
    fn zeroed_ranges_read_as_zeroes_and_keep_the_size() {
        let (_p, file, _) = setup("fileio-zero");
        filled(&file, 8);
        zero_range(&file, 4096, 8192, false).unwrap();
        zero_range(&file, 5 * 4096, 4096, true).unwrap();
        // Past the end: the size stays (KEEP_SIZE).
        zero_range(&file, 7 * 4096, 3 * 4096, true).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8 * 4096);
        let a = Some(0xa5);
        let z = Some(0);
        assert_eq!(blocks(&file, 8), [a, z, z, a, a, z, a, z]);
    }

    #[test]
    fn zeroing_falls_back_where_the_file_system_lacks_a_mode() {
        // memfd is shmem, like tmpfs: it punches holes but has no FALLOC_FL_ZERO_RANGE.
        // SAFETY: a NUL-terminated name and no flags; the returned fd is ours alone.
        let fd = unsafe { libc::memfd_create(c"fileio-zero".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just opened and nothing else owns it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        filled(&file, 4);
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: integers only, on the fd `file` owns.
        let rc = unsafe { libc::fallocate(fd, mode, 0, 4096) };
        assert_eq!(
            rc, -1,
            "shmem zeroed a range: the fallback below is not exercised"
        );
        zero_range(&file, 4096, 4096, false).unwrap();
        let (a, z) = (Some(0xa5), Some(0));
        assert_eq!(blocks(&file, 4), [a, z, a, a]);
        // Neither mode available: zeroes are written, more than one chunk's worth.
        let total = 2 * ZERO_CHUNK as u64 + 3 * 4096;
        file.write_all_at(&vec![0xa5u8; total as usize], 0).unwrap();
        zero_range_with(&file, 4096, total - 2 * 4096, &[]).unwrap();
        let mut data = vec![0u8; total as usize];
        file.read_exact_at(&mut data, 0).unwrap();
        let end = (total - 4096) as usize;
        assert!(data[..4096].iter().all(|&b| b == 0xa5));
        assert!(data[4096..end].iter().all(|&b| b == 0));
        assert!(data[end..].iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn reading_past_the_end_is_an_error() {
        let (_p, file, mem) = setup("fileio-eof");
        file.write_all_at(&[1u8; 1000], 0).unwrap();
        let s = [mem.get_slice(GuestAddress(0), 4096).unwrap()];
        let e = read_exact_at(&file, 0, &s).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn more_slices_than_one_call_takes() {
        let (_p, file, mem) = setup("fileio-many");
        let n = IOV_MAX + 300;
        let data: Vec<u8> = (0..n * 8).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&data, 0).unwrap();
        // 8-byte slices, every other 16 bytes.
        let slices: Vec<_> = (0..n)
            .map(|i| mem.get_slice(GuestAddress(16 * i as u64), 8).unwrap())
            .collect();
        read_exact_at(&file, 0, &slices).unwrap();
        for i in [0, 1, IOV_MAX - 1, IOV_MAX, n - 1] {
            let mut got = [0u8; 8];
            mem.read_slice(&mut got, GuestAddress(16 * i as u64))
                .unwrap();
            assert_eq!(got, data[8 * i..8 * i + 8], "slice {i}");
        }
    }
}
