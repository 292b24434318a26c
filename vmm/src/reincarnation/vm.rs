//! The engine's domains as real VMs: [`Domain`] is a [`DomainHandle`], and [`VmLauncher`]
//! boots them (fresh, or as warm standbys) for one device.

use std::sync::Arc;
use std::time::Duration;

use ddvm_recovery::reason::{FailureReason, OperatorAction};

use super::{DomainHandle, Launcher};
use crate::devices::DeviceSpec;
use crate::domain::{Domain, DomainConfig, DomainDevice};
use crate::hypervisor::Hypervisor;
use crate::loader::Image;
use crate::vcpu::{GuestExit, RunState};
use crate::vm::Guest;

/// Boots the driver domains of one device: `cfg` with the device that outlives them.
pub struct VmLauncher {
    hv: Arc<Hypervisor>,
    cfg: DomainConfig,
    device: Arc<DomainDevice>,
}

impl VmLauncher {
    /// A launcher for `cfg`, whose domains are handed `device`.
    pub fn new(hv: Arc<Hypervisor>, mut cfg: DomainConfig, device: Arc<DomainDevice>) -> Self {
        cfg.device = Some(DeviceSpec::Persistent(device.clone()));
        VmLauncher { hv, cfg, device }
    }

    /// The device the domains are handed.
    pub fn device(&self) -> &Arc<DomainDevice> {
        &self.device
    }

    /// The configuration domains boot with.
    pub fn config(&self) -> &DomainConfig {
        &self.cfg
    }
}

impl Launcher for VmLauncher {
    type Domain = Domain;

    fn boot(&self, epoch: u64, fault: Option<(u32, u32)>) -> Result<Domain, String> {
        let booted = match fault {
            Some((code, arg)) => {
                let mut cfg = self.cfg.clone();
                let fault = format!("boot_fault={code} boot_fault_arg={arg}");
                cfg.cmdline = format!("{} {fault}", cfg.cmdline).trim_start().to_string();
                Domain::boot(&self.hv, &cfg, epoch)
            }
            None => Domain::boot(&self.hv, &self.cfg, epoch),
        };
        booted.map_err(|e| e.to_string())
    }

    fn standby_boots(&self) -> Box<dyn FnMut(u64) -> Result<Domain, String> + Send> {
        let (hv, cfg) = (self.hv.clone(), self.cfg.clone());
        Box::new(move |epoch| Domain::boot_standby(&hv, &cfg, epoch).map_err(|e| e.to_string()))
    }

    fn set_image(&mut self, image: Image) {
        self.cfg.image = image;
    }

    fn dma_refused(&self) -> u64 {
        self.device.dma_refused()
    }
}

impl DomainHandle for Domain {
    fn epoch(&self) -> u64 {
        Domain::epoch(self)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<(), Option<FailureReason>> {
        match Guest::wait_ready(self, timeout) {
            Ok(_) => Ok(()),
            Err(RunState::Stopped(exit)) => Err(Some(exit_reason(&exit))),
            Err(_) => Err(None),
        }
    }

    fn has_stopped(&self) -> Option<FailureReason> {
        Guest::has_stopped(self).map(|exit| exit_reason(&exit))
    }

    fn promote(&mut self) -> Result<(), String> {
        Domain::promote(self).map_err(|e| e.to_string())
    }

    fn retire(&mut self) {
        Domain::retire(self)
    }

    fn stop_vcpu(&mut self) {
        Guest::stop(self);
    }

    fn is_waiting(&self) -> bool {
        Guest::is_waiting(self)
    }

    fn heartbeat(&self) -> Option<u64> {
        Domain::heartbeat(self)
    }

    fn cpu_time(&self) -> Option<Duration> {
        self.vcpu_cpu_time()
    }

    fn thread_id(&self) -> Option<i32> {
        self.vcpu_tid()
    }

    fn arm_fault(&self, code: u32, arg: u32) -> bool {
        Domain::arm_fault(self, code, arg)
    }

    fn request_fault(&self, code: u32, arg: u32) -> bool {
        self.request_fault_with(code, arg)
    }
}

/// The reason for a domain's exit.
pub fn exit_reason(exit: &GuestExit) -> FailureReason {
    match exit {
        GuestExit::Shutdown => FailureReason::Shutdown,
        GuestExit::InternalError { suberror } => FailureReason::InternalError {
            suberror: *suberror,
        },
        GuestExit::FailedEntry { reason } => FailureReason::FailedEntry { reason: *reason },
        GuestExit::Panicked { message } => FailureReason::Panic {
            message: message.clone(),
        },
        GuestExit::Exception {
            vector,
            rip,
            error_code,
            cr2,
        } => FailureReason::Exception {
            vector: *vector,
            rip: *rip,
            error_code: *error_code,
            cr2: *cr2,
        },
        GuestExit::BadPanicReport { value } => FailureReason::BadPanicReport { value: *value },
        GuestExit::Halted => FailureReason::Halted,
        GuestExit::Exited { status } => FailureReason::ExitedUnexpectedly { status: *status },
        GuestExit::Unexpected { exit } => FailureReason::UnexpectedExit { exit: exit.clone() },
        // The host's failure: named as such, never as the domain's.
        GuestExit::HostError { errno } => FailureReason::HostError { errno: *errno },
        GuestExit::Stopped => FailureReason::Operator(OperatorAction::Kill),
        // Driver domains have no reset line; a guest that has one and uses it is gone.
        GuestExit::Reset => FailureReason::UnexpectedExit {
            exit: "reset".into(),
        },
    }
}
