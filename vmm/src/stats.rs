//! KVM's binary statistics of a vCPU (`KVM_GET_STATS_FD`), read by name.
//!
//! `insn_emulation` proves a guest runs natively on PVM (it stays flat while the guest runs
//! millions of instructions); `exits` counts every VM exit, including those KVM handles without
//! coming back to us.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;

mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}
use ioctls::KVM_GET_STATS_FD;

const HEADER_SIZE: usize = 24;
const DESC_FIXED: usize = 16;

/// A vCPU's statistics file.
pub struct VcpuStats {
    file: File,
    data_offset: u64,
    index: HashMap<String, u64>,
}

impl VcpuStats {
    /// Opens the statistics of `vcpu`; `None` where KVM has no binary stats.
    pub fn open(vcpu: &VcpuFd) -> Option<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; the vCPU fd is
        // valid for the duration of the call.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        Self::parse(file)
    }

    fn parse(file: File) -> Option<Self> {
        let mut h = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut h, 0).ok()?;
        let word =
            |i: usize| u32::from_le_bytes([h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3]]);
        let (name_size, num_desc, desc_offset, data_offset) = (
            word(1) as usize,
            word(2) as usize,
            word(4) as u64,
            word(5) as u64,
        );
        if name_size == 0 || num_desc > 4096 || name_size > 4096 {
            return None;
        }
        let stride = DESC_FIXED + name_size;
        let mut descs = vec![0u8; stride * num_desc];
        file.read_exact_at(&mut descs, desc_offset).ok()?;
        let mut index = HashMap::new();
        for d in descs.chunks_exact(stride) {
            let offset = u32::from_le_bytes([d[8], d[9], d[10], d[11]]) as u64;
            let name = &d[DESC_FIXED..];
            let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            index.insert(String::from_utf8_lossy(&name[..len]).into_owned(), offset);
        }
        Some(VcpuStats {
            file,
            data_offset,
            index,
        })
    }

    /// Current value of the named counter.
    pub fn get(&self, name: &str) -> Option<u64> {
        let offset = *self.index.get(name)?;
        let mut v = [0u8; 8];
        self.file
            .read_exact_at(&mut v, self.data_offset + offset)
            .ok()?;
        Some(u64::from_le_bytes(v))
    }

    /// Every counter, by name.
    pub fn all(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .index
            .keys()
            .filter_map(|k| Some((k.clone(), self.get(k)?)))
            .collect();
        v.sort();
        v
    }

    /// Raw fd, for tests that check teardown closes it.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}
