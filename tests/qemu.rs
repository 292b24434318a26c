//! The same driver-domain ELF boots under QEMU (TCG, `-kernel` through its PVH entry): our
//! runtime does not depend on ddvm, and QEMU — written by others — keeps it honest.

mod common;

use common::qemu;

/// Boots the image with `append` and returns (exit code, serial output).
fn qemu_boot(append: &str) -> (Option<i32>, String) {
    qemu_boot_with(append, &[])
}

/// Boots the image with `append` and extra QEMU arguments.
fn qemu_boot_with(append: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = extra.to_vec();
    args.extend([
        "-kernel",
        ddvm_images::driver_domain_path(),
        "-append",
        append,
    ]);
    qemu("q35", &args)
}

#[test]
fn driver_domain_boots_under_qemu_through_pvh() {
    let (code, out) = qemu_boot("exit=0");
    assert!(
        out.contains("ddvm driver-domain: booted on qemu-pvh"),
        "output: {out}"
    );
    // isa-debug-exit: status 0 -> exit code (0 << 1) | 1.
    assert_eq!(code, Some(1), "output: {out}");
}

#[test]
fn panic_under_qemu_is_reported_and_fails() {
    let (code, out) = qemu_boot("panic");
    assert!(out.contains("panic"), "output: {out}");
    assert_ne!(
        code,
        Some(1),
        "a panic must not exit with success; output: {out}"
    );
    assert!(code.is_some(), "QEMU must exit through isa-debug-exit");
}

#[test]
fn exception_under_qemu_is_reported_by_the_idt() {
    let (code, out) = qemu_boot("ud2");
    assert!(
        out.contains("invalid opcode") || out.contains("#UD"),
        "output: {out}"
    );
    assert_ne!(code, Some(1), "output: {out}");
}

/// Runs the driver domain's NVMe self-test against QEMU's own NVMe model (written by others).
fn nvme_selftest_under_qemu(name: &str, block_size: u32) {
    let dir = common::scratch(name);
    let disk = dir.join("nvme.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let drive = format!("file={},if=none,id=nv0,format=raw", disk.display());
    let device = format!(
        "nvme,serial=ddvmtest,drive=nv0,logical_block_size={block_size},physical_block_size={block_size}"
    );
    let (code, out) = qemu_boot_with("selftest", &["-drive", &drive, "-device", &device]);
    assert!(
        out.contains("QEMU NVMe Ctrl"),
        "the driver must find QEMU's controller: {out}"
    );
    assert!(out.contains("nvme selftest: PASS"), "output: {out}");
    // MSI-X found through QEMU's capability (its table at 0x2000 in BAR0), not a known layout.
    assert!(out.contains("msix_vector=1"), "output: {out}");
    assert_eq!(code, Some(1), "output: {out}");
}

#[test]
fn nvme_selftest_passes_on_qemus_nvme_model() {
    nvme_selftest_under_qemu("qemu-nvme-512", 512);
}

#[test]
fn nvme_selftest_passes_on_qemus_nvme_model_with_4k_blocks() {
    nvme_selftest_under_qemu("qemu-nvme-4k", 4096);
}

/// Runs the driver domain's network self-test against two of QEMU's 8254x models (`model`) on
/// one hub: no user networking, no frame leaves QEMU.
fn net_selftest_under_qemu(model: &str, device_id: &str) {
    let nic0 = format!("{model},netdev=p0,mac=52:54:00:12:34:56");
    let nic1 = format!("{model},netdev=p1,mac=52:54:00:12:34:57");
    let (code, out) = qemu_boot_with(
        "selftest=net",
        &[
            "-netdev",
            "hubport,id=p0,hubid=0",
            "-device",
            &nic0,
            "-netdev",
            "hubport,id=p1,hubid=0",
            "-device",
            &nic1,
        ],
    );
    assert!(
        out.contains(&format!("8086:{device_id}")),
        "the driver must find QEMU's {model}: {out}"
    );
    assert!(
        out.contains("net selftest: PASS mac0=52:54:00:12:34:56 mac1=52:54:00:12:34:57 frames=232"),
        "output: {out}"
    );
    assert_eq!(code, Some(1), "output: {out}");
}

#[test]
fn net_selftest_passes_on_qemus_e1000_82540em() {
    net_selftest_under_qemu("e1000", "100e");
}

#[test]
fn net_selftest_passes_on_qemus_e1000_82544gc() {
    net_selftest_under_qemu("e1000-82544gc", "100c");
}

#[test]
fn net_selftest_passes_on_qemus_e1000_82545em() {
    net_selftest_under_qemu("e1000-82545em", "100f");
}

/// `selftest` alone runs the test of every device it finds: the NVMe controller's and the NICs'.
#[test]
fn selftest_runs_nvme_and_net_tests_for_the_devices_found() {
    let dir = common::scratch("qemu-nvme-and-net");
    let disk = dir.join("nvme.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let drive = format!("file={},if=none,id=nv0,format=raw", disk.display());
    let (code, out) = qemu_boot_with(
        "selftest",
        &[
            "-drive",
            &drive,
            "-device",
            "nvme,serial=ddvmtest,drive=nv0",
            "-netdev",
            "hubport,id=p0,hubid=0",
            "-device",
            "e1000,netdev=p0,mac=52:54:00:12:34:56",
            "-netdev",
            "hubport,id=p1,hubid=0",
            "-device",
            "e1000,netdev=p1,mac=52:54:00:12:34:57",
        ],
    );
    assert!(out.contains("nvme selftest: PASS"), "output: {out}");
    assert!(out.contains("net selftest: PASS"), "output: {out}");
    assert_eq!(code, Some(1), "output: {out}");
}
