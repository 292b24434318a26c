//! Loading guest images: x86-64 ELF executables, checked before anything is created.
//!
//! linux-loader does the loading; it checks the ELF magic and byte order only, applies no
//! relocations and does not zero `.bss`. So we check first what we rely on — 64-bit, x86-64,
//! a static executable, segments inside the RAM the guest may load into — and zero `.bss`
//! ourselves after the load.

use std::borrow::Cow;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// Largest image we accept.
pub const IMAGE_MAX: usize = 64 << 20;

const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Note type of the PVH entry (XEN_ELFNOTE_PHYS32_ENTRY, name "Xen").
const NOTE_PVH_ENTRY: u32 = 18;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

/// An image to boot: its bytes and where they came from (for error messages).
#[derive(Clone, Debug)]
pub struct Image {
    name: PathBuf,
    bytes: Cow<'static, [u8]>,
}

/// Errors in a guest image. Each names the image and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("image {path}: {source} (expected an x86-64 ELF executable)")]
    Read {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO, a device, a directory...).
    #[error("image {path}: {what}, expected a regular file (an x86-64 ELF executable)")]
    NotRegular {
        /// Image path.
        path: PathBuf,
        /// What it is.
        what: String,
    },
    /// Larger than [`IMAGE_MAX`].
    #[error("image {path}: {size} bytes or more, expected at most {IMAGE_MAX}")]
    TooLarge {
        /// Image path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Not an ELF file at all.
    #[error("image {path}: not an ELF file (bad magic or truncated header); expected an x86-64 ELF executable")]
    NotElf {
        /// Image path.
        path: PathBuf,
    },
    /// An ELF file, but not the kind we boot.
    #[error("image {path}: {found}; expected {expected}")]
    Unsupported {
        /// Image path.
        path: PathBuf,
        /// What the header says.
        found: String,
        /// What ddvm boots.
        expected: &'static str,
    },
    /// A program header that does not fit.
    #[error("image {path}: program header {index}: {problem}; expected loadable segments inside [{min:#x}, {max:#x})")]
    Segment {
        /// Image path.
        path: PathBuf,
        /// Index of the program header.
        index: usize,
        /// What is wrong with it.
        problem: String,
        /// Lowest load address allowed.
        min: u64,
        /// End of the loadable window.
        max: u64,
    },
    /// Entry point not inside an executable loaded segment.
    #[error("image {path}: entry point {entry:#x} is outside every loaded segment; expected an entry inside the image")]
    Entry {
        /// Image path.
        path: PathBuf,
        /// The entry.
        entry: u64,
    },
    /// linux-loader refused the image.
    #[error("image {path}: {source}")]
    Load {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Zeroing `.bss` failed.
    #[error("image {path}: cannot zero .bss at {addr:#x}: {source}")]
    Bss {
        /// Image path.
        path: PathBuf,
        /// Where.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A load segment: guest-physical start, bytes in the file, bytes in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// What the checks learned about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// 64-bit entry point.
    pub entry: u64,
    /// End of the highest segment in memory.
    pub end: u64,
    segments: Vec<Segment>,
}

/// Result of a load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// 64-bit entry point.
    pub entry: u64,
    /// End of the image in guest memory.
    pub end: u64,
    /// Whether the image also carries a PVH entry (so QEMU can boot it).
    pub has_pvh_entry: bool,
}

impl Image {
    /// Reads an image from a file: a regular file (a symbolic link is followed, and what it
    /// leads to must be one) of at most [`IMAGE_MAX`] bytes. A FIFO, a device, a socket or a
    /// directory is refused without reading from it (nor waiting for a FIFO's writer), and a
    /// file that grows past the limit while it is read is refused too.
    pub fn from_file(path: &Path) -> Result<Self, ImageError> {
        use std::io::Read;
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let read_err = |source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        };
        // O_NONBLOCK: opening a FIFO does not wait for a writer; the type is checked on what
        // was opened, so nothing can swap the file between the check and the read.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let ft = meta.file_type();
        if !ft.is_file() {
            let kind = if ft.is_dir() {
                "a directory"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_char_device() {
                "a character device"
            } else if ft.is_block_device() {
                "a block device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            let via = std::fs::symlink_metadata(path)
                .ok()
                .filter(|m| m.file_type().is_symlink())
                .and_then(|_| std::fs::canonicalize(path).ok())
                .map(|t| format!(" (a symbolic link to {})", t.display()))
                .unwrap_or_default();
            return Err(ImageError::NotRegular {
                path: path.to_path_buf(),
                what: format!("{kind}{via}"),
            });
        }
        if meta.len() > IMAGE_MAX as u64 {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                size: meta.len(),
            });
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(IMAGE_MAX as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() > IMAGE_MAX {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                size: bytes.len() as u64,
            });
        }
        Ok(Image {
            name: path.to_path_buf(),
            bytes: Cow::Owned(bytes),
        })
    }

    /// An image built into the binary.
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Self {
        Image {
            name: PathBuf::from(name),
            bytes: Cow::Borrowed(bytes),
        }
    }

    /// An image already in memory; `name` says where it came from in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Self {
        Image {
            name: PathBuf::from(name),
            bytes: Cow::Owned(bytes),
        }
    }

    /// Where the image came from.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// Checks the image may be loaded into `[min, max)` of guest-physical memory.
    pub fn check(&self, min: u64, max: u64) -> Result<ImageInfo, ImageError> {
        let path = || self.name.clone();
        let b = &self.bytes[..];
        if b.len() < EHDR_SIZE || &b[..4] != b"\x7fELF" {
            return Err(ImageError::NotElf { path: path() });
        }
        let unsupported = |found: String, expected: &'static str| ImageError::Unsupported {
            path: path(),
            found,
            expected,
        };
        if b[4] != 2 {
            return Err(unsupported(
                format!("ELF class {} (32-bit)", b[4]),
                "a 64-bit ELF (ELFCLASS64)",
            ));
        }
        if b[5] != 1 {
            return Err(unsupported(
                "big-endian ELF".into(),
                "a little-endian ELF (ELFDATA2LSB)",
            ));
        }
        let e_type = le16(b, 16);
        let machine = le16(b, 18);
        if machine != EM_X86_64 {
            return Err(unsupported(
                format!("ELF for {} (e_machine {machine})", machine_name(machine)),
                "an x86-64 ELF (e_machine 62)",
            ));
        }
        if e_type != ET_EXEC {
            let what = match e_type {
                ET_DYN => "a position-independent ELF (ET_DYN) that needs relocation".to_string(),
                1 => "a relocatable object (ET_REL)".to_string(),
                t => format!("ELF type {t}"),
            };
            return Err(unsupported(
                what,
                "a static executable (ET_EXEC); ddvm applies no relocations",
            ));
        }
        let entry = le64(b, 24);
        let phoff = le64(b, 32);
        let phentsize = le16(b, 54) as usize;
        let phnum = le16(b, 56) as usize;
        if phentsize != PHDR_SIZE {
            return Err(unsupported(
                format!("program header size {phentsize}"),
                "56-byte ELF64 program headers",
            ));
        }
        if phoff < EHDR_SIZE as u64 {
            return Err(unsupported(
                format!("program header table at {phoff:#x}, inside the ELF header"),
                "program headers after the 64-byte ELF header",
            ));
        }
        let table_end = (phnum * PHDR_SIZE) as u64;
        if phoff
            .checked_add(table_end)
            .is_none_or(|end| end > b.len() as u64)
        {
            return Err(unsupported(
                format!("program header table at {phoff:#x} past the end of the file"),
                "a complete program header table",
            ));
        }
        let mut segments = Vec::new();
        for index in 0..phnum {
            let ph = phoff as usize + index * PHDR_SIZE;
            if le32(b, ph) == PT_NOTE {
                // The loader walks the notes for a PVH entry: they must be where it looks.
                if let Some(problem) = note_problem(b, le64(b, ph + 8), le64(b, ph + 32)) {
                    return Err(unsupported(
                        format!("program header {index}: PT_NOTE segment with {problem}"),
                        "ELF notes inside the file",
                    ));
                }
                continue;
            }
            if le32(b, ph) != PT_LOAD {
                continue;
            }
            let offset = le64(b, ph + 8);
            let paddr = le64(b, ph + 24);
            let filesz = le64(b, ph + 32);
            let memsz = le64(b, ph + 40);
            let bad = |problem: String| ImageError::Segment {
                path: path(),
                index,
                problem,
                min,
                max,
            };
            if filesz > memsz {
                return Err(bad(format!(
                    "file size {filesz:#x} larger than memory size {memsz:#x}"
                )));
            }
            if offset
                .checked_add(filesz)
                .is_none_or(|end| end > b.len() as u64)
            {
                return Err(bad(format!(
                    "file range {offset:#x}+{filesz:#x} past the end of the file"
                )));
            }
            let end = paddr.checked_add(memsz);
            if paddr < min || end.is_none_or(|end| end > max) {
                return Err(bad(format!(
                    "segment [{paddr:#x}, {:#x}) outside guest RAM",
                    end.unwrap_or(u64::MAX)
                )));
            }
            if memsz > 0 {
                segments.push(Segment {
                    paddr,
                    filesz,
                    memsz,
                });
            }
        }
        if segments.is_empty() {
            return Err(unsupported(
                "no loadable segment".into(),
                "at least one PT_LOAD segment",
            ));
        }
        if !segments
            .iter()
            .any(|s| entry >= s.paddr && entry < s.paddr + s.filesz)
        {
            return Err(ImageError::Entry {
                path: path(),
                entry,
            });
        }
        let end = segments
            .iter()
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(min);
        Ok(ImageInfo {
            entry,
            end,
            segments,
        })
    }

    /// Loads a checked image into `mem` and zeroes its `.bss`.
    pub fn load(&self, info: &ImageInfo, mem: &GuestMem) -> Result<Loaded, ImageError> {
        let mut cursor = Cursor::new(&self.bytes[..]);
        let result =
            Elf::load(mem, None, &mut cursor, None).map_err(|source| ImageError::Load {
                path: self.name.clone(),
                source,
            })?;
        const ZEROS: [u8; 4096] = [0; 4096];
        for s in &info.segments {
            let mut addr = s.paddr + s.filesz;
            let end = s.paddr + s.memsz;
            while addr < end {
                let n = ((end - addr) as usize).min(ZEROS.len());
                mem.write_slice(&ZEROS[..n], GuestAddress(addr))
                    .map_err(|source| ImageError::Bss {
                        path: self.name.clone(),
                        addr,
                        source,
                    })?;
                addr += n as u64;
            }
        }
        Ok(Loaded {
            entry: info.entry,
            end: info.end,
            has_pvh_entry: matches!(
                result.pvh_boot_cap,
                linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(_)
            ),
        })
    }
}

/// Walks the notes of a PT_NOTE segment at file `offset` of `filesz` bytes as the loader
/// (linux-loader, looking for the PVH entry note) does, and says what would make it fail: a
/// note header, a name or the PVH entry past the end of the file, sizes that overflow.
fn note_problem(b: &[u8], offset: u64, filesz: u64) -> Option<&'static str> {
    let bytes = |at: u64, n: u64| {
        let end = at.checked_add(n)?;
        b.get(usize::try_from(at).ok()?..usize::try_from(end).ok()?)
    };
    let align4 = |n: u32| (u64::from(n) + 3) & !3;
    let mut read = 0u64;
    while read < filesz {
        let Some(at) = offset.checked_add(read) else {
            return Some("notes beyond the largest offset");
        };
        let Some(header) = bytes(at, 12) else {
            return Some("a note header past the end of the file");
        };
        let (namesz, descsz, kind) = (le32(header, 0), le32(header, 4), le32(header, 8));
        if kind == NOTE_PVH_ENTRY && namesz == 4 {
            let Some(name) = bytes(at + 12, 4) else {
                return Some("a note name past the end of the file");
            };
            if name == b"Xen\0" {
                if descsz < 4 {
                    return Some("a PVH entry note shorter than 4 bytes");
                }
                if bytes(at + 16, 4).is_none() {
                    return Some("a PVH entry past the end of the file");
                }
                return None;
            }
        }
        let (name, desc) = (align4(namesz), align4(descsz));
        if name > u64::from(u32::MAX) || desc > u64::from(u32::MAX) {
            return Some("note sizes that overflow");
        }
        read += 12 + name + desc;
    }
    None
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

fn machine_name(m: u16) -> &'static str {
    match m {
        3 => "i386",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC64",
        22 => "s390",
        40 => "ARM",
        62 => "x86-64",
        183 => "AArch64",
        243 => "RISC-V",
        _ => "another architecture",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 executable with one PT_LOAD segment (code at `paddr`, `bss` extra bytes).
    pub(crate) fn tiny_elf(
        machine: u16,
        e_type: u16,
        paddr: u64,
        code: &[u8],
        bss: u64,
    ) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&e_type.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&paddr.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + bss).to_le_bytes());
        b.extend_from_slice(code);
        b
    }

    fn image(bytes: Vec<u8>) -> Image {
        Image {
            name: PathBuf::from("test.elf"),
            bytes: Cow::Owned(bytes),
        }
    }

    /// `tiny_elf` with a second program header: a PT_NOTE segment of `filesz` bytes at file
    /// offset `offset`, and `notes` appended to the file.
    fn with_note(offset: u64, filesz: u64, notes: &[u8]) -> Vec<u8> {
        let mut b = tiny_elf(EM_X86_64, ET_EXEC, 0x10_0000, &[0xf4; 16], 0);
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        let ph = 64 + PHDR_SIZE;
        b[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
        b.extend_from_slice(notes);
        b
    }

    /// Found by the `elf` fuzz target: an image whose notes run past the end of the file
    /// passed the checks (so `ctl update` took it) and then failed every load, so no domain
    /// could boot from it. The checks now walk the notes as the loader does.
    #[test]
    fn notes_the_loader_cannot_read_are_refused_by_the_checks() {
        let mem = crate::memory::create(4 << 20, 1 << 30).unwrap();
        let pvh = |namesz: u32, descsz: u32| {
            let mut n = Vec::new();
            for v in [namesz, descsz, NOTE_PVH_ENTRY] {
                n.extend_from_slice(&v.to_le_bytes());
            }
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&0x10_0000u32.to_le_bytes());
            n
        };
        let end = 0x1000 + 16;
        // A PVH note inside the file: accepted, and the loader finds the entry.
        let good = image(with_note(end, 20, &pvh(4, 4)));
        let info = good.check(0x10_0000, 4 << 20).unwrap();
        assert!(good.load(&info, &mem).unwrap().has_pvh_entry);
        // The note header, the PVH entry, or the segment's notes past the end of the file.
        for bad in [
            with_note(end + 12, 20, &pvh(4, 4)),
            with_note(end, 20, &pvh(4, 4)[..18]),
            with_note(end, 40, &[0; 20]),
            with_note(end, 20, &pvh(4, 2)),
        ] {
            let bad = image(bad);
            let e = bad.check(0x10_0000, 4 << 20).unwrap_err();
            assert!(e.to_string().contains("PT_NOTE"), "{e}");
        }
        // Program headers that overlap the ELF header: the loader refuses them, so do the
        // checks.
        let mut b = tiny_elf(EM_X86_64, ET_EXEC, 0x10_0000, &[0xf4; 16], 0);
        b[32..40].copy_from_slice(&8u64.to_le_bytes());
        let e = image(b).check(0x10_0000, 4 << 20).unwrap_err();
        assert!(e.to_string().contains("inside the ELF header"), "{e}");
    }

    #[test]
    fn accepts_a_static_x86_64_executable_and_zeroes_bss() {
        let img = image(tiny_elf(EM_X86_64, ET_EXEC, 0x10_0000, &[0xf4; 16], 64));
        let info = img.check(0x10_0000, 0x20_0000).unwrap();
        assert_eq!(info.entry, 0x10_0000);
        assert_eq!(info.end, 0x10_0000 + 16 + 64);
        let mem = crate::memory::create(2 << 20, 1 << 30).unwrap();
        mem.write_slice(&[0xaa; 64], GuestAddress(0x10_0010))
            .unwrap();
        let loaded = img.load(&info, &mem).unwrap();
        assert_eq!(loaded.entry, 0x10_0000);
        assert!(!loaded.has_pvh_entry);
        let mut buf = [0u8; 80];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&buf[..16], &[0xf4; 16]);
        assert_eq!(&buf[16..], &[0u8; 64], ".bss must be zeroed");
    }

    #[test]
    fn rejects_garbage_with_a_message_naming_the_file() {
        let err = image(b"hello world, this is not an ELF at all........................".to_vec())
            .check(0, u64::MAX)
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::NotElf { .. }));
        assert!(msg.contains("test.elf") && msg.contains("expected an x86-64 ELF"));
        assert!(matches!(
            image(vec![0x7f, b'E']).check(0, u64::MAX),
            Err(ImageError::NotElf { .. })
        ));
    }

    #[test]
    fn rejects_other_architectures() {
        let err = image(tiny_elf(183, ET_EXEC, 0x10_0000, &[0; 4], 0))
            .check(0x10_0000, 0x20_0000)
            .unwrap_err();
        assert!(err.to_string().contains("AArch64"), "{err}");
        assert!(err.to_string().contains("expected an x86-64 ELF"), "{err}");
    }

    #[test]
    fn rejects_position_independent_images() {
        let err = image(tiny_elf(EM_X86_64, ET_DYN, 0x10_0000, &[0; 4], 0))
            .check(0x10_0000, 0x20_0000)
            .unwrap_err();
        assert!(err.to_string().contains("ET_EXEC"), "{err}");
    }

    #[test]
    fn rejects_segments_outside_guest_ram() {
        let img = image(tiny_elf(EM_X86_64, ET_EXEC, 0x1000, &[0; 4], 0));
        assert!(matches!(
            img.check(0x10_0000, 0x20_0000),
            Err(ImageError::Segment { index: 0, .. })
        ));
        let img = image(tiny_elf(EM_X86_64, ET_EXEC, 0x1f_fff0, &[0; 4], 0x100));
        assert!(matches!(
            img.check(0x10_0000, 0x20_0000),
            Err(ImageError::Segment { .. })
        ));
        let img = image(tiny_elf(EM_X86_64, ET_EXEC, u64::MAX - 2, &[0; 4], 0));
        assert!(matches!(
            img.check(0x10_0000, 0x20_0000),
            Err(ImageError::Segment { .. })
        ));
    }

    #[test]
    fn rejects_truncated_files_and_bad_entries() {
        let mut b = tiny_elf(EM_X86_64, ET_EXEC, 0x10_0000, &[0; 4], 0);
        b.truncate(0x1002);
        assert!(matches!(
            image(b).check(0x10_0000, 0x20_0000),
            Err(ImageError::Segment { .. })
        ));
        let mut b = tiny_elf(EM_X86_64, ET_EXEC, 0x10_0000, &[0; 4], 0);
        b[24..32].copy_from_slice(&0x15_0000u64.to_le_bytes());
        assert!(matches!(
            image(b).check(0x10_0000, 0x20_0000),
            Err(ImageError::Entry { .. })
        ));
        let mut b = tiny_elf(EM_X86_64, ET_EXEC, 0x10_0000, &[0; 4], 0);
        b[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(matches!(
            image(b).check(0x10_0000, 0x20_0000),
            Err(ImageError::Unsupported { .. })
        ));
    }

    #[test]
    fn missing_file_error_names_the_file() {
        let err = Image::from_file(Path::new("/nonexistent/dd.elf")).unwrap_err();
        assert!(
            err.to_string().starts_with("image /nonexistent/dd.elf: "),
            "{err}"
        );
    }
}
