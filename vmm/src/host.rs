//! The host side of PCI passthrough: handing a device to vfio-pci and back, checking that a
//! device is ready for VFIO, and the host check (`ddvm check`).
//!
//! Everything goes through sysfs, under a root given by the caller (`/sys` on a real host), so
//! the logic runs against a fake tree in tests. Around that root: the device nodes are in
//! `ROOT/dev` (for `/sys`, `/dev`) and the bindings ddvm made are remembered in
//! `ROOT/run/ddvm/devices` (for `/sys`, `/run/ddvm/devices`; `/run` is cleared at boot, as the
//! bindings are).
//!
//! Binding follows the kernel's recipe (Documentation/ABI/testing/sysfs-bus-pci,
//! `driver_override`): write `vfio-pci` to the device's `driver_override`, unbind it from its
//! driver, write its address to `drivers_probe`. The driver it had is kept in a small state
//! file, so that unbinding can give the device back to it.
//!
//! Group viability follows the kernel (since 5.19 the IOMMU core's DMA ownership): VFIO can take
//! an IOMMU group only when no member is driven by a kernel driver that does DMA through the
//! DMA API. Members without a driver, or bound to a driver that manages DMA itself (vfio-pci and
//! its variant drivers, pci-stub, and pcieport, the PCIe bridges' driver) are fine.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ddvm_abi::boot::Platform;

/// The sysfs root of a real host.
pub const DEFAULT_SYSFS: &str = "/sys";
/// The driver passthrough devices are bound to.
pub const VFIO_PCI: &str = "vfio-pci";
/// Drivers besides vfio-pci (and its variants) that leave a group viable: they do no DMA of
/// their own through the kernel's DMA API (`driver_managed_dma`).
const DMA_FREE_DRIVERS: &[&str] = &["pci-stub", "pcieport"];
/// How long the kernel gets to bind a device and to create its VFIO group node.
const SETTLE: Duration = Duration::from_secs(2);

/// Why a device is not ready for passthrough, or an operation on it failed. Every message is one
/// line naming the device and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Not a PCI address.
    #[error("{input:?}: not a PCI address (expected DDDD:BB:DD.F or BB:DD.F, e.g. 0000:00:03.0)")]
    BadAddress {
        /// What was given.
        input: String,
    },
    /// No such device in sysfs.
    #[error("{address}: no such PCI device (expected {})", path.display())]
    NoDevice {
        /// Canonical address.
        address: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The device has no IOMMU group: the IOMMU is off.
    #[error("{address}: no IOMMU group (expected {}): the IOMMU is off; on Intel add intel_iommu=on to the kernel command line, on AMD enable the IOMMU in the firmware, then reboot", path.display())]
    NoIommuGroup {
        /// Canonical address.
        address: String,
        /// The missing `iommu_group` link.
        path: PathBuf,
    },
    /// The device is not bound to vfio-pci.
    #[error("{address}: bound to {}, expected {VFIO_PCI} (run `ddvm device bind {address}`)", driver_name(.driver))]
    NotVfio {
        /// Canonical address.
        address: String,
        /// Its driver.
        driver: Option<String>,
    },
    /// Another member of the device's IOMMU group is driven by a kernel driver that does DMA.
    #[error("{address}: IOMMU group {group} is not viable: {} (expected every member bound to {VFIO_PCI} or to no driver: `ddvm device bind {}`)", offenders_list(.offenders), offender_addresses(.offenders))]
    GroupNotViable {
        /// Canonical address.
        address: String,
        /// The group.
        group: u32,
        /// The members in the way, each with its driver.
        offenders: Vec<(String, String)>,
    },
    /// The group's VFIO device node is missing.
    #[error("{address}: {} missing (expected the VFIO node of IOMMU group {group}; is the device bound to {VFIO_PCI}?)", path.display())]
    NoVfioNode {
        /// Canonical address.
        address: String,
        /// The group.
        group: u32,
        /// The node.
        path: PathBuf,
    },
    /// The kernel has no way to reset the device.
    #[error("{address}: not resettable (expected {}: the kernel knows no reset for it (FLR, PM or bus reset), so a crashed domain's device state could not be cleared)", path.display())]
    NotResettable {
        /// Canonical address.
        address: String,
        /// The missing `reset` file.
        path: PathBuf,
    },
    /// A PCI bridge: vfio-pci takes endpoints only.
    #[error("{address}: a PCI bridge (class {class:#08x}); expected an endpoint device: {VFIO_PCI} does not take bridges")]
    Bridge {
        /// Canonical address.
        address: String,
        /// Its class code.
        class: u32,
    },
    /// vfio-pci is not loaded and could not be loaded.
    #[error("{address}: no {VFIO_PCI} driver (expected {}; {why})", path.display())]
    NoVfioDriver {
        /// Canonical address.
        address: String,
        /// The driver's sysfs directory.
        path: PathBuf,
        /// What was tried.
        why: String,
    },
    /// The kernel did not bind the device as asked.
    #[error("{address}: bound to {} after {what}, expected {expected} (see dmesg)", driver_name(.driver))]
    BindFailed {
        /// Canonical address.
        address: String,
        /// What was written.
        what: &'static str,
        /// The driver expected.
        expected: String,
        /// The driver it has.
        driver: Option<String>,
    },
    /// A sysfs or state file could not be read or written.
    #[error("{address}: cannot {what} {}: {source} (expected root, and a kernel with PCI driver_override)", path.display())]
    Io {
        /// Canonical address (or the group).
        address: String,
        /// What was tried.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn driver_name(driver: &Option<String>) -> String {
    match driver {
        Some(d) => d.clone(),
        None => "no driver".into(),
    }
}

fn offenders_list(offenders: &[(String, String)]) -> String {
    offenders
        .iter()
        .map(|(a, d)| format!("{a} is bound to {d}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn offender_addresses(offenders: &[(String, String)]) -> String {
    offenders
        .iter()
        .map(|(a, _)| a.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The canonical form `dddd:bb:dd.f` of a PCI address given as `dddd:bb:dd.f` or `bb:dd.f`
/// (hexadecimal; device 0-1f, function 0-7).
pub fn parse_address(input: &str) -> Result<String, HostError> {
    let bad = || HostError::BadAddress {
        input: input.to_string(),
    };
    let parts: Vec<&str> = input.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [d, b, df] => (*d, *b, *df),
        [b, df] => ("0000", *b, *df),
        _ => return Err(bad()),
    };
    let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
    let hex = |s: &str, max_len: usize, max: u32| -> Result<u32, HostError> {
        if s.is_empty() || s.len() > max_len || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let v = u32::from_str_radix(s, 16).map_err(|_| bad())?;
        if v > max {
            return Err(bad());
        }
        Ok(v)
    };
    let domain = hex(domain, 4, 0xffff)?;
    let bus = hex(bus, 2, 0xff)?;
    let dev = hex(dev, 2, 0x1f)?;
    let func = hex(func, 1, 7)?;
    Ok(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// A device ready for VFIO: bound to vfio-pci, in a viable IOMMU group whose node exists, and
/// resettable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioGroup {
    /// Canonical address, `dddd:bb:dd.f`.
    pub address: String,
    /// Its IOMMU group: the VFIO node is `/dev/vfio/<group>`.
    pub group: u32,
    /// Every member of the group (the device too), sorted.
    pub members: Vec<String>,
    /// The device's sysfs directory, `/sys/bus/pci/devices/<address>`.
    pub sysfs_path: PathBuf,
}

/// Checks, before VFIO opens it, that the device at `address` is ready: present, in an IOMMU
/// group, bound to vfio-pci, its group viable, `/dev/vfio/<group>` present (the device nodes are
/// beside `sysfs`: `/dev` for `/sys`), and resettable.
pub fn vfio_ready(sysfs: &Path, address: &str) -> Result<VfioGroup, HostError> {
    Host::new(sysfs).vfio_ready(address)
}

/// One member of an IOMMU group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its name in the group: the PCI address for a PCI device.
    pub address: String,
    /// Its driver.
    pub driver: Option<String>,
}

impl Member {
    /// Whether this member lets VFIO take its group (no driver, or one that does no DMA of its
    /// own through the kernel).
    pub fn dma_free(&self) -> bool {
        self.driver.as_deref().is_none_or(dma_free_driver)
    }
}

/// Whether binding to `driver` leaves a group viable.
fn dma_free_driver(driver: &str) -> bool {
    // vfio-pci and its variant drivers (e.g. mlx5_vfio_pci).
    driver == VFIO_PCI || driver.contains("vfio") || DMA_FREE_DRIVERS.contains(&driver)
}

/// What sysfs says about one PCI device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// Canonical address.
    pub address: String,
    /// Its sysfs directory.
    pub path: PathBuf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code (24 bits: class, subclass, programming interface).
    pub class: u32,
    /// Its driver.
    pub driver: Option<String>,
    /// Its `driver_override`, if set.
    pub driver_override: Option<String>,
    /// Its IOMMU group, if the IOMMU is on.
    pub group: Option<u32>,
    /// Whether the kernel can reset it (`reset` exists).
    pub resettable: bool,
    /// The kernel's reset methods (`reset_method`), e.g. `flr`; empty when unknown.
    pub reset_method: String,
}

impl PciDevice {
    /// The reset of its own ddvm knows for its class (an NVMe controller's disable, an Intel
    /// 8254x's CTRL.RST), which `reset = "controller"` uses; None when it has none.
    pub fn own_reset(&self) -> Option<&'static str> {
        ddvm_passthrough::vfio::DeviceKind::of(&ddvm_passthrough::PciIds {
            vendor: self.vendor,
            device: self.device,
            subsystem_vendor: 0,
            subsystem: 0,
            class_code: self.class,
            revision: 0,
        })
        .own_reset()
    }

    /// Whether it is a PCI-to-PCI or CardBus bridge.
    pub fn is_bridge(&self) -> bool {
        matches!(self.class >> 8, 0x0604 | 0x0607 | 0x0609)
    }

    /// A short description of its class.
    pub fn kind(&self) -> &'static str {
        match self.class >> 8 {
            0x0108 => "NVMe controller",
            0x0106 => "SATA controller",
            0x0200 => "Ethernet controller",
            0x0280 => "network controller",
            0x0300 | 0x0302 | 0x0380 => "display controller",
            0x0600 => "host bridge",
            0x0601 => "ISA bridge",
            0x0604 | 0x0609 => "PCI bridge",
            0x0c03 => "USB controller",
            _ => "PCI device",
        }
    }
}

/// Writes `value` to a sysfs file: one write, as the kernel expects.
fn sysfs_write(path: &Path, value: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// The host's sysfs, device nodes and ddvm's record of its bindings.
#[derive(Clone, Debug)]
pub struct Host {
    sysfs: PathBuf,
    dev: PathBuf,
    state: PathBuf,
    /// `modprobe`, to load vfio-pci when missing (only on the real root).
    modprobe: Option<PathBuf>,
    /// How sysfs files are written (tests record and act as the kernel would).
    write: fn(&Path, &str) -> io::Result<()>,
    /// How long the kernel gets to bind a device and create its node.
    settle: Duration,
}

impl Host {
    /// The host whose sysfs is at `sysfs`: its device nodes at `sysfs/../dev` and ddvm's record
    /// of bindings at `sysfs/../run/ddvm/devices` (`/dev` and `/run/ddvm/devices` for `/sys`).
    /// Only the real root (`/sys`) may load vfio-pci with modprobe.
    pub fn new(sysfs: &Path) -> Host {
        let root = sysfs.parent().unwrap_or(Path::new("/"));
        let modprobe = if sysfs == Path::new(DEFAULT_SYSFS) {
            find_modprobe()
        } else {
            None
        };
        Host {
            sysfs: sysfs.to_path_buf(),
            dev: root.join("dev"),
            state: root.join("run/ddvm/devices"),
            modprobe,
            write: sysfs_write,
            settle: SETTLE,
        }
    }

    /// This machine: `/sys`, `/dev`, `/run/ddvm/devices`.
    pub fn system() -> Host {
        Host::new(Path::new(DEFAULT_SYSFS))
    }

    /// The sysfs root.
    pub fn sysfs(&self) -> &Path {
        &self.sysfs
    }

    fn device_path(&self, address: &str) -> PathBuf {
        self.sysfs.join("bus/pci/devices").join(address)
    }

    fn driver_path(&self, driver: &str) -> PathBuf {
        self.sysfs.join("bus/pci/drivers").join(driver)
    }

    /// The VFIO node of `group`.
    pub fn vfio_node(&self, group: u32) -> PathBuf {
        self.dev.join("vfio").join(group.to_string())
    }

    /// Where the driver a device had before `bind` is kept.
    fn state_file(&self, address: &str) -> PathBuf {
        self.state.join(address)
    }

    /// What sysfs says about the device at `address` (any accepted form).
    pub fn device(&self, address: &str) -> Result<PciDevice, HostError> {
        let address = parse_address(address)?;
        let path = self.device_path(&address);
        if !path.is_dir() {
            return Err(HostError::NoDevice { address, path });
        }
        let read_hex = |name: &str| -> Result<u32, HostError> {
            let file = path.join(name);
            let text = fs::read_to_string(&file).map_err(|source| HostError::Io {
                address: address.clone(),
                what: "read",
                path: file.clone(),
                source,
            })?;
            let t = text.trim();
            u32::from_str_radix(t.trim_start_matches("0x"), 16).map_err(|_| HostError::Io {
                address: address.clone(),
                what: "parse",
                path: file.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{t:?}: expected a hexadecimal number"),
                ),
            })
        };
        let vendor = read_hex("vendor")? as u16;
        let device = read_hex("device")? as u16;
        let class = read_hex("class")?;
        let driver = link_name(&path.join("driver"));
        let driver_override = fs::read_to_string(path.join("driver_override"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != "(null)");
        let group = link_name(&path.join("iommu_group")).and_then(|g| g.parse().ok());
        let resettable = path.join("reset").exists();
        let reset_method = fs::read_to_string(path.join("reset_method"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(PciDevice {
            address,
            path,
            vendor,
            device,
            class,
            driver,
            driver_override,
            group,
            resettable,
            reset_method,
        })
    }

    /// The members of IOMMU group `group`, sorted, with their drivers.
    pub fn group_members(&self, group: u32) -> Result<Vec<Member>, HostError> {
        let dir = self
            .sysfs
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let entries = fs::read_dir(&dir).map_err(|source| HostError::Io {
            address: format!("IOMMU group {group}"),
            what: "list",
            path: dir.clone(),
            source,
        })?;
        let mut members: Vec<Member> = entries
            .filter_map(|e| e.ok())
            .map(|e| Member {
                address: e.file_name().to_string_lossy().into_owned(),
                driver: link_name(&e.path().join("driver")),
            })
            .collect();
        members.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(members)
    }

    /// The device's IOMMU group, or the error saying the IOMMU is off.
    fn group_of(&self, dev: &PciDevice) -> Result<u32, HostError> {
        dev.group.ok_or_else(|| HostError::NoIommuGroup {
            address: dev.address.clone(),
            path: dev.path.join("iommu_group"),
        })
    }

    /// Checks that the group of `dev` is viable, counting the members in `also` as bound to
    /// vfio-pci (they are about to be). Returns the members.
    fn viable(
        &self,
        dev: &PciDevice,
        group: u32,
        also: &[String],
    ) -> Result<Vec<Member>, HostError> {
        let members = self.group_members(group)?;
        let offenders: Vec<(String, String)> = members
            .iter()
            .filter(|m| m.address != dev.address && !also.contains(&m.address) && !m.dma_free())
            .map(|m| (m.address.clone(), driver_name(&m.driver)))
            .collect();
        if offenders.is_empty() {
            Ok(members)
        } else {
            Err(HostError::GroupNotViable {
                address: dev.address.clone(),
                group,
                offenders,
            })
        }
    }

    /// See [`vfio_ready`].
    pub fn vfio_ready(&self, address: &str) -> Result<VfioGroup, HostError> {
        let dev = self.device(address)?;
        let group = self.group_of(&dev)?;
        if dev.driver.as_deref() != Some(VFIO_PCI) {
            return Err(HostError::NotVfio {
                address: dev.address,
                driver: dev.driver,
            });
        }
        let members = self.viable(&dev, group, &[])?;
        let node = self.vfio_node(group);
        if !node.exists() {
            return Err(HostError::NoVfioNode {
                address: dev.address,
                group,
                path: node,
            });
        }
        // Without a kernel reset the device's own must do (`reset = "controller"`, checked
        // when it is opened).
        if !dev.resettable && dev.own_reset().is_none() {
            return Err(HostError::NotResettable {
                path: dev.path.join("reset"),
                address: dev.address,
            });
        }
        Ok(VfioGroup {
            address: dev.address,
            group,
            members: members.into_iter().map(|m| m.address).collect(),
            sysfs_path: dev.path,
        })
    }

    fn write_file(&self, address: &str, path: &Path, value: &str) -> Result<(), HostError> {
        (self.write)(path, value).map_err(|source| HostError::Io {
            address: address.to_string(),
            what: "write",
            path: path.to_path_buf(),
            source,
        })
    }

    /// Loads vfio-pci if its driver directory is missing (with modprobe, when there is one).
    fn ensure_vfio_pci(&self, address: &str) -> Result<(), HostError> {
        let path = self.driver_path(VFIO_PCI);
        if path.is_dir() {
            return Ok(());
        }
        let why = match &self.modprobe {
            None => "no modprobe to load it: load the vfio-pci module".to_string(),
            Some(modprobe) => match std::process::Command::new(modprobe).arg(VFIO_PCI).output() {
                Ok(out) if out.status.success() => {
                    if path.is_dir() {
                        return Ok(());
                    }
                    format!(
                        "{} {VFIO_PCI} succeeded but the driver did not appear",
                        modprobe.display()
                    )
                }
                Ok(out) => format!(
                    "{} {VFIO_PCI} failed: {}",
                    modprobe.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => format!("cannot run {}: {e}", modprobe.display()),
            },
        };
        Err(HostError::NoVfioDriver {
            address: address.to_string(),
            path,
            why,
        })
    }

    /// Binds the devices at `addresses` to vfio-pci. Checks first, before changing anything,
    /// that each is present, in an IOMMU group, not a bridge, and that its group is viable once
    /// every device named here is bound (so the members of one group are bound together).
    /// Remembers each device's driver for [`Host::unbind`]; a device already bound to vfio-pci
    /// is left as it is.
    pub fn bind(&self, addresses: &[String]) -> Result<Vec<Bound>, HostError> {
        let mut devices = Vec::new();
        for a in addresses {
            devices.push(self.device(a)?);
        }
        let all: Vec<String> = devices.iter().map(|d| d.address.clone()).collect();
        let mut groups = Vec::new();
        for dev in &devices {
            let group = self.group_of(dev)?;
            if dev.is_bridge() {
                return Err(HostError::Bridge {
                    address: dev.address.clone(),
                    class: dev.class,
                });
            }
            self.viable(dev, group, &all)?;
            groups.push(group);
        }
        if let Some(first) = all.first() {
            self.ensure_vfio_pci(first)?;
        }
        let mut bound = Vec::new();
        for (dev, group) in devices.into_iter().zip(groups) {
            bound.push(self.bind_one(dev, group)?);
        }
        for b in &bound {
            self.wait_node(&b.address, b.group)?;
        }
        Ok(bound)
    }

    fn bind_one(&self, dev: PciDevice, group: u32) -> Result<Bound, HostError> {
        let address = dev.address.clone();
        if dev.driver.as_deref() == Some(VFIO_PCI) {
            return Ok(Bound {
                address,
                group,
                previous: self.remembered(&dev.address)?.flatten(),
                already: true,
            });
        }
        // Remember the driver first: if anything below fails, unbind still knows it.
        self.remember(&address, dev.driver.as_deref())?;
        self.write_file(&address, &dev.path.join("driver_override"), VFIO_PCI)?;
        if let Some(driver) = &dev.driver {
            self.write_file(&address, &self.driver_path(driver).join("unbind"), &address)?;
        }
        self.write_file(
            &address,
            &self.sysfs.join("bus/pci/drivers_probe"),
            &address,
        )?;
        let now = self.wait_driver(&dev.path, Some(VFIO_PCI));
        if now.as_deref() != Some(VFIO_PCI) {
            return Err(HostError::BindFailed {
                address,
                what: "driver_override and drivers_probe",
                expected: VFIO_PCI.into(),
                driver: now,
            });
        }
        Ok(Bound {
            address,
            group,
            previous: dev.driver,
            already: false,
        })
    }

    /// Gives the devices at `addresses` back to the drivers they had before [`Host::bind`]:
    /// clears `driver_override`, unbinds them from vfio-pci and binds the remembered driver (a
    /// device that had none is left without one). Without a record (bound by something else) the
    /// kernel picks the driver (`drivers_probe`).
    pub fn unbind(&self, addresses: &[String]) -> Result<Vec<Unbound>, HostError> {
        let mut devices = Vec::new();
        for a in addresses {
            devices.push(self.device(a)?);
        }
        devices.into_iter().map(|d| self.unbind_one(d)).collect()
    }

    fn unbind_one(&self, dev: PciDevice) -> Result<Unbound, HostError> {
        let address = dev.address.clone();
        let remembered = self.remembered(&address)?;
        if dev.driver.as_deref() != Some(VFIO_PCI)
            && dev.driver_override.as_deref() != Some(VFIO_PCI)
        {
            // Not ours to undo: leave it.
            self.forget(&address)?;
            return Ok(Unbound {
                address,
                driver: dev.driver,
                changed: false,
            });
        }
        // Cleared with a newline, as `echo > driver_override` does.
        self.write_file(&address, &dev.path.join("driver_override"), "\n")?;
        if dev.driver.is_some() {
            self.write_file(
                &address,
                &self.driver_path(VFIO_PCI).join("unbind"),
                &address,
            )?;
        }
        let expected = match remembered {
            // It had no driver: leave it without one.
            Some(None) => None,
            Some(Some(driver)) if self.driver_path(&driver).is_dir() => {
                let bind = self.driver_path(&driver).join("bind");
                if (self.write)(&bind, &address).is_err() {
                    // The driver refused it: let the kernel choose.
                    self.write_file(
                        &address,
                        &self.sysfs.join("bus/pci/drivers_probe"),
                        &address,
                    )?;
                }
                Some(driver)
            }
            // Its driver is gone (unloaded) or unknown: let the kernel choose.
            Some(Some(_)) | None => {
                self.write_file(
                    &address,
                    &self.sysfs.join("bus/pci/drivers_probe"),
                    &address,
                )?;
                None
            }
        };
        let driver = match &expected {
            Some(d) => self.wait_driver(&dev.path, Some(d)),
            None => link_name(&dev.path.join("driver")),
        };
        if driver.as_deref() == Some(VFIO_PCI) {
            return Err(HostError::BindFailed {
                address,
                what: "unbind",
                expected: expected.unwrap_or_else(|| "no driver".into()),
                driver,
            });
        }
        self.forget(&address)?;
        Ok(Unbound {
            address,
            driver,
            changed: true,
        })
    }

    /// Polls the device's driver until it is `want` or the settle time passes.
    fn wait_driver(&self, path: &Path, want: Option<&str>) -> Option<String> {
        let start = Instant::now();
        loop {
            let now = link_name(&path.join("driver"));
            if now.as_deref() == want || start.elapsed() >= self.settle {
                return now;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the group's VFIO node (devtmpfs and udev make it after the bind).
    fn wait_node(&self, address: &str, group: u32) -> Result<(), HostError> {
        let node = self.vfio_node(group);
        let start = Instant::now();
        while !node.exists() {
            if start.elapsed() >= self.settle {
                return Err(HostError::NoVfioNode {
                    address: address.to_string(),
                    group,
                    path: node,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Records the driver `address` has before ddvm binds it.
    fn remember(&self, address: &str, driver: Option<&str>) -> Result<(), HostError> {
        let file = self.state_file(address);
        let io = |what, source| HostError::Io {
            address: address.to_string(),
            what,
            path: file.clone(),
            source,
        };
        fs::create_dir_all(&self.state).map_err(|e| io("create the directory of", e))?;
        let tmp = file.with_extension("new");
        fs::write(&tmp, format!("driver={}\n", driver.unwrap_or("")))
            .map_err(|e| io("write", e))?;
        fs::rename(&tmp, &file).map_err(|e| io("write", e))
    }

    /// The driver recorded for `address`: `None` without a record, `Some(None)` for a device
    /// that had no driver.
    pub fn remembered(&self, address: &str) -> Result<Option<Option<String>>, HostError> {
        let file = self.state_file(address);
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(HostError::Io {
                    address: address.to_string(),
                    what: "read",
                    path: file,
                    source,
                })
            }
        };
        let driver = text
            .lines()
            .find_map(|l| l.strip_prefix("driver="))
            .ok_or_else(|| HostError::Io {
                address: address.to_string(),
                what: "parse",
                path: file.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, "expected a line driver=NAME"),
            })?
            .trim();
        Ok(Some((!driver.is_empty()).then(|| driver.to_string())))
    }

    fn forget(&self, address: &str) -> Result<(), HostError> {
        let file = self.state_file(address);
        match fs::remove_file(&file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HostError::Io {
                address: address.to_string(),
                what: "remove",
                path: file,
                source,
            }),
        }
    }

    /// The host check: one line per item passthrough needs, for the host as a whole (`facts`:
    /// KVM, the locked-memory limit) and for each of `addresses`.
    pub fn check(&self, facts: &HostFacts, addresses: &[String]) -> Vec<CheckLine> {
        let mut lines = Vec::new();
        lines.push(match &facts.kvm {
            Ok((path, platform)) => CheckLine::ok(
                "kvm",
                format!("{}, platform {}", path.display(), platform.name()),
            ),
            Err(e) => CheckLine::fail(
                "kvm",
                e.clone(),
                "load kvm_intel or kvm_amd and give this user access to /dev/kvm",
            ),
        });
        lines.push(self.check_iommu());
        lines.push(if self.driver_path(VFIO_PCI).is_dir() {
            CheckLine::ok("vfio-pci", "driver loaded")
        } else {
            CheckLine::warn(
                "vfio-pci",
                "driver not loaded",
                "`ddvm device bind` loads it (modprobe vfio-pci)",
            )
        });
        lines.push(check_memlock(facts));
        for a in addresses {
            self.check_device(a, &mut lines);
        }
        lines
    }

    fn check_iommu(&self) -> CheckLine {
        let names = |dir: &str| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(self.sysfs.join(dir))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        let units = names("class/iommu");
        let groups = names("kernel/iommu_groups");
        if !units.is_empty() || !groups.is_empty() {
            let units = if units.is_empty() {
                "no units in class/iommu".to_string()
            } else {
                units.join(" ")
            };
            CheckLine::ok(
                "iommu",
                format!("on ({units}), {} IOMMU groups", groups.len()),
            )
        } else {
            CheckLine::fail(
                "iommu",
                format!(
                    "off: {} and {} are empty",
                    self.sysfs.join("class/iommu").display(),
                    self.sysfs.join("kernel/iommu_groups").display()
                ),
                "enable VT-d or AMD-Vi in the firmware; on Intel add intel_iommu=on to the kernel command line; reboot",
            )
        }
    }

    fn check_device(&self, address: &str, lines: &mut Vec<CheckLine>) {
        let dev = match self.device(address) {
            Ok(d) => d,
            Err(e @ (HostError::BadAddress { .. } | HostError::NoDevice { .. })) => {
                lines.push(CheckLine::fail(
                    address,
                    e.to_string(),
                    "give an address `lspci -D` lists",
                ));
                return;
            }
            Err(e) => {
                lines.push(CheckLine::fail(
                    address,
                    e.to_string(),
                    "check that sysfs is readable",
                ));
                return;
            }
        };
        let a = dev.address.clone();
        lines.push(CheckLine::ok(
            format!("{a} device"),
            format!(
                "{:04x}:{:04x}, class {:#08x} ({})",
                dev.vendor,
                dev.device,
                dev.class,
                dev.kind()
            ),
        ));
        let bind_fix = format!("ddvm device bind {a}");
        lines.push(if dev.driver.as_deref() == Some(VFIO_PCI) {
            CheckLine::ok(format!("{a} driver"), VFIO_PCI)
        } else if dev.is_bridge() {
            CheckLine::fail(
                format!("{a} driver"),
                format!(
                    "{}: a PCI bridge, which vfio-pci does not take",
                    driver_name(&dev.driver)
                ),
                "pass through the devices behind it instead",
            )
        } else {
            CheckLine::fail(
                format!("{a} driver"),
                format!("{}, expected {VFIO_PCI}", driver_name(&dev.driver)),
                bind_fix.clone(),
            )
        });
        let Some(group) = dev.group else {
            lines.push(CheckLine::fail(
                format!("{a} iommu group"),
                format!(
                    "none ({} missing): the IOMMU is off",
                    dev.path.join("iommu_group").display()
                ),
                "turn the IOMMU on (see the iommu line)",
            ));
            return;
        };
        match self.group_members(group) {
            Ok(members) => {
                let list = members
                    .iter()
                    .map(|m| format!("{} ({})", m.address, driver_name(&m.driver)))
                    .collect::<Vec<_>>()
                    .join(", ");
                lines.push(CheckLine::ok(
                    format!("{a} iommu group"),
                    format!("{group}: {list}"),
                ));
                let offenders: Vec<&Member> = members
                    .iter()
                    .filter(|m| m.address != a && !m.dma_free())
                    .collect();
                lines.push(if offenders.is_empty() {
                    CheckLine::ok(
                        format!("{a} group viable"),
                        "no other member is driven by a kernel driver that does DMA",
                    )
                } else {
                    CheckLine::fail(
                        format!("{a} group viable"),
                        format!(
                            "no: {}",
                            offenders
                                .iter()
                                .map(|m| format!(
                                    "{} is bound to {}",
                                    m.address,
                                    driver_name(&m.driver)
                                ))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        format!(
                            "bind the whole group: ddvm device bind {a} {}",
                            offenders
                                .iter()
                                .map(|m| m.address.as_str())
                                .collect::<Vec<_>>()
                                .join(" ")
                        ),
                    )
                });
            }
            Err(e) => lines.push(CheckLine::fail(
                format!("{a} iommu group"),
                e.to_string(),
                "check that sysfs is readable",
            )),
        }
        let node = self.vfio_node(group);
        lines.push(if node.exists() {
            CheckLine::ok(
                format!("{a} vfio node"),
                format!("{} present", node.display()),
            )
        } else {
            CheckLine::fail(
                format!("{a} vfio node"),
                format!("{} missing", node.display()),
                bind_fix,
            )
        });
        lines.push(if dev.resettable {
            let how = if dev.reset_method.is_empty() {
                "resettable".to_string()
            } else {
                format!("resettable ({})", dev.reset_method)
            };
            CheckLine::ok(format!("{a} reset"), how)
        } else if let Some(own) = dev.own_reset() {
            CheckLine::ok(
                format!("{a} reset"),
                format!("no kernel reset; its own ({own}) with reset = \"controller\""),
            )
        } else {
            CheckLine::fail(
                format!("{a} reset"),
                format!("{} missing: the kernel knows no reset for it", dev.path.join("reset").display()),
                "use a device with FLR (or a PM or bus reset); a crashed domain's device must be reset",
            )
        });
    }
}

/// A device [`Host::bind`] handed to vfio-pci.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    /// Canonical address.
    pub address: String,
    /// Its IOMMU group.
    pub group: u32,
    /// The driver it had (as remembered, for one bound earlier).
    pub previous: Option<String>,
    /// It was bound to vfio-pci already.
    pub already: bool,
}

/// A device [`Host::unbind`] gave back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unbound {
    /// Canonical address.
    pub address: String,
    /// Its driver now.
    pub driver: Option<String>,
    /// False when it was not bound to vfio-pci (nothing done).
    pub changed: bool,
}

/// What the host check needs to know beyond sysfs.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// The KVM device and its platform, or why it could not be opened.
    pub kvm: Result<(PathBuf, Platform), String>,
    /// The locked-memory limit (`RLIMIT_MEMLOCK`, soft) in bytes; `None` when unlimited.
    pub memlock: Option<u64>,
    /// Whether this process has CAP_IPC_LOCK (the limit does not apply then).
    pub ipc_lock: bool,
    /// The memory one domain pins for DMA, in bytes.
    pub domain_memory: u64,
}

impl HostFacts {
    /// This process's limit and capability; `kvm` and the domain's memory from the caller.
    pub fn of_process(kvm: Result<(PathBuf, Platform), String>, domain_memory: u64) -> HostFacts {
        let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        HostFacts {
            kvm,
            memlock: memlock_from_limits(&limits).unwrap_or(Some(0)),
            ipc_lock: cap_ipc_lock_from_status(&status),
            domain_memory,
        }
    }
}

/// The soft locked-memory limit in `/proc/self/limits` text: `Some(None)` when unlimited,
/// `None` when the line is missing.
pub fn memlock_from_limits(limits: &str) -> Option<Option<u64>> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    let soft = line["Max locked memory".len()..]
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(None);
    }
    soft.parse().ok().map(Some)
}

/// Whether the effective capabilities in `/proc/self/status` text include CAP_IPC_LOCK.
pub fn cap_ipc_lock_from_status(status: &str) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

fn check_memlock(facts: &HostFacts) -> CheckLine {
    let need_mib = facts.domain_memory.div_ceil(1 << 20);
    if facts.ipc_lock {
        return CheckLine::ok(
            "memlock",
            "CAP_IPC_LOCK: the memory VFIO pins is not limited",
        );
    }
    match facts.memlock {
        None => CheckLine::ok("memlock", "unlimited"),
        Some(limit) if limit >= facts.domain_memory => CheckLine::ok(
            "memlock",
            format!("{} KiB, enough for a domain of {need_mib} MiB", limit >> 10),
        ),
        Some(limit) => CheckLine::fail(
            "memlock",
            format!(
                "{} KiB locked-memory limit; a domain pins its {need_mib} MiB for DMA",
                limit >> 10
            ),
            format!(
                "run as root (CAP_IPC_LOCK) or raise the limit: ulimit -l {} (or LimitMEMLOCK= / limits.conf)",
                need_mib << 10
            ),
        ),
    }
}

/// How one item of the host check stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Present.
    Ok,
    /// Not needed yet, or fixed by ddvm itself.
    Warn,
    /// Missing: passthrough will not work until fixed.
    Fail,
}

/// One line of the host check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckLine {
    /// How it stands.
    pub status: Status,
    /// What was checked, e.g. `iommu` or `0000:00:04.0 driver`.
    pub item: String,
    /// What was found.
    pub detail: String,
    /// What to do about it (not for `Ok`).
    pub fix: Option<String>,
}

impl CheckLine {
    fn ok(item: impl Into<String>, detail: impl Into<String>) -> CheckLine {
        CheckLine {
            status: Status::Ok,
            item: item.into(),
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(
        item: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> CheckLine {
        CheckLine {
            status: Status::Warn,
            item: item.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(
        item: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> CheckLine {
        CheckLine {
            status: Status::Fail,
            item: item.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        write!(f, "{status:<4} {}: {}", self.item, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// The last component of the symlink at `path` (a driver's or a group's name), if it is one.
fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// `modprobe` in PATH or the usual sbin directories.
fn find_modprobe() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin", "/bin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join("modprobe"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests;
