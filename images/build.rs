//! Builds the guest images (the `images/guest` workspace, target x86_64-unknown-none) and
//! copies them into `OUT_DIR` for `src/lib.rs` to embed.
//!
//! The guest build is a separate cargo invocation: its own workspace, target, profile and
//! `.cargo/config.toml` (static non-PIE ELF, linker script). Its target directory is
//! `<the outer target dir>/guest`, shared by every outer profile so it builds once. Variables
//! the outer build sets for build scripts (flags, target, jobserver, package metadata) are
//! cleared so they cannot leak into the guest build.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-none";
/// Images built from the guest workspace (binary name = file name in OUT_DIR without `.elf`).
const IMAGES: &[&str] = &["driver-domain", "workload-client"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let repo = manifest_dir
        .parent()
        .expect("images/ is inside the repository")
        .to_path_buf();
    let guest_ws = manifest_dir.join("guest");

    for path in [
        "guest-kernel",
        "driver-domain/src",
        "driver-domain/build.rs",
        "driver-domain/Cargo.toml",
        "abi/src",
        "abi/Cargo.toml",
        "images/guest/Cargo.toml",
        "images/guest/Cargo.lock",
        "images/guest/.cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", repo.join(path).display());
    }

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    check_target_installed(&rustc);

    let target_dir = guest_target_dir(&out_dir);
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_ws)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guest_ws.join("Cargo.toml"))
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--target-dir")
        .arg(&target_dir);
    if env::var_os("CARGO_FEATURE_FAULT_INJECTION").is_some() {
        // The driver domain carries fault injection only in a build that asks for it.
        cmd.arg("--features").arg("driver-domain/fault-injection");
    }
    for (key, _) in env::vars_os() {
        if leaks_into_guest_build(&key) {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
    if !status.success() {
        panic!(
            "building the guest images failed ({status}); to see why, run: \
             cd {} && cargo build --release",
            guest_ws.display()
        );
    }

    for image in IMAGES {
        let built = target_dir.join(GUEST_TARGET).join("release").join(image);
        let copy = out_dir.join(format!("{image}.elf"));
        fs::copy(&built, &copy).unwrap_or_else(|e| {
            panic!("cannot copy {} to {}: {e}", built.display(), copy.display())
        });
    }
}

/// Fails the build with instructions when the guest target's standard library is missing.
fn check_target_installed(rustc: &OsString) {
    let output = Command::new(rustc)
        .args(["--print", "sysroot"])
        .env_remove("RUSTC_WRAPPER")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(rustc).display()));
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let lib = Path::new(&sysroot).join("lib/rustlib").join(GUEST_TARGET);
    if !lib.is_dir() {
        panic!(
            "the Rust target {GUEST_TARGET} is not installed (no {}); the guest images need it. \
             Run: rustup target add {GUEST_TARGET}",
            lib.display()
        );
    }
}

/// `<outer target dir>/guest`: the first ancestor of OUT_DIR that cargo tagged as a target
/// directory (CACHEDIR.TAG), else the directory four levels up
/// (`<target>/<profile>/build/<pkg>-<hash>/out`).
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    let root = out_dir
        .ancestors()
        .find(|p| p.join("CACHEDIR.TAG").is_file())
        .or_else(|| out_dir.ancestors().nth(4))
        .unwrap_or(out_dir);
    root.join("guest")
}

/// Variables set for build scripts (or by the user for the host build) that must not reach
/// the guest build: compiler flags and wrappers, target selection, the jobserver, the outer
/// package's metadata. Cargo's own configuration (CARGO_HOME, CARGO_NET_*, CARGO_HTTP_*,
/// CARGO_REGISTRIES_*, ...) passes through.
fn leaks_into_guest_build(key: &OsString) -> bool {
    let Some(key) = key.to_str() else {
        return false;
    };
    const EXACT: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "NUM_JOBS",
        "RUSTDOC",
    ];
    const PREFIXES: &[&str] = &[
        "CARGO_CFG_",
        "CARGO_FEATURE_",
        "CARGO_PKG_",
        "CARGO_PROFILE_",
        "CARGO_TARGET_",
        "DEP_",
    ];
    EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}
