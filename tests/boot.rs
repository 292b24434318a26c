//! Boots the driver-domain image under ddvm: console, ready mark, heartbeat, native execution,
//! and every kind of crash classified.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use ddvm::domain::Domain;
use ddvm::vcpu::{GuestExit, RunState};
use ddvm_abi::boot::Platform;
use ddvm_abi::channel::fault;

use common::*;

#[test]
fn driver_domain_boots_prints_marks_ready_and_heartbeats() {
    let hv = kvm();
    let mut d = boot_ready(&hv, "boot", "");
    let hb0 = d.heartbeat().unwrap();
    // An idle domain beats on every wake-up (10 ms apart); a busy host may delay a few.
    let t0 = std::time::Instant::now();
    while d.heartbeat().unwrap() == hb0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "heartbeat did not advance from {hb0} in 5 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = d.console().text();
    assert!(
        text.contains("ddvm driver-domain: booted on"),
        "console: {text}"
    );
    assert!(text.contains("ready epoch=1"), "console: {text}");
    assert!(
        d.exits().wait.load(Ordering::Relaxed) > 0,
        "an idle domain must use the wait exit"
    );
    assert_eq!(d.stop(), GuestExit::Stopped);
    assert!(!matches!(d.platform(), Platform::QemuPvh));
}

fn crash_with(fault: u32) -> (GuestExit, String) {
    let hv = kvm();
    let d = boot_ready(&hv, "crash", "");
    assert!(d.request_fault(fault));
    let exit = d.wait_stopped(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "fault {fault} did not stop the domain: {}",
            d.console().text()
        )
    });
    (exit, d.console().text())
}

#[test]
fn panic_inside_the_domain_is_reported_with_its_message() {
    let (exit, console) = crash_with(fault::PANIC);
    match &exit {
        GuestExit::Panicked { message } => {
            assert!(message.contains("fault injected: panic"), "{message}")
        }
        other => panic!("expected a panic, got {other:?}; console: {console}"),
    }
    assert!(exit.is_crash());
    assert_eq!(exit.reason(), "panic");
}

#[test]
fn invalid_opcode_is_reported_by_the_guest_idt() {
    let (exit, console) = crash_with(fault::INVALID_OPCODE);
    match exit {
        GuestExit::Exception { vector, rip, .. } => {
            assert_eq!(vector, 6, "#UD");
            assert!(
                rip >= ddvm_abi::layout::IMAGE_BASE,
                "rip {rip:#x} in the image"
            );
        }
        other => panic!("expected #UD, got {other:?}; console: {console}"),
    }
}

#[test]
fn page_fault_is_reported_with_cr2() {
    let (exit, console) = crash_with(fault::PAGE_FAULT);
    match exit {
        GuestExit::Exception { vector, cr2, .. } => {
            assert_eq!(vector, 14, "#PF");
            assert!(cr2 >= 4 << 30, "cr2 {cr2:#x} beyond the identity map");
        }
        other => panic!("expected #PF, got {other:?}; console: {console}"),
    }
}

#[test]
fn exception_the_guest_cannot_take_is_a_shutdown_exit() {
    let (exit, console) = crash_with(fault::TRIPLE_FAULT);
    assert_eq!(exit, GuestExit::Shutdown, "console: {console}");
    assert!(exit.is_crash());
}

#[test]
fn hung_domain_stops_heartbeating_and_still_tears_down() {
    let hv = kvm();
    let mut d = boot_ready(&hv, "hang", "");
    assert!(d.request_fault(fault::HANG));
    std::thread::sleep(Duration::from_millis(50));
    let hb0 = d.heartbeat().unwrap();
    let ran0 = d.vcpu_cpu_time().expect("the vCPU's run time");
    // It spins: its vCPU keeps running (what tells a hang from a host that starves it), and
    // its heartbeat stays still however long it runs. A busy host may give it little CPU: wait
    // for 5 ms of it rather than for a wall-clock time.
    let t0 = std::time::Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            d.heartbeat().unwrap(),
            hb0,
            "a hung domain must not heartbeat"
        );
        let ran = d.vcpu_cpu_time().unwrap() - ran0;
        if ran > Duration::from_millis(5) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the hung vCPU ran only {ran:?} in {:?}",
            t0.elapsed()
        );
    }
    assert!(matches!(d.state(), RunState::Ready(_)));
    let t = std::time::Instant::now();
    assert_eq!(d.stop(), GuestExit::Stopped);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "teardown of a spinning vCPU took {:?}",
        t.elapsed()
    );
    assert_eq!(
        d.vcpu_cpu_time(),
        None,
        "no clock once the thread is joined"
    );
}

#[test]
fn domain_runs_natively_without_instruction_emulation() {
    let hv = kvm();
    // ~100 M instructions: at PVM's emulated rate (~3 M/s) that would take half a minute.
    let d = Domain::boot(&hv, &dd_config("spin", "spin=50000000"), 1).unwrap();
    let emul0 = d.vcpu_stat("insn_emulation").expect("KVM binary stats");
    d.wait_ready(Duration::from_secs(20))
        .unwrap_or_else(|s| panic!("not ready: {s:?} console: {}", d.console().text()));
    let emul1 = d.vcpu_stat("insn_emulation").unwrap();
    let text = d.console().text();
    assert!(
        text.contains("spin done iterations=50000000"),
        "console: {text}"
    );
    assert!(
        emul1 - emul0 < 5_000,
        "insn_emulation grew by {} during a 100 M instruction loop on {}: the guest is emulated",
        emul1 - emul0,
        d.platform().name()
    );
}

#[test]
fn boot_reports_time_to_ready_and_stays_within_budget() {
    let hv = kvm();
    let mut d = boot_ready(&hv, "timing", "");
    let RunState::Ready(t) = d.state() else {
        panic!("not ready")
    };
    // Not a timing test: the benchmark measures; this checks the number is real and sane.
    assert!(t > Duration::ZERO && t < Duration::from_secs(10), "{t:?}");
    d.stop();
}

#[test]
fn cli_boot_classifies_a_guest_panic() {
    let out = ddvm(&["boot", "--cmdline", "panic"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "stdout: {stdout}");
    assert!(stdout.contains("[reason=panic]"), "stdout: {stdout}");
}

#[test]
fn cli_boot_classifies_an_early_exception() {
    let out = ddvm(&["boot", "--cmdline", "ud2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "stdout: {stdout}");
    assert!(
        stdout.contains("[reason=exception]") && stdout.contains("invalid opcode"),
        "stdout: {stdout}"
    );
}

#[test]
fn cli_boot_reports_a_clean_exit() {
    let out = ddvm(&["boot", "--cmdline", "exit=0"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}");
    assert!(stdout.contains("exited with status 0"), "stdout: {stdout}");
}
