//! The host module against a fake sysfs: a tree of plain files and symlinks, and a fake kernel
//! that records every write in `ROOT/kernel.log` and acts on it as the kernel would.

use std::os::unix::fs::symlink;

use super::*;

const NVME: &str = "0000:00:04.0";
const NIC: &str = "0000:00:05.0";

/// A fake host under a fresh temporary directory, removed on drop.
struct Fake {
    root: PathBuf,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

impl Fake {
    /// IOMMU on (one unit), drivers nvme, e1000, ahci, pcieport, pci-stub and vfio-pci.
    fn new(name: &str) -> Fake {
        let root = std::env::temp_dir().join(format!("ddvm-host-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let fake = Fake { root };
        for d in ["nvme", "e1000", "ahci", "pcieport", "pci-stub", VFIO_PCI] {
            fs::create_dir_all(fake.sys().join("bus/pci/drivers").join(d)).unwrap();
        }
        fs::create_dir_all(fake.sys().join("class/iommu/dmar0")).unwrap();
        fs::create_dir_all(fake.sys().join("kernel/iommu_groups")).unwrap();
        fs::create_dir_all(fake.root.join("dev")).unwrap();
        fake
    }

    fn sys(&self) -> PathBuf {
        self.root.join("sys")
    }

    fn host(&self) -> Host {
        Host {
            write: fake_write,
            settle: Duration::ZERO,
            ..Host::new(&self.sys())
        }
    }

    fn dev_path(&self, address: &str) -> PathBuf {
        self.sys().join("bus/pci/devices").join(address)
    }

    /// A device of `class` in `group` (none: IOMMU off for it), bound to `driver`, resettable
    /// or not; `native` is the driver the kernel would pick for it on a probe.
    fn device(
        &self,
        address: &str,
        class: u32,
        group: Option<u32>,
        driver: Option<&str>,
        native: Option<&str>,
        resettable: bool,
    ) {
        let d = self.dev_path(address);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vendor"), "0x1b36\n").unwrap();
        fs::write(d.join("device"), "0x0010\n").unwrap();
        fs::write(d.join("class"), format!("{class:#08x}\n")).unwrap();
        fs::write(d.join("driver_override"), "(null)\n").unwrap();
        if resettable {
            fs::write(d.join("reset"), "").unwrap();
            fs::write(d.join("reset_method"), "flr\n").unwrap();
        } else {
            fs::write(d.join("reset_method"), "").unwrap();
        }
        if let Some(n) = native {
            fs::write(d.join("fake_native"), n).unwrap();
        }
        if let Some(g) = group {
            let gdir = self.sys().join("kernel/iommu_groups").join(g.to_string());
            fs::create_dir_all(gdir.join("devices")).unwrap();
            symlink(&gdir, d.join("iommu_group")).unwrap();
            symlink(&d, gdir.join("devices").join(address)).unwrap();
        }
        if let Some(drv) = driver {
            link_driver(&self.sys(), address, drv);
            if drv == VFIO_PCI {
                if let Some(g) = group {
                    make_node(&self.root, g);
                }
            }
        }
    }

    fn nvme(&self, group: u32, driver: Option<&str>) {
        self.device(NVME, 0x010802, Some(group), driver, Some("nvme"), true);
    }

    fn driver(&self, address: &str) -> Option<String> {
        link_name(&self.dev_path(address).join("driver"))
    }

    fn override_(&self, address: &str) -> String {
        fs::read_to_string(self.dev_path(address).join("driver_override"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn log(&self) -> Vec<String> {
        fs::read_to_string(self.root.join("kernel.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn node(&self, group: u32) -> bool {
        self.root.join("dev/vfio").join(group.to_string()).exists()
    }

    fn facts(&self) -> HostFacts {
        HostFacts {
            kvm: Ok((PathBuf::from("/dev/kvm"), Platform::Svm)),
            memlock: Some(8 << 20),
            ipc_lock: true,
            domain_memory: 16 << 20,
        }
    }
}

fn link_driver(sys: &Path, address: &str, driver: &str) {
    symlink(
        sys.join("bus/pci/drivers").join(driver),
        sys.join("bus/pci/devices").join(address).join("driver"),
    )
    .unwrap();
}

fn make_node(root: &Path, group: u32) {
    fs::create_dir_all(root.join("dev/vfio")).unwrap();
    fs::write(root.join("dev/vfio").join(group.to_string()), "").unwrap();
}

fn err(kind: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(kind, what.to_string())
}

/// The fake kernel: logs `SYSFS-RELATIVE-PATH VALUE` and does what the kernel would.
fn fake_write(path: &Path, value: &str) -> io::Result<()> {
    let sys = path
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "sys"))
        .expect("a path under the fake sys")
        .to_path_buf();
    let root = sys.parent().unwrap().to_path_buf();
    let rel = path.strip_prefix(&sys).unwrap().display().to_string();
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("kernel.log"))?;
    writeln!(log, "{}", format!("{rel} {}", value.trim()).trim_end())?;
    let devices = sys.join("bus/pci/devices");
    let bind = |address: &str, driver: &str| -> io::Result<()> {
        let d = devices.join(address);
        if d.join("driver").exists() {
            return Err(err(io::ErrorKind::ResourceBusy, "already bound"));
        }
        if d.join("fake_refuse").exists() && driver == VFIO_PCI {
            return Err(err(io::ErrorKind::InvalidInput, "probe failed"));
        }
        link_driver(&sys, address, driver);
        if driver == VFIO_PCI {
            if let Some(g) = link_name(&d.join("iommu_group")) {
                make_node(&root, g.parse().unwrap());
            }
        }
        Ok(())
    };
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    match name.as_str() {
        "driver_override" => {
            if !path.exists() {
                return Err(err(io::ErrorKind::NotFound, "no driver_override"));
            }
            let v = value.trim();
            fs::write(
                path,
                if v.is_empty() {
                    "(null)\n".to_string()
                } else {
                    format!("{v}\n")
                },
            )
        }
        "unbind" => {
            let driver = path
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let d = devices.join(value);
            if link_name(&d.join("driver")).as_deref() != Some(driver.as_str()) {
                return Err(err(io::ErrorKind::NotFound, "not bound to this driver"));
            }
            fs::remove_file(d.join("driver"))?;
            if driver == VFIO_PCI {
                if let Some(g) = link_name(&d.join("iommu_group")) {
                    let _ = fs::remove_file(root.join("dev/vfio").join(g));
                }
            }
            Ok(())
        }
        "bind" => {
            let driver = path
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            bind(value, &driver)
        }
        "drivers_probe" => {
            let d = devices.join(value);
            if d.join("driver").exists() {
                return Ok(());
            }
            let over = fs::read_to_string(d.join("driver_override"))?;
            let over = over.trim();
            let want = if over != "(null)" {
                Some(over.to_string())
            } else {
                fs::read_to_string(d.join("fake_native")).ok()
            };
            match want {
                Some(w) if sys.join("bus/pci/drivers").join(&w).is_dir() => {
                    // A failed probe leaves the device unbound; the write itself succeeds.
                    let _ = bind(value, &w);
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        other => panic!("unexpected sysfs write to {other}"),
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn addresses_are_canonical_or_refused() {
    assert_eq!(parse_address("0000:00:03.0").unwrap(), "0000:00:03.0");
    assert_eq!(parse_address("00:03.0").unwrap(), "0000:00:03.0");
    assert_eq!(parse_address("0000:AF:1F.7").unwrap(), "0000:af:1f.7");
    assert_eq!(parse_address("3:0.1").unwrap(), "0000:03:00.1");
    assert_eq!(parse_address("10de:01:00.0").unwrap(), "10de:01:00.0");
    for bad in [
        "",
        "00:03",
        "03.0",
        "0000:00:03.8",
        "0000:00:20.0",
        "0000:100:03.0",
        "00000:00:03.0",
        "0000:00:03.0.1",
        "x0:00:03.0",
        "0000:00:03.",
        "1:0000:00:03.0",
        " 00:03.0",
        "/sys/bus/pci/devices/0000:00:03.0",
    ] {
        let e = parse_address(bad).unwrap_err();
        assert!(matches!(e, HostError::BadAddress { .. }), "{bad}: {e}");
        assert!(
            e.to_string().contains("expected DDDD:BB:DD.F or BB:DD.F"),
            "{e}"
        );
    }
}

#[test]
fn a_bound_device_in_a_viable_group_is_ready() {
    let f = Fake::new("ready");
    f.nvme(4, Some(VFIO_PCI));
    // A bridge driven by pcieport, a device under pci-stub and one without a driver share it.
    f.device(
        "0000:00:1c.0",
        0x060400,
        Some(4),
        Some("pcieport"),
        None,
        false,
    );
    f.device(
        "0000:00:04.1",
        0x088000,
        Some(4),
        Some("pci-stub"),
        None,
        false,
    );
    f.device("0000:00:04.2", 0x088000, Some(4), None, None, false);
    let g = vfio_ready(&f.sys(), "00:04.0").unwrap();
    assert_eq!(
        g,
        VfioGroup {
            address: NVME.into(),
            group: 4,
            members: s(&[
                "0000:00:04.0",
                "0000:00:04.1",
                "0000:00:04.2",
                "0000:00:1c.0"
            ]),
            sysfs_path: f.dev_path(NVME),
        }
    );
}

#[test]
fn each_missing_piece_is_named() {
    let f = Fake::new("missing");
    let e = vfio_ready(&f.sys(), NVME).unwrap_err();
    assert!(matches!(e, HostError::NoDevice { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("0000:00:04.0: no such PCI device"),
        "{e}"
    );

    f.device(NIC, 0x020000, None, Some("e1000"), Some("e1000"), true);
    let e = vfio_ready(&f.sys(), NIC).unwrap_err();
    assert!(matches!(e, HostError::NoIommuGroup { .. }), "{e}");
    assert!(e.to_string().contains("intel_iommu=on"), "{e}");

    f.nvme(4, Some("nvme"));
    let e = vfio_ready(&f.sys(), NVME).unwrap_err();
    assert_eq!(
        e.to_string(),
        "0000:00:04.0: bound to nvme, expected vfio-pci (run `ddvm device bind 0000:00:04.0`)"
    );
    fs::remove_file(f.dev_path(NVME).join("driver")).unwrap();
    let e = vfio_ready(&f.sys(), NVME).unwrap_err();
    assert!(
        e.to_string()
            .contains("bound to no driver, expected vfio-pci"),
        "{e}"
    );

    link_driver(&f.sys(), NVME, VFIO_PCI);
    f.device(
        "0000:00:04.1",
        0x010601,
        Some(4),
        Some("ahci"),
        Some("ahci"),
        true,
    );
    let e = vfio_ready(&f.sys(), NVME).unwrap_err();
    assert!(
        matches!(e, HostError::GroupNotViable { group: 4, .. }),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("IOMMU group 4 is not viable: 0000:00:04.1 is bound to ahci"),
        "{e}"
    );
    assert!(
        e.to_string().contains("ddvm device bind 0000:00:04.1"),
        "{e}"
    );
    fs::remove_file(f.dev_path("0000:00:04.1").join("driver")).unwrap();

    let e = vfio_ready(&f.sys(), NVME).unwrap_err();
    assert!(matches!(e, HostError::NoVfioNode { group: 4, .. }), "{e}");
    assert!(e.to_string().contains("dev/vfio/4 missing"), "{e}");
    make_node(&f.root, 4);

    fs::remove_file(f.dev_path(NVME).join("reset")).unwrap();
    // Without a kernel reset an NVMe controller's own (CC.EN = 0) must do; another class
    // has none.
    vfio_ready(&f.sys(), NVME).unwrap();
    fs::write(f.dev_path(NVME).join("class"), "0x018000\n").unwrap();
    let e = vfio_ready(&f.sys(), NVME).unwrap_err();
    assert!(matches!(e, HostError::NotResettable { .. }), "{e}");
    assert!(
        e.to_string().starts_with("0000:00:04.0: not resettable"),
        "{e}"
    );

    let e = vfio_ready(&f.sys(), "nvme0").unwrap_err();
    assert!(matches!(e, HostError::BadAddress { .. }), "{e}");
    // Every message is one line.
    for e in [e, vfio_ready(&f.sys(), NIC).unwrap_err()] {
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}

#[test]
fn bind_and_unbind_give_the_device_back_to_its_driver() {
    let f = Fake::new("nvme-driver");
    f.nvme(4, Some("nvme"));
    let host = f.host();
    let bound = host.bind(&s(&["00:04.0"])).unwrap();
    assert_eq!(
        bound,
        vec![Bound {
            address: NVME.into(),
            group: 4,
            previous: Some("nvme".into()),
            already: false
        }]
    );
    assert_eq!(
        f.log(),
        s(&[
            "bus/pci/devices/0000:00:04.0/driver_override vfio-pci",
            "bus/pci/drivers/nvme/unbind 0000:00:04.0",
            "bus/pci/drivers_probe 0000:00:04.0",
        ])
    );
    assert_eq!(f.driver(NVME).as_deref(), Some(VFIO_PCI));
    assert!(f.node(4));
    assert_eq!(host.remembered(NVME).unwrap(), Some(Some("nvme".into())));
    assert_eq!(host.vfio_ready(NVME).unwrap().group, 4);

    let unbound = host.unbind(&s(&[NVME])).unwrap();
    assert_eq!(
        unbound,
        vec![Unbound {
            address: NVME.into(),
            driver: Some("nvme".into()),
            changed: true
        }]
    );
    assert_eq!(
        f.log()[3..],
        s(&[
            "bus/pci/devices/0000:00:04.0/driver_override",
            "bus/pci/drivers/vfio-pci/unbind 0000:00:04.0",
            "bus/pci/drivers/nvme/bind 0000:00:04.0",
        ])
    );
    assert_eq!(f.driver(NVME).as_deref(), Some("nvme"));
    assert_eq!(f.override_(NVME), "(null)");
    assert!(!f.node(4));
    assert_eq!(host.remembered(NVME).unwrap(), None);
}

#[test]
fn a_device_without_a_driver_is_left_without_one() {
    let f = Fake::new("unbound");
    // The nvme module is not loaded, as in the rig: a probe finds no driver for it.
    f.nvme(3, None);
    fs::remove_dir(f.sys().join("bus/pci/drivers/nvme")).unwrap();
    let host = f.host();
    let bound = host.bind(&s(&[NVME])).unwrap();
    assert_eq!(bound[0].previous, None);
    // Nothing to unbind from.
    assert_eq!(
        f.log(),
        s(&[
            "bus/pci/devices/0000:00:04.0/driver_override vfio-pci",
            "bus/pci/drivers_probe 0000:00:04.0",
        ])
    );
    assert_eq!(host.remembered(NVME).unwrap(), Some(None));
    let state = fs::read_to_string(f.root.join("run/ddvm/devices").join(NVME)).unwrap();
    assert_eq!(state, "driver=\n");

    let unbound = host.unbind(&s(&[NVME])).unwrap();
    assert_eq!(
        (unbound[0].driver.as_deref(), unbound[0].changed),
        (None, true)
    );
    assert_eq!(
        f.log()[2..],
        s(&[
            "bus/pci/devices/0000:00:04.0/driver_override",
            "bus/pci/drivers/vfio-pci/unbind 0000:00:04.0",
        ])
    );
    assert_eq!(f.driver(NVME), None);
    assert_eq!(f.override_(NVME), "(null)");
}

#[test]
fn binding_twice_changes_nothing_and_keeps_the_first_record() {
    let f = Fake::new("twice");
    f.nvme(4, Some("nvme"));
    let host = f.host();
    host.bind(&s(&[NVME])).unwrap();
    let again = host.bind(&s(&[NVME])).unwrap();
    assert!(again[0].already);
    assert_eq!(again[0].previous.as_deref(), Some("nvme"));
    assert_eq!(f.log().len(), 3);
    assert_eq!(host.remembered(NVME).unwrap(), Some(Some("nvme".into())));
}

#[test]
fn a_group_with_a_dma_driver_is_refused_before_anything_changes() {
    let f = Fake::new("not-viable");
    f.nvme(4, Some("nvme"));
    f.device(NIC, 0x020000, Some(4), Some("e1000"), Some("e1000"), true);
    let host = f.host();
    let e = host.bind(&s(&[NVME])).unwrap_err();
    assert!(
        e.to_string()
            .contains("IOMMU group 4 is not viable: 0000:00:05.0 is bound to e1000"),
        "{e}"
    );
    assert!(f.log().is_empty(), "{:?}", f.log());
    assert_eq!(host.remembered(NVME).unwrap(), None);
    assert_eq!(f.driver(NVME).as_deref(), Some("nvme"));

    // Both members at once: viable.
    let bound = host.bind(&s(&[NVME, "00:05.0"])).unwrap();
    assert_eq!(bound.len(), 2);
    assert_eq!(f.driver(NIC).as_deref(), Some(VFIO_PCI));
    assert_eq!(host.vfio_ready(NVME).unwrap().members, s(&[NVME, NIC]));

    // Unbinding one leaves the other's group non-viable again.
    host.unbind(&s(&[NIC])).unwrap();
    assert_eq!(f.driver(NIC).as_deref(), Some("e1000"));
    assert!(matches!(
        host.vfio_ready(NVME).unwrap_err(),
        HostError::GroupNotViable { .. }
    ));
}

#[test]
fn bind_refuses_what_vfio_cannot_take() {
    let f = Fake::new("refused");
    // IOMMU off: no group.
    f.device(NIC, 0x020000, None, Some("e1000"), Some("e1000"), true);
    let host = f.host();
    let e = host.bind(&s(&[NIC])).unwrap_err();
    assert!(matches!(e, HostError::NoIommuGroup { .. }), "{e}");
    // A bridge.
    f.device(
        "0000:00:1c.0",
        0x060400,
        Some(7),
        Some("pcieport"),
        None,
        false,
    );
    let e = host.bind(&s(&["00:1c.0"])).unwrap_err();
    assert!(matches!(e, HostError::Bridge { .. }), "{e}");
    // A bad address among good ones: nothing is done.
    f.nvme(4, Some("nvme"));
    let e = host.bind(&s(&[NVME, "04.0"])).unwrap_err();
    assert!(matches!(e, HostError::BadAddress { .. }), "{e}");
    // A missing device.
    let e = host.bind(&s(&["0000:00:09.0"])).unwrap_err();
    assert!(matches!(e, HostError::NoDevice { .. }), "{e}");
    assert!(f.log().is_empty(), "{:?}", f.log());
}

#[test]
fn without_vfio_pci_and_modprobe_bind_says_so() {
    let f = Fake::new("no-vfio");
    f.nvme(4, Some("nvme"));
    fs::remove_dir(f.sys().join("bus/pci/drivers/vfio-pci")).unwrap();
    let host = f.host();
    assert!(host.modprobe.is_none(), "only /sys may run modprobe");
    let e = host.bind(&s(&[NVME])).unwrap_err();
    assert!(matches!(e, HostError::NoVfioDriver { .. }), "{e}");
    assert!(e.to_string().contains("load the vfio-pci module"), "{e}");
    assert!(f.log().is_empty());
}

#[test]
fn a_failed_probe_is_reported_and_unbind_still_restores() {
    let f = Fake::new("probe-fails");
    f.nvme(4, Some("nvme"));
    fs::write(f.dev_path(NVME).join("fake_refuse"), "").unwrap();
    let host = f.host();
    let e = host.bind(&s(&[NVME])).unwrap_err();
    assert!(matches!(e, HostError::BindFailed { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("0000:00:04.0: bound to no driver after driver_override and drivers_probe, expected vfio-pci"),
        "{e}"
    );
    assert_eq!(host.remembered(NVME).unwrap(), Some(Some("nvme".into())));
    // Left unbound with the override set: unbind clears it and gives it back to nvme.
    let u = host.unbind(&s(&[NVME])).unwrap();
    assert_eq!(u[0].driver.as_deref(), Some("nvme"));
    assert_eq!(f.override_(NVME), "(null)");
    assert!(f
        .log()
        .contains(&"bus/pci/drivers/nvme/bind 0000:00:04.0".to_string()));
    assert!(!f
        .log()
        .contains(&"bus/pci/drivers/vfio-pci/unbind 0000:00:04.0".to_string()));
}

#[test]
fn unbind_without_a_record_or_a_driver_lets_the_kernel_choose() {
    let f = Fake::new("no-record");
    // Bound to vfio-pci by someone else.
    f.nvme(4, Some(VFIO_PCI));
    fs::write(f.dev_path(NVME).join("driver_override"), "vfio-pci\n").unwrap();
    let host = f.host();
    let u = host.unbind(&s(&[NVME])).unwrap();
    assert_eq!(u[0].driver.as_deref(), Some("nvme"));
    assert_eq!(
        f.log(),
        s(&[
            "bus/pci/devices/0000:00:04.0/driver_override",
            "bus/pci/drivers/vfio-pci/unbind 0000:00:04.0",
            "bus/pci/drivers_probe 0000:00:04.0",
        ])
    );

    // The remembered driver was unloaded meanwhile: a probe finds what there is (nothing).
    host.bind(&s(&[NVME])).unwrap();
    fs::remove_dir(f.sys().join("bus/pci/drivers/nvme")).unwrap();
    let u = host.unbind(&s(&[NVME])).unwrap();
    assert_eq!((u[0].driver.as_deref(), u[0].changed), (None, true));
    assert_eq!(
        f.log().last().unwrap(),
        "bus/pci/drivers_probe 0000:00:04.0"
    );
    assert_eq!(host.remembered(NVME).unwrap(), None);
}

#[test]
fn unbinding_a_device_not_on_vfio_does_nothing() {
    let f = Fake::new("not-ours");
    f.nvme(4, Some("nvme"));
    let host = f.host();
    let u = host.unbind(&s(&[NVME])).unwrap();
    assert_eq!(
        u,
        vec![Unbound {
            address: NVME.into(),
            driver: Some("nvme".into()),
            changed: false
        }]
    );
    assert!(f.log().is_empty());
}

#[test]
fn a_broken_state_record_is_named() {
    let f = Fake::new("bad-state");
    f.nvme(4, Some(VFIO_PCI));
    fs::create_dir_all(f.root.join("run/ddvm/devices")).unwrap();
    fs::write(f.root.join("run/ddvm/devices").join(NVME), "garbage\n").unwrap();
    let e = f.host().unbind(&s(&[NVME])).unwrap_err();
    assert!(
        e.to_string().contains("run/ddvm/devices/0000:00:04.0")
            && e.to_string().contains("driver=NAME"),
        "{e}"
    );
}

fn statuses(lines: &[CheckLine]) -> Vec<(String, Status)> {
    lines.iter().map(|l| (l.item.clone(), l.status)).collect()
}

fn status_of(lines: &[CheckLine], item: &str) -> Status {
    lines
        .iter()
        .find(|l| l.item == item)
        .unwrap_or_else(|| panic!("no line {item}: {lines:?}"))
        .status
}

#[test]
fn check_reports_an_unbound_device_then_passes_once_bound() {
    let f = Fake::new("check");
    f.nvme(3, None);
    f.device("0000:00:04.1", 0x088000, Some(3), None, None, false);
    let host = f.host();
    let lines = host.check(&f.facts(), &s(&["00:04.0"]));
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    assert_eq!(
        statuses(&lines),
        vec![
            ("kvm".into(), Status::Ok),
            ("iommu".into(), Status::Ok),
            ("vfio-pci".into(), Status::Ok),
            ("memlock".into(), Status::Ok),
            ("0000:00:04.0 device".into(), Status::Ok),
            ("0000:00:04.0 driver".into(), Status::Fail),
            ("0000:00:04.0 iommu group".into(), Status::Ok),
            ("0000:00:04.0 group viable".into(), Status::Ok),
            ("0000:00:04.0 vfio node".into(), Status::Fail),
            ("0000:00:04.0 reset".into(), Status::Ok),
        ],
        "{text:#?}"
    );
    assert_eq!(text[0], "ok   kvm: /dev/kvm, platform svm");
    assert_eq!(text[1], "ok   iommu: on (dmar0), 1 IOMMU groups");
    assert_eq!(
        text[4],
        "ok   0000:00:04.0 device: 1b36:0010, class 0x010802 (NVMe controller)"
    );
    assert_eq!(
        text[5],
        "FAIL 0000:00:04.0 driver: no driver, expected vfio-pci; fix: ddvm device bind 0000:00:04.0"
    );
    assert_eq!(
        text[6],
        "ok   0000:00:04.0 iommu group: 3: 0000:00:04.0 (no driver), 0000:00:04.1 (no driver)"
    );
    assert_eq!(text[9], "ok   0000:00:04.0 reset: resettable (flr)");

    host.bind(&s(&[NVME])).unwrap();
    let lines = host.check(&f.facts(), &s(&[NVME]));
    assert!(lines.iter().all(|l| l.status == Status::Ok), "{lines:#?}");
}

#[test]
fn check_names_what_to_fix() {
    let f = Fake::new("check-fails");
    // IOMMU off, vfio-pci not loaded, a low memlock limit without CAP_IPC_LOCK.
    fs::remove_dir_all(f.sys().join("class/iommu")).unwrap();
    fs::remove_dir(f.sys().join("bus/pci/drivers/vfio-pci")).unwrap();
    f.device(NIC, 0x020000, None, Some("e1000"), Some("e1000"), false);
    let facts = HostFacts {
        kvm: Err("/dev/kvm: no such device".into()),
        memlock: Some(64 << 10),
        ipc_lock: false,
        domain_memory: 16 << 20,
    };
    let lines = f.host().check(&facts, &s(&[NIC, "0000:00:09.0", "bogus"]));
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    assert_eq!(status_of(&lines, "kvm"), Status::Fail, "{text:#?}");
    assert_eq!(status_of(&lines, "iommu"), Status::Fail);
    assert!(text[1].contains("intel_iommu=on"), "{}", text[1]);
    assert_eq!(status_of(&lines, "vfio-pci"), Status::Warn);
    assert_eq!(
        text[3],
        "FAIL memlock: 64 KiB locked-memory limit; a domain pins its 16 MiB for DMA; fix: run as root (CAP_IPC_LOCK) or raise the limit: ulimit -l 16384 (or LimitMEMLOCK= / limits.conf)"
    );
    assert_eq!(status_of(&lines, "0000:00:05.0 driver"), Status::Fail);
    assert_eq!(status_of(&lines, "0000:00:05.0 iommu group"), Status::Fail);
    assert_eq!(status_of(&lines, "0000:00:09.0"), Status::Fail);
    assert_eq!(status_of(&lines, "bogus"), Status::Fail);
    // Without a group there is no node or viability to check; the reset is not reached either.
    assert!(!lines.iter().any(|l| l.item == "0000:00:05.0 vfio node"));
    assert!(lines
        .iter()
        .filter(|l| l.status != Status::Ok)
        .all(|l| l.fix.is_some()));
}

#[test]
fn check_names_the_group_members_in_the_way() {
    let f = Fake::new("check-group");
    f.nvme(4, Some(VFIO_PCI));
    f.device(NIC, 0x020000, Some(4), Some("e1000"), Some("e1000"), false);
    f.device(
        "0000:00:1c.0",
        0x060400,
        Some(4),
        Some("pcieport"),
        None,
        false,
    );
    let lines = f.host().check(&f.facts(), &s(&[NVME]));
    let line = lines
        .iter()
        .find(|l| l.item == "0000:00:04.0 group viable")
        .unwrap();
    assert_eq!(
        line.to_string(),
        "FAIL 0000:00:04.0 group viable: no: 0000:00:05.0 is bound to e1000; fix: bind the whole group: ddvm device bind 0000:00:04.0 0000:00:05.0"
    );
    // A device the kernel cannot reset.
    let lines = f.host().check(&f.facts(), &s(&[NIC]));
    assert_eq!(status_of(&lines, "0000:00:05.0 reset"), Status::Fail);
}

#[test]
fn memlock_is_enough_unlimited_or_bypassed() {
    let mut facts = HostFacts {
        kvm: Ok((PathBuf::from("/dev/kvm"), Platform::Pvm)),
        memlock: Some(8 << 20),
        ipc_lock: false,
        domain_memory: 16 << 20,
    };
    assert_eq!(check_memlock(&facts).status, Status::Fail);
    facts.memlock = Some(16 << 20);
    assert_eq!(check_memlock(&facts).status, Status::Ok);
    facts.memlock = None;
    assert_eq!(check_memlock(&facts).to_string(), "ok   memlock: unlimited");
    facts.memlock = Some(0);
    facts.ipc_lock = true;
    assert_eq!(check_memlock(&facts).status, Status::Ok);
}

#[test]
fn proc_limits_and_capabilities_parse() {
    let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                  Max processes             63413                63413                processes \n\
                  Max locked memory         8388608              8388608              bytes     \n";
    assert_eq!(memlock_from_limits(limits), Some(Some(8 << 20)));
    let unlimited = "Max locked memory         unlimited            unlimited            bytes\n";
    assert_eq!(memlock_from_limits(unlimited), Some(None));
    assert_eq!(memlock_from_limits("Max processes 1 1\n"), None);
    assert!(cap_ipc_lock_from_status(
        "Name:\tddvm\nCapEff:\t000001ffffffffff\n"
    ));
    assert!(!cap_ipc_lock_from_status("CapEff:\t0000000000000000\n"));
    assert!(cap_ipc_lock_from_status("CapEff:\t0000000000004000\n"));
    assert!(!cap_ipc_lock_from_status("Name:\tddvm\n"));
    // This process: whatever it is, it parses.
    let facts = HostFacts::of_process(Err("no kvm".into()), 16 << 20);
    assert_eq!(facts.domain_memory, 16 << 20);
}
