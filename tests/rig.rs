//! ddvm on SVM KVM. Our development machines' KVM is PVM; users mostly run on VMX or SVM. The
//! TCG rig (`scripts/rig`) boots a stock Debian kernel on an emulated AMD CPU with nested
//! paging, loads kvm_amd, and runs ddvm inside, as on a user's AMD host. The rig fetches its
//! kernel once (`scripts/rig setup`, apt-get download) and keeps it in ~/.cache/ddvm/rig.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `args` (after `--`) in the rig with ddvm and `files` added; returns the exit status and
/// the console from the rig's boot on.
fn rig(files: &[&str], args: &[&str]) -> (i32, String) {
    let ddvm = ddvm_bin();
    let mut cmd = Command::new(repo().join("scripts/rig"));
    cmd.arg("run").arg("--add").arg(&ddvm);
    for f in files {
        cmd.arg("--file").arg(repo().join(f));
    }
    cmd.arg("--").args(args);
    let out = cmd.output().expect("scripts/rig runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The table row of `client`: its columns after the name.
fn row<'a>(console: &'a str, client: &str) -> Vec<&'a str> {
    console
        .lines()
        .find(|l| l.split_whitespace().next() == Some(client))
        .map(|l| l.split_whitespace().skip(1).collect())
        .unwrap_or_default()
}

#[test]
fn demo_verifies_every_block_on_svm_kvm() {
    let (status, console) = rig(&[], &["ddvm", "demo", "--requests", "1000"]);
    assert_eq!(status, 0, "ddvm demo failed in the rig:\n{console}");
    assert!(
        console.contains("kvm_amd npt=Y"),
        "the rig has no nested-paging SVM KVM:\n{console}"
    );
    assert!(
        console.contains("KVM platform svm"),
        "ddvm did not run on SVM:\n{console}"
    );
    for client in ["client0", "client1"] {
        let r = row(&console, client);
        // ops IOPS p50 p99 max errors mismatches verified
        assert_eq!(r.len(), 8, "no report of {client}:\n{console}");
        assert_eq!(r[0], "1000", "{client} ops:\n{console}");
        assert_eq!(
            (r[5], r[6]),
            ("0", "0"),
            "{client} errors, mismatches:\n{console}"
        );
        assert!(
            r[7].parse::<u64>().is_ok_and(|v| v >= 1000),
            "{client} verified too few blocks:\n{console}"
        );
    }
    assert!(console.contains("every client verified every block it read"));
}
