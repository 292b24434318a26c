//! Bad input on the command line: each a one-line error naming the thing and what was
//! expected, a non-zero exit, and nothing left running.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn one_line_error(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("ddvm: error: "), "{stderr}");
    stderr
}

#[test]
fn missing_image_is_named() {
    let err = one_line_error(&ddvm(&["boot", "/nonexistent/dd.elf"]));
    assert!(
        err.contains("/nonexistent/dd.elf") && err.contains("No such file"),
        "{err}"
    );
    assert!(err.contains("expected an x86-64 ELF"), "{err}");
}

#[test]
fn corrupt_image_is_refused() {
    let dir = scratch("corrupt");
    let img = dir.join("corrupt.elf");
    let mut bytes = ddvm_images::DRIVER_DOMAIN.to_vec();
    bytes[1] = b'X';
    std::fs::write(&img, &bytes).unwrap();
    let err = one_line_error(&ddvm(&["boot", img.to_str().unwrap()]));
    assert!(
        err.contains("corrupt.elf") && err.contains("not an ELF"),
        "{err}"
    );

    let truncated = dir.join("truncated.elf");
    std::fs::write(&truncated, &ddvm_images::DRIVER_DOMAIN[..200]).unwrap();
    let err = one_line_error(&ddvm(&["boot", truncated.to_str().unwrap()]));
    assert!(err.contains("truncated.elf"), "{err}");
}

#[test]
fn elf_for_the_wrong_architecture_is_refused() {
    let dir = scratch("arch");
    let img = dir.join("aarch64.elf");
    let mut bytes = ddvm_images::DRIVER_DOMAIN.to_vec();
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    std::fs::write(&img, &bytes).unwrap();
    let err = one_line_error(&ddvm(&["boot", img.to_str().unwrap()]));
    assert!(
        err.contains("aarch64.elf") && err.contains("AArch64"),
        "{err}"
    );
    assert!(err.contains("expected an x86-64 ELF"), "{err}");
}

#[test]
fn config_key_of_the_wrong_type_is_named() {
    let dir = scratch("config");
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        "[[domain]]\nname = \"dd0\"\nmemory_mib = \"sixteen\"\n",
    )
    .unwrap();
    let err = one_line_error(&ddvm(&["run", cfg.to_str().unwrap(), "--duration", "1"]));
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("domain[0].memory_mib"), "{err}");
    assert!(err.contains("expected"), "{err}");
}

#[test]
fn missing_config_file_is_named() {
    let err = one_line_error(&ddvm(&["run", "/nonexistent/topology.toml"]));
    assert!(err.contains("/nonexistent/topology.toml"), "{err}");
}

#[test]
fn missing_kvm_device_is_named() {
    let err = one_line_error(&ddvm(&["--kvm", "/nonexistent/kvm", "boot"]));
    assert!(
        err.contains("/nonexistent/kvm") && err.contains("needs KVM"),
        "{err}"
    );
}

#[test]
fn a_device_that_is_not_kvm_is_named() {
    let err = one_line_error(&ddvm(&["--kvm", "/dev/null", "boot"]));
    assert!(
        err.contains("/dev/null") && err.contains("not a KVM device"),
        "{err}"
    );
}

#[test]
fn inaccessible_kvm_device_is_named() {
    // Root may open anything; run as nobody to get a real permission failure on /dev/kvm.
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("setpriv (util-linux) is needed to drop privileges");
    let bin = ddvm_bin();
    // The test binary may live under a directory nobody cannot enter: copy it out.
    let dir = scratch("perm");
    let copy = dir.join("ddvm");
    std::fs::copy(&bin, &copy).unwrap();
    for p in [dir.path(), copy.as_path()] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&copy)
        .args(["--kvm", "/dev/kvm", "boot"])
        .output()
        .unwrap();
    let err = one_line_error(&out);
    if nix_access_ok() {
        panic!("/dev/kvm is world-accessible here; cannot provoke EACCES: {err}");
    }
    assert!(
        err.contains("/dev/kvm") && err.contains("permission denied"),
        "{err}"
    );
}

fn nix_access_ok() -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata("/dev/kvm")
        .map(|m| m.permissions().mode() & 0o006 == 0o006)
        .unwrap_or(false)
}

/// `ddvm chaos` with a bad fault list or duration: the option, the bad part and what is
/// accepted are named (in every build: the arguments are checked first).
#[test]
fn bad_chaos_faults_and_durations_are_named() {
    for (faults, every, duration, wants) in [
        (
            "kill,explode",
            "1s",
            "1s",
            ["--faults", "\"explode\"", "wild-write"],
        ),
        (" ", "1s", "1s", ["--faults", "no fault kinds given", "all"]),
        (
            "kill",
            "100x",
            "1s",
            ["--every", "the unit is unknown", "100ms"],
        ),
        (
            "kill",
            "1s",
            "0s",
            ["--duration", "greater than zero", "1.5s"],
        ),
    ] {
        let err = one_line_error(&ddvm(&[
            "chaos",
            "/nonexistent/topology.toml",
            "--faults",
            faults,
            "--every",
            every,
            "--duration",
            duration,
        ]));
        for want in wants {
            assert!(err.contains(want), "{faults} {every} {duration}: {err}");
        }
    }
}

/// A build without fault injection refuses `ddvm chaos` before it reads or starts anything,
/// and says how to build one that can; a build with it goes on to read the config.
#[test]
fn chaos_needs_a_build_with_fault_injection() {
    let err = one_line_error(&ddvm(&[
        "chaos",
        "/nonexistent/topology.toml",
        "--faults",
        "kill",
        "--every",
        "1s",
        "--duration",
        "1s",
    ]));
    if cfg!(feature = "fault-injection") {
        assert!(err.contains("/nonexistent/topology.toml"), "{err}");
    } else {
        assert!(
            err.contains("built without fault injection")
                && err.contains("--features fault-injection")
                && !err.contains("topology.toml"),
            "{err}"
        );
    }
}

#[test]
fn a_bad_log_filter_is_refused_with_one_line() {
    let out = ddvm(&["--log", "ddvm=nonsense[", "check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("ddvm: error: --log (or DDVM_LOG) \"ddvm=nonsense[\"")
            && err.contains("expected a tracing filter"),
        "{err}"
    );
}

#[test]
fn verify_on_a_topology_with_clients_is_refused_with_one_line() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/net.toml");
    let out = ddvm(&["run", cfg.to_str().unwrap(), "--verify", "10"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line_error(&out);
    assert!(
        err.contains("--verify") && err.contains("net.toml has clients"),
        "{err}"
    );
}

#[test]
fn help_documents_the_exit_statuses() {
    let out = ddvm(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "Exit status:",
        "  0  success",
        "  2  a usage error",
        "  3  a guest crashed",
    ] {
        assert!(text.contains(line), "{line:?} missing from --help:\n{text}");
    }
}

#[test]
fn json_on_a_topology_without_clients_is_refused_with_one_line() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/nvme.toml");
    let out = ddvm(&["run", cfg.to_str().unwrap(), "--json", "/dev/null"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line_error(&out);
    assert!(
        err.contains("--json") && err.contains("nvme.toml has no clients"),
        "{err}"
    );
}

/// Every duration option takes the one syntax (a number and a unit, or bare seconds); a bad
/// one is a usage error naming the option and what is accepted.
#[test]
fn durations_share_one_syntax_and_a_bad_one_is_a_usage_error() {
    for (args, option) in [
        (
            &["run", "x.toml", "--duration", "2parsecs"][..],
            "--duration",
        ),
        (&["boot", "--timeout", "soon"][..], "--timeout"),
        (&["demo", "--kill-every", "0ms"][..], "--kill-every"),
    ] {
        let out = ddvm(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(option) && stderr.contains("a bare number is seconds"),
            "{args:?}: {stderr}"
        );
    }
    // A bare number and a number with a unit are the same duration: the run stops in time.
    for d in ["1", "1s", "1000ms"] {
        let dir = scratch(&format!("duration-{d}"));
        let cfg = dir.join("d.toml");
        std::fs::write(&cfg, "[[domain]]\nname = \"dd0\"\n").unwrap();
        let t0 = std::time::Instant::now();
        let out = ddvm(&["run", cfg.to_str().unwrap(), "--duration", d]);
        assert!(
            out.status.success(),
            "{d}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "{d}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
