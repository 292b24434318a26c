//! The KVM device: opening it, and finding out which kind of KVM it is.
//!
//! Our development machines expose PVM, a paravirtual KVM whose guests run at hardware CPL 3
//! with shadow paging; users mostly run on VMX or SVM. The unikernels run unchanged on all of
//! them; on PVM the VMM also registers a VIF page per vCPU so the guest runs natively instead of
//! in PVM's instruction emulator (see `docs/ARCHITECTURE.md`, "Platforms").

use std::fmt;
use std::path::{Path, PathBuf};

use ddvm_abi::boot::Platform;
use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

/// Default KVM device node.
pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";

/// PVM's "virtual interrupt flag" page MSR (this host's PVM, not upstream virt-pvm).
pub const MSR_PVM_VIF: u32 = 0x4b56_4d10;
/// Low bits a host-initiated write of the VIF MSR must carry ("in_user given explicitly").
const PVM_VIF_HOST_WRITE: u64 = 0x400;

/// Errors opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The device node is missing.
    #[error("{path}: no such device: ddvm needs KVM (expected a KVM device node; is the kvm module loaded?)")]
    Missing {
        /// Device path.
        path: PathBuf,
    },
    /// The device exists but we may not open it.
    #[error("{path}: permission denied: ddvm needs read/write access to KVM (expected a device node this user can open, e.g. via the kvm group)")]
    PermissionDenied {
        /// Device path.
        path: PathBuf,
    },
    /// The node opened but is not KVM.
    #[error("{path}: not a KVM device ({source}); expected the KVM device node")]
    NotKvm {
        /// Device path.
        path: PathBuf,
        /// Why the KVM API check failed.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Some other open failure.
    #[error("{path}: cannot open KVM: {source}")]
    Open {
        /// Device path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The KVM API version is not the stable one.
    #[error("{path}: KVM API version {version}, expected 12")]
    ApiVersion {
        /// Device path.
        path: PathBuf,
        /// Reported version.
        version: i32,
    },
}

/// An open KVM device and what we learned about it.
pub struct Hypervisor {
    kvm: Kvm,
    path: PathBuf,
    host_kind: Platform,
    cpuid: std::sync::OnceLock<CpuId>,
}

impl fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hypervisor")
            .field("path", &self.path)
            .field("host_kind", &self.host_kind)
            .finish()
    }
}

impl Hypervisor {
    /// Opens the KVM device at `path` and checks its API version.
    pub fn open(path: &Path) -> Result<Self, HypervisorError> {
        let kvm = Kvm::new_with_path(path_cstr(path)?).map_err(|e| match e.errno() {
            libc::ENOENT => HypervisorError::Missing {
                path: path.to_path_buf(),
            },
            libc::EACCES | libc::EPERM => HypervisorError::PermissionDenied {
                path: path.to_path_buf(),
            },
            _ => HypervisorError::Open {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        // KVM_GET_API_VERSION fails (ENOTTY) on anything that is not KVM.
        let version = kvm.get_api_version();
        if version < 0 {
            return Err(HypervisorError::NotKvm {
                path: path.to_path_buf(),
                source: kvm_ioctls::Error::new(-version),
            });
        }
        if version != 12 {
            return Err(HypervisorError::ApiVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        let host_kind = host_virtualization();
        Ok(Hypervisor {
            kvm,
            path: path.to_path_buf(),
            host_kind,
            cpuid: std::sync::OnceLock::new(),
        })
    }

    /// The CPUID KVM supports, asked once (each boot would otherwise pay ~0.1 ms for it).
    pub fn supported_cpuid(&self) -> Result<&CpuId, kvm_ioctls::Error> {
        if let Some(c) = self.cpuid.get() {
            return Ok(c);
        }
        let c = self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        Ok(self.cpuid.get_or_init(|| c))
    }

    /// The KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the CPU advertises (VMX or SVM) when KVM turns out not to be PVM.
    pub fn host_kind(&self) -> Platform {
        self.host_kind
    }
}

fn path_cstr(path: &Path) -> Result<std::ffi::CString, HypervisorError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| HypervisorError::Open {
        path: path.to_path_buf(),
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })
}

/// Tries to register the PVM VIF page for `vcpu`. PVM accepts the MSR (the ioctl reports one MSR
/// written); VMX/SVM KVM does not know it and writes none. Returns whether PVM accepted it.
pub fn register_pvm_vif(vcpu: &VcpuFd, vif_gpa: u64) -> bool {
    let Ok(msrs) = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_PVM_VIF,
        data: vif_gpa | PVM_VIF_HOST_WRITE,
        ..Default::default()
    }]) else {
        return false;
    };
    matches!(vcpu.set_msrs(&msrs), Ok(1))
}

/// VMX or SVM as the CPU advertises it, `Unknown` if neither.
fn host_virtualization() -> Platform {
    // `__cpuid` is a safe function in current Rust and an unsafe one in the oldest release
    // ddvm builds with (the workspace's rust-version).
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86-64 CPU; it only reads identification registers.
    let cpuid = |leaf: u32| unsafe { std::arch::x86_64::__cpuid(leaf) };
    let leaf1 = cpuid(1);
    if leaf1.ecx & (1 << 5) != 0 {
        return Platform::Vmx;
    }
    let ext = cpuid(0x8000_0000);
    if ext.eax >= 0x8000_0001 && cpuid(0x8000_0001).ecx & (1 << 2) != 0 {
        return Platform::Svm;
    }
    Platform::Unknown
}
