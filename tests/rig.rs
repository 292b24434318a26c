//! ddvm on SVM KVM. Our development machines' KVM is PVM; users mostly run on VMX or SVM. The
//! TCG rig (`scripts/rig`) boots a stock Debian kernel on an emulated AMD CPU with nested
//! paging, loads kvm_amd, and runs ddvm inside, as on a user's AMD host. The rig fetches its
//! kernel once (`scripts/rig setup`, apt-get download) and keeps it in ~/.cache/ddvm/rig.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use ddvm_recovery::fault::FaultKind;

/// The fault kinds that act on the block domain these tests run.
fn block_kinds() -> impl Iterator<Item = FaultKind> {
    FaultKind::ALL
        .into_iter()
        .filter(|k| k.acts_on(ddvm_abi::channel::class::BLK))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `args` (after `--`) in the rig with ddvm and `files` added; returns the exit status and
/// the console from the rig's boot on.
fn rig(files: &[&str], args: &[&str]) -> (i32, String) {
    rig_with(&[], files, args)
}

/// [`rig`] with options of `scripts/rig run` first.
fn rig_with(options: &[&str], files: &[&str], args: &[&str]) -> (i32, String) {
    let ddvm = ddvm_bin();
    let mut cmd = Command::new(repo().join("scripts/rig"));
    cmd.arg("run").args(options).arg("--add").arg(&ddvm);
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

/// Builds the stock Linux client (`scripts/rig linux-client`) into the target's scratch
/// directory `name`; returns the rig's `--file` list: its kernel and initramfs, then `files`
/// (paths from the repository root).
fn linux_client_files(name: &str, files: &[&str]) -> Vec<String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let built = Command::new(repo().join("scripts/rig"))
        .arg("linux-client")
        .arg(&dir)
        .output()
        .expect("scripts/rig runs");
    assert!(
        built.status.success(),
        "scripts/rig linux-client failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    ["vmlinuz", "client.cpio.gz"]
        .iter()
        .map(|f| dir.join(f).display().to_string())
        .chain(files.iter().map(|f| f.to_string()))
        .collect()
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
    let (status, console) = rig(
        &[],
        &[
            "ddvm",
            "demo",
            "--requests",
            "1000",
            "--frames",
            "200",
            "--kills",
            "3",
        ],
    );
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
    // The NIC's clients and the kills: each recovered, nothing seen by the clients.
    assert!(
        console.contains("ddvm: 3 kill(s) of the driver domains, 3 recovered")
            && console.contains("the clients saw no error, no mismatch and no link down"),
        "the kills in the rig:\n{console}"
    );
    let kills: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("nvme0 ") || l.starts_with("nic0 ") || l.starts_with("nic1 "))
        .collect();
    println!("{}", kills.join("\n"));
}

/// A stock Debian kernel as a client guest: it finds its virtio-blk disk the way any Linux
/// guest does (virtio-mmio in ACPI, interrupts through the I/O APIC), and its disk is served
/// by an NVMe driver domain into which every fault kind of `ddvm chaos` is injected (a build
/// without fault injection: three kills), one per round of the client's writes, flushes and
/// read-backs. The client sees no I/O error and every byte it reads back is what it wrote.
/// It has two vCPUs, brought up by its kernel, and does I/O from both at once.
///
/// The rig runs with one vCPU: with two, single-threaded TCG lets the nested guest's timer
/// interrupts stop (measured: a stock kernel then hangs in every boot, also under a minimal
/// VMM written only to boot it), and multi-threaded TCG corrupts concurrent nested guests.
#[test]
fn a_stock_linux_client_is_served_through_every_domain_fault_on_svm_kvm() {
    let files = linux_client_files(
        "linux-client",
        &[
            "images/linux-client/linux-client.toml",
            "images/linux-client/rig-test.sh",
        ],
    );
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    let faults: Vec<&str> = if ddvm::chaos::ENABLED {
        block_kinds().map(|f| f.name()).collect()
    } else {
        vec!["kill"; 3]
    };
    let args: Vec<&str> = ["sh", "rig-test.sh"]
        .into_iter()
        .chain(faults.iter().copied())
        .collect();
    let (status, console) = rig_with(&["--smp", "1"], &files, &args);
    assert_eq!(status, 0, "the Linux client failed in the rig:\n{console}");
    assert!(
        console.contains("KVM platform svm"),
        "ddvm did not run on SVM:\n{console}"
    );
    assert!(
        console.contains(&format!("rig-test: faults {}", faults.len())),
        "not every fault was injected under the client's I/O ({faults:?}):\n{console}"
    );
    assert!(
        console
            .lines()
            .filter(|l| l.contains("domain nvme0: failed (") && l.ends_with("; recovering"))
            .count()
            >= faults.len() - 1,
        "a recovery per fault ({faults:?}):\n{console}"
    );
    assert!(
        !console.contains("I/O error"),
        "the client saw an I/O error:\n{console}"
    );
    let report = ddvm::client::LinuxReport::find(&console)
        .unwrap_or_else(|| panic!("no report from the Linux client:\n{console}"));
    assert!(report.clean(), "{report:?}\n{console}");
    println!("{} faults: {report:?}", faults.len());
    assert!(
        report.rounds as usize > faults.len(),
        "the faults came during I/O rounds: {report:?}"
    );
    assert!(
        report.verified_mib >= 48 && report.direct_blocks == 6,
        "{report:?}"
    );
    // linux-client.toml gives it two vCPUs: both came up, and both did I/O at once, each on
    // its own queue of the disk (MQ: a queue per vCPU).
    assert_eq!((report.cpus, report.cpu_blocks), (2, 2), "{report:?}");
    assert_eq!(report.queues, 2, "{report:?}");
    // What its driver negotiated: FLUSH, DISCARD, WRITE_ZEROES, BLK_SIZE, GET_ID, the size.
    assert_eq!(report.write_cache, "write back");
    assert!(report.discard_max_bytes > 0 && report.write_zeroes_max_bytes > 0);
    assert_eq!((report.block_size, report.sectors), (4096, 64 << 11));
    assert_eq!(report.serial, "ddvm-linux0");
}

/// Two stock Debian kernels on one NIC domain (`images/linux-client/net-linux.toml`): each
/// finds its virtio-net device the way any Linux guest does (a second virtio-mmio window in
/// ACPI, its own interrupt line), client a serves a 3 MiB file with busybox httpd and client
/// b fetches it with wget, repeatedly, while the NIC domain is killed three times, each a
/// moment into one of b's fetches. Every fetch matches the sha256 a printed, and b's eth0
/// never saw its carrier change: the link did not flap. Nothing leaves the machine: the VMM
/// hairpins the clients' frames, and the NIC's wire is an in-process pair to a domain with no
/// clients. One rig vCPU, as for the other Linux client.
#[test]
fn two_stock_linux_clients_move_a_file_over_virtio_net_while_the_nic_domain_is_killed() {
    const KILLS: usize = 3;
    let files = linux_client_files(
        "linux-client-net",
        &[
            "images/linux-client/net-linux.toml",
            "images/linux-client/net-test.sh",
        ],
    );
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    let kills = KILLS.to_string();
    let started = std::time::Instant::now();
    let (status, console) = rig_with(
        &["--smp", "1", "--timeout", "600"],
        &files,
        &["sh", "net-test.sh", &kills],
    );
    println!("the rig ran for {:.0?}", started.elapsed());
    assert_eq!(status, 0, "the Linux clients failed in the rig:\n{console}");
    assert!(
        console.contains("KVM platform svm"),
        "ddvm did not run on SVM:\n{console}"
    );
    assert!(
        console.contains(&format!("net-test: kills {KILLS} during {KILLS}")),
        "not every kill came while b was fetching:\n{console}"
    );
    assert!(
        console
            .lines()
            .filter(|l| l.contains("domain nic0: failed (operator: kill); recovering"))
            .count()
            >= KILLS,
        "a recovery per kill:\n{console}"
    );
    check_net_clients(&console, KILLS);
}

/// The checks of the two Linux clients of `net-linux.toml` after `net-test.sh KILLS`: both
/// reports clean, every one of b's KILLS + 2 fetches matched the sha256 a printed, 3 MiB
/// each, and b's carrier-change count in sysfs did not move (the link never went down).
fn check_net_clients(console: &str, kills: usize) {
    // Each client's console lines, `[name] ...`.
    let of = |name: &str| -> String {
        let tag = format!("[{name}] ");
        console
            .lines()
            .filter_map(|l| l.find(&tag).map(|at| &l[at + tag.len()..]))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (a, b) = (of("a"), of("b"));
    for (name, text) in [("a", &a), ("b", &b)] {
        let report = ddvm::client::LinuxReport::find(text)
            .unwrap_or_else(|| panic!("no report from client {name}:\n{console}"));
        assert!(report.clean(), "client {name}: {report:?}\n{console}");
    }
    let served = a
        .lines()
        .find_map(|l| l.strip_prefix("ddvm-net: serving "))
        .unwrap_or_else(|| panic!("client a served nothing:\n{console}"))
        .trim();
    assert_eq!(served.len(), 64, "a sha256: {served}");
    let net: serde_json::Value = ddvm::client::last_json(&b, "ddvm-net: ")
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_else(|| panic!("no network report from client b:\n{console}"));
    println!("client b: {net}");
    let field = |k: &str| net[k].as_u64().unwrap_or_else(|| panic!("{k}: {net}"));
    assert_eq!(
        net["sha256"], served,
        "b fetched another sum than a printed"
    );
    let fetches = field("fetches");
    assert_eq!(fetches, kills as u64 + 2, "{net}");
    assert_eq!(field("matched"), fetches, "a fetch did not match: {net}");
    assert_eq!(field("bytes"), 3 << 20, "{net}");
    assert_eq!(
        field("carrier_before"),
        field("carrier_after"),
        "the link flapped: {net}"
    );
}

/// Milliseconds in a duration as ddvm logs it (`898.016617ms`, `1.737256946s`, `850µs`).
fn millis(text: &str) -> Option<f64> {
    let t = text.trim();
    if let Some(v) = t.strip_suffix("ms") {
        return v.parse().ok();
    }
    if let Some(v) = t.strip_suffix("µs").or_else(|| t.strip_suffix("us")) {
        return v.parse::<f64>().ok().map(|v| v / 1e3);
    }
    t.strip_suffix('s')?.parse::<f64>().ok().map(|v| v * 1e3)
}

/// The same two stock Linux clients with both NIC domains given the rig's two QEMU e1000s
/// (82540EM, no MSI-X) by VFIO instead of emulated NICs (`images/vfio/rig-net.sh`): client a
/// on nic0, client b on nic1, so the file crosses the real wire between the two NICs (a QEMU
/// hub inside the rig: nothing leaves it). The NICs' INTx lines wake their domains; nic0's
/// domain is killed three times during b's fetches. Every fetch matches, b's carrier never
/// changes, each kill is a recovery, each quiesce reads bus mastering back off, resets the
/// e1000 (CTRL.RST) and unmaps all of the domain's memory, and the domain's e1000 is the VFIO
/// one. Prints the recovery and reset times.
#[test]
fn two_stock_linux_clients_move_a_file_through_vfio_e1000s_while_a_nic_domain_is_killed() {
    const KILLS: usize = 3;
    let files = linux_client_files(
        "linux-client-vfio-net",
        &[
            "images/linux-client/net-linux.toml",
            "images/linux-client/net-test.sh",
            "images/vfio/rig-net.sh",
        ],
    );
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    let kills = KILLS.to_string();
    let started = std::time::Instant::now();
    let (status, console) = rig_with(
        &[
            "--smp",
            "1",
            "--iommu",
            "--e1000",
            "mac=52:54:00:00:e1:00,addr=0x8",
            "--e1000",
            "mac=52:54:00:00:e1:01,addr=0x9",
            "--timeout",
            "1200",
        ],
        &files,
        &["sh", "rig-net.sh", &kills],
    );
    println!("the rig ran for {:.0?}", started.elapsed());
    // Without the terminal's colours.
    let console: String = {
        let mut out = String::with_capacity(console.len());
        let mut rest = console.as_str();
        while let Some(at) = rest.find("\x1b[") {
            out.push_str(&rest[..at]);
            rest = &rest[at..];
            rest = rest.find('m').map_or("", |m| &rest[m + 1..]);
        }
        out.push_str(rest);
        out
    };
    assert_eq!(status, 0, "the Linux clients failed in the rig:\n{console}");
    assert!(
        console.contains("KVM platform svm"),
        "ddvm did not run on SVM:\n{console}"
    );
    assert!(
        console.contains(&format!("net-test: kills {KILLS} during {KILLS}")),
        "not every kill came while b was fetching:\n{console}"
    );
    // The domains' devices are the VFIO e1000s, woken through INTx.
    for (nic, address, mac) in [
        ("nic0", "0000:00:08.0", "52:54:00:00:e1:00"),
        ("nic1", "0000:00:09.0", "52:54:00:00:e1:01"),
    ] {
        assert!(
            console.contains(&format!("VFIO device {address}: 8086:100e class 020000 (e1000), interrupts INTx, reset controller (CTRL.RST)")),
            "{nic}: its e1000 was not opened by VFIO:\n{console}"
        );
        assert!(
            console.contains(&format!(
                "[{nic}] e1000: 8086:100e at 00:01.0, BAR0 0xe0000000, MAC {mac}, INTx"
            )),
            "{nic}: the domain did not drive the VFIO e1000:\n{console}"
        );
    }
    let interrupts: u64 = console
        .lines()
        .find_map(|l| {
            l.strip_prefix("rig-net: device interrupts (INTx, both NICs) while ddvm ran: ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no interrupt count:\n{console}"));
    assert!(interrupts > 0, "no INTx came from the e1000s:\n{console}");
    // A recovery per kill, each after a clean quiesce of nic0's e1000.
    let count = |text: &str| console.lines().filter(|l| l.contains(text)).count();
    assert_eq!(
        count("domain nic0: failed (operator: kill); recovering"),
        KILLS,
        "{console}"
    );
    let recoveries: Vec<f64> = console
        .lines()
        .filter_map(|l| l.split_once("domain nic0: recovered in ").map(|(_, t)| t))
        .filter_map(millis)
        .collect();
    assert_eq!(recoveries.len(), KILLS, "a recovery per kill:\n{console}");
    // Every quiesce of either e1000 (one per kill, and the orderly stop's) is clean.
    let quiesces: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once(": quiesced: ").map(|(_, t)| t))
        .collect();
    assert!(
        quiesces.iter().all(
            |q| q.starts_with("bus master off (read back), reset controller in ")
                && q.contains("unmap complete")
        ),
        "a quiesce that was not clean (bus master off, CTRL.RST, all unmapped):\n{console}"
    );
    let resets: Vec<f64> = console
        .lines()
        .filter_map(|l| {
            l.split_once("VFIO device 0000:00:08.0: quiesced: bus master off (read back), reset controller in ")
                .map(|(_, t)| t)
        })
        .filter_map(|t| t.split(' ').next().and_then(|v| v.parse().ok()))
        .take(KILLS)
        .collect();
    assert_eq!(
        resets.len(),
        KILLS,
        "a quiesce of nic0's e1000 per kill:\n{console}"
    );
    assert!(!console.contains("reset failed"), "{console}");
    let attaches: Vec<f64> = console
        .lines()
        .filter_map(|l| {
            l.split_once("VFIO device 0000:00:08.0: attached in ")
                .map(|(_, t)| t)
        })
        .filter_map(|t| t.split(' ').next().and_then(|v| v.parse().ok()))
        .collect();
    println!(
        "nic0 by VFIO: recoveries (detection to first completion) {recoveries:.1?} ms; e1000 resets (CTRL.RST) {resets:.2?} ms; attaches (mostly the DMA map) {attaches:.1?} ms; INTx interrupts {interrupts}"
    );
    check_net_clients(&console, KILLS);
}

/// The host side of passthrough on a host with an IOMMU (the rig's emulated Intel IOMMU): an
/// NVMe controller nobody drives is reported as not bound, `ddvm device bind` hands it to
/// vfio-pci (its VFIO node appears and the check passes), `ddvm device unbind` leaves it
/// unbound again, as it was, with its driver_override cleared.
#[test]
fn device_bind_check_and_unbind_with_an_iommu() {
    let disks = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rig-vfio-disks");
    let _ = std::fs::remove_dir_all(&disks);
    let script = r#"
a=$RIG_NVME
d=/sys/bus/pci/devices/$a
ddvm check $a; echo "step: check-unbound $?"
ddvm device bind ${a#0000:}; echo "step: bind $?"
g=$(basename $(readlink $d/iommu_group))
echo "step: bound driver=$(basename $(readlink $d/driver)) override=$(cat $d/driver_override) node=$(ls /dev/vfio/$g)"
ddvm check $a; echo "step: check-bound $?"
ddvm device unbind $a; echo "step: unbind $?"
echo "step: unbound driver=$(readlink $d/driver) override=$(cat $d/driver_override) node=$(ls /dev/vfio/$g 2>&1 >/dev/null | wc -l) record=$(ls /run/ddvm/devices | wc -l)"
"#;
    let started = std::time::Instant::now();
    let (status, console) = rig_with(
        &[
            "--iommu",
            "--nvme",
            "serial=ddvm-vfio0,lba=4096,size=8",
            "--disks",
            disks.to_str().unwrap(),
        ],
        &[],
        &["sh", "-c", script],
    );
    println!("rig run: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(status, 0, "the rig failed:\n{console}");
    let a = console
        .lines()
        .find_map(|l| l.strip_prefix("rig: NVMe controller "))
        .and_then(|l| l.split(',').next())
        .unwrap_or_else(|| panic!("no NVMe controller in the rig:\n{console}"))
        .to_string();
    let step = |name: &str| -> String {
        console
            .lines()
            .find_map(|l| l.strip_prefix(&format!("step: {name} ")))
            .unwrap_or_else(|| panic!("no step {name}:\n{console}"))
            .to_string()
    };
    // Before: everything but the device's driver and node is there.
    assert_eq!(step("check-unbound"), "1", "{console}");
    for line in [
        "ok   kvm: /dev/kvm, platform svm".to_string(),
        format!("ok   {a} device: 1b36:0010, class 0x010802 (NVMe controller)"),
        format!("FAIL {a} driver: no driver, expected vfio-pci; fix: ddvm device bind {a}"),
        format!("ok   {a} group viable"),
        format!("ok   {a} reset: resettable (flr)"),
        "ok   vfio-pci: driver loaded".to_string(),
        "ok   memlock:".to_string(),
    ] {
        assert!(
            console.lines().any(|l| l.starts_with(&line)),
            "no line {line:?}:\n{console}"
        );
    }
    assert!(console
        .lines()
        .any(|l| l.starts_with("ok   iommu: on (dmar0)")));
    assert!(console.contains(&format!("FAIL {a} vfio node: /dev/vfio/")));
    // Bound.
    assert_eq!(step("bind"), "0", "{console}");
    assert!(
        console.contains(&format!(
            "ddvm: {a} bound to vfio-pci (was: no driver), IOMMU group "
        )),
        "{console}"
    );
    let bound = step("bound");
    assert!(
        bound.starts_with("driver=vfio-pci override=vfio-pci node=/dev/vfio/"),
        "{console}"
    );
    assert_eq!(
        step("check-bound"),
        "0",
        "the check still fails:\n{console}"
    );
    // Unbound: as before.
    assert_eq!(step("unbind"), "0", "{console}");
    assert!(console.contains(&format!("ddvm: {a} unbound from vfio-pci, now: no driver")));
    assert_eq!(
        step("unbound"),
        "driver= override=(null) node=1 record=0",
        "{console}"
    );
    // The controller's backing file, kept in --disks.
    let img = std::fs::metadata(disks.join("nvme0.img")).expect("the backing file is kept");
    assert_eq!(img.len(), 8 << 20);
    let _ = std::fs::remove_dir_all(&disks);
}

/// The workload client's block format (guest-kernel/workload/src/pattern.rs), to judge a
/// backing image after the rig powered off: every block of a client's range must hold a
/// well-formed block that this client wrote there in this run.
mod blocks {
    const MAGIC: u64 = u64::from_le_bytes(*b"DDVMBLK1");
    const HEADER: usize = 48;
    const CHECKSUM_AT: usize = 40;
    const INIT: u64 = 0xcbf2_9ce4_8422_2325;

    fn word(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fold(h: u64, w: u64) -> u64 {
        (h ^ w).wrapping_mul(0x100_0000_01b3).rotate_left(29)
    }

    /// Checks the blocks of `image` from byte `offset`, `count` blocks of `bs` bytes, written
    /// by client `id`: Err names the first bad block. Returns the run nonce.
    pub fn check(
        image: &[u8],
        offset: usize,
        count: usize,
        bs: usize,
        id: u32,
    ) -> Result<u64, String> {
        let mut run = None;
        for i in 0..count {
            let at = offset + i * bs;
            let b = image
                .get(at..at + bs)
                .ok_or(format!("block {i}: past the image's end"))?;
            if word(b, 0) != MAGIC {
                return Err(format!(
                    "block {i} of client {id}: never written (no header)"
                ));
            }
            let (r, idgen, block, size) = (word(b, 8), word(b, 16), word(b, 24), word(b, 32));
            let gen = (idgen >> 32) as u32;
            if size != bs as u64 || block != i as u64 || idgen as u32 != id {
                return Err(format!(
                    "block {i} of client {id}: holds block {block} of client {} (size {size})",
                    idgen as u32
                ));
            }
            let mut h = INIT;
            for w in (0..CHECKSUM_AT).step_by(8) {
                h = fold(h, word(b, w));
            }
            let a = mix(r ^ ((u64::from(id) << 32) | u64::from(gen)));
            let mut x = mix(a ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
            for (n, c) in b[HEADER..].chunks_exact(8).enumerate() {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let want = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
                let w = u64::from_le_bytes(c.try_into().unwrap());
                if w != want {
                    return Err(format!(
                        "block {i} of client {id}: payload differs at byte {}",
                        HEADER + 8 * n
                    ));
                }
                h = fold(h, w);
            }
            if h != word(b, CHECKSUM_AT) {
                return Err(format!("block {i} of client {id}: bad checksum"));
            }
            if *run.get_or_insert(r) != r {
                return Err(format!("block {i} of client {id}: from another run"));
            }
        }
        run.ok_or_else(|| "no block".to_string())
    }
}

/// Two NVMe controllers of QEMU behind its emulated Intel IOMMU, of other shapes than the
/// emulated model's (4 KiB blocks; 512-byte blocks with MDTS 3 and two queue pairs), each
/// passed through VFIO to a driver domain that serves two verifying clients, while every
/// fault kind of `ddvm chaos` is injected (a build without fault injection: kills). The
/// clients see no error and no mismatch; after every quiesce bus mastering reads back off, the
/// reset succeeded and the unmap removed all the domain's memory; the command register of each
/// device has bus mastering off after the run; and after the rig powered off, every block of
/// each client's range in the controllers' backing files is one the client wrote there.
#[test]
fn vfio_driver_domains_serve_verified_clients_through_every_fault_in_the_rig() {
    let disks = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vfio-disks");
    let _ = std::fs::remove_dir_all(&disks);
    std::fs::create_dir_all(&disks).unwrap();
    let disks_arg = disks.display().to_string();
    let faults = if ddvm::chaos::ENABLED { "all" } else { "kill" };
    let script = format!(
        "RIG_DISK_MIB=16 RIG_COUNT=100000 sh rig-vfio.sh chaos --faults {faults} --every 1s \
         --duration 40s --no-baseline --log warn,ddvm_passthrough::vfio=info"
    );
    let (status, console) = rig_with(
        &[
            "--iommu",
            "--nvme",
            "serial=vfio0,lba=4096,size=16",
            "--nvme",
            "serial=vfio1,lba=512,mdts=3,max_ioqpairs=2,size=16",
            "--disks",
            &disks_arg,
            "--timeout",
            "900",
        ],
        &["images/vfio/rig-vfio.sh"],
        &["sh", "-c", &script],
    );
    assert_eq!(status, 0, "the VFIO topology failed in the rig:\n{console}");
    assert!(console.contains("kvm: /dev/kvm, platform svm"), "{console}");
    assert!(
        console.contains("client errors 0, mismatches 0"),
        "the clients saw errors or mismatches:\n{console}"
    );
    let recoveries: usize = console
        .lines()
        .find_map(|l| l.strip_prefix("recoveries "))
        .and_then(|l| l.split(',').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no recovery count:\n{console}"));
    if ddvm::chaos::ENABLED {
        let injected: Vec<&str> = console
            .lines()
            .skip_while(|l| !l.starts_with("faults injected"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for kind in block_kinds() {
            assert!(
                injected.contains(&kind.name()),
                "{} was not injected ({injected:?}):\n{console}",
                kind.name()
            );
        }
    }
    let faults_n = if ddvm::chaos::ENABLED {
        block_kinds().count()
    } else {
        3
    };
    assert!(
        recoveries >= faults_n,
        "{recoveries} recoveries:\n{console}"
    );
    let quiesces: Vec<&str> = console
        .lines()
        .filter(|l| l.contains(": quiesced: "))
        .collect();
    assert!(
        quiesces.len() >= recoveries,
        "a quiesce per recovery ({recoveries}):\n{console}"
    );
    for q in &quiesces {
        assert!(
            q.contains("bus master off (read back)")
                && q.contains("unmap complete")
                && !q.contains("FAILED"),
            "a quiesce left the device reachable: {q}\n{console}"
        );
    }
    for l in console
        .lines()
        .filter(|l| l.contains("command register after the run"))
    {
        let cmd = u16::from_str_radix(l.rsplit(' ').next().unwrap(), 16).unwrap();
        assert_eq!(cmd & 4, 0, "bus mastering left on: {l}");
    }
    // The backing files, read after the rig powered off: 16 MiB each, two clients of 8 MiB.
    for (n, file) in ["nvme0.img", "nvme1.img"].iter().enumerate() {
        let image = std::fs::read(disks.join(file)).unwrap();
        for half in 0..2usize {
            let id = (2 * n + half) as u32;
            if let Err(e) = blocks::check(&image, half * (8 << 20), (8 << 20) / 4096, 4096, id) {
                panic!("{file}: {e}\n{console}");
            }
        }
    }
    // The numbers (attach, DMA map, reset) as measured in this run.
    for l in console
        .lines()
        .filter(|l| {
            l.contains("VFIO device") && (l.contains("attached in") || l.contains("quiesced"))
        })
        .take(6)
    {
        println!("{l}");
    }
}

/// DMA isolation of a VFIO device, proved in the rig (`ddvm isolation`, a fault-injection
/// build): the domain's DMA aimed at a canary page outside its IOVA range leaves the canary
/// intact and the IOMMU reports the fault (in the kernel log, which the VMM reads); the
/// negative control — the page mapped there on purpose — gets overwritten; the retired
/// domain's memory is unchanged while its successor does verified I/O; and a reset that fails
/// leaves the device unclean and unmapped, keeps it from the next domain, and is retried
/// until it succeeds.
#[test]
fn vfio_dma_isolation_stale_epochs_and_a_failed_reset_in_the_rig() {
    if !ddvm::chaos::ENABLED {
        return;
    }
    let (status, console) = rig_with(
        &[
            "--iommu",
            "--nvme",
            "serial=iso0,lba=512,size=8",
            "--timeout",
            "600",
        ],
        &["images/vfio/rig-isolation.sh"],
        &["sh", "rig-isolation.sh"],
    );
    assert_eq!(
        status, 0,
        "the isolation checks failed in the rig:\n{console}"
    );
    for line in [
        "isolation: canary intact; IOMMU faults reported for 0000:00:10.0: ",
        "isolation: quiesce: 33554432 of the retired domain's 33554432 bytes unmapped, bus master read back on after 0 quiesces",
        "isolation: stale epoch: the retired domain's memory unchanged",
        "isolation: failed reset: unclean true",
        "isolation: the next domain was refused the unclean device",
        "isolation: the reset succeeded at the attach after: unclean false",
        "bus master read back on after 0 of them, 0 unmaps incomplete",
        "isolation: PASS",
        "isolation: canary OVERWRITTEN",
        "isolation: control: the DMA reached the canary once it was mapped",
    ] {
        assert!(console.contains(line), "missing {line:?}:\n{console}");
    }
    // The IOMMU's own report of the blocked DMA, from the device, at the canary's address.
    let canary = console
        .lines()
        .find_map(|l| l.split("canary page at physical ").nth(1))
        .and_then(|l| l.split(',').next())
        .unwrap_or_else(|| panic!("no canary address:\n{console}"));
    let canary = u64::from_str_radix(canary.trim_start_matches("0x"), 16).unwrap();
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("rig-isolation: kernel: ")
                && l.contains("DMAR: [DMA Write")
                && l.contains("Request device [00:10.0]")
                && l.contains(&format!("fault addr {canary:#x}"))),
        "no IOMMU fault at the canary {canary:#x} in the kernel log:\n{console}"
    );
}

/// A VFIO device across a killed VMM and under a stock Linux client: ddvm holding the
/// controller by VFIO is killed with SIGKILL, after which bus mastering reads off in the
/// device's own configuration space and a new ddvm reopens the device and verifies I/O (a
/// second ddvm meanwhile is refused the device in use with one line); then a stock Debian
/// kernel's disk is served through the VFIO-backed driver domain while the domain is killed
/// three times, and the client sees no I/O error and verifies every byte.
#[test]
fn vfio_survives_a_killed_vmm_and_serves_a_stock_linux_client_through_kills_in_the_rig() {
    let files = linux_client_files(
        "linux-client-vfio",
        &[
            "images/linux-client/linux-client.toml",
            "images/linux-client/rig-test.sh",
            "images/vfio/rig-linux.sh",
        ],
    );
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    let (status, console) = rig_with(
        &[
            "--smp",
            "1",
            "--iommu",
            "--nvme",
            "serial=lin0,lba=4096,size=64",
            "--timeout",
            "900",
        ],
        &files,
        &["sh", "rig-linux.sh"],
    );
    assert_eq!(
        status, 0,
        "the VFIO Linux client failed in the rig:\n{console}"
    );
    let line = |prefix: &str| {
        console
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?}:\n{console}"))
            .to_string()
    };
    // Doorbells and registers are memory slots: the domain's VM exits far less than once
    // per request.
    let verify = line("rig-linux: held: ");
    let exits: f64 = verify
        .rsplit(", ")
        .next()
        .and_then(|l| l.strip_suffix(" exits/request"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exits per request: {verify}"));
    assert!(
        exits < 1.0,
        "{exits} exits per request through VFIO: {verify}"
    );
    let interrupts: u64 = line("rig-linux: device interrupts while held: ")
        .parse()
        .unwrap();
    assert!(
        interrupts > 0,
        "the driver asked for interrupts, and none came:\n{console}"
    );
    let held = u16::from_str_radix(&line("rig-linux: command register while held: "), 16).unwrap();
    assert_eq!(held & 4, 4, "the domain's driver had bus mastering on");
    let killed =
        u16::from_str_radix(&line("rig-linux: command register after SIGKILL: "), 16).unwrap();
    assert_eq!(
        killed & 4,
        0,
        "bus mastering left on after SIGKILL:\n{console}"
    );
    let second = line("rig-linux: a second ddvm while held: ");
    assert!(
        second.starts_with("status 1 ")
            && second.contains("is open in another process")
            && second.matches("open in another process").count() == 1,
        "a device in use: {second}"
    );
    let reopened = line("rig-linux: reopened after SIGKILL: ");
    assert!(
        reopened.starts_with("status 0 ") && reopened.contains(" 0 errors, 0 mismatches"),
        "reopened after SIGKILL: {reopened}"
    );
    assert!(console.contains("rig-linux: kind = \"vfio\""), "{console}");
    assert!(console.contains("rig-test: faults 3"), "{console}");
    assert_eq!(
        console
            .lines()
            .filter(|l| l.contains("domain nvme0: failed (operator: kill); recovering"))
            .count(),
        3,
        "{console}"
    );
    assert!(!console.contains("I/O error"), "{console}");
    let report = ddvm::client::LinuxReport::find(&console)
        .unwrap_or_else(|| panic!("no report from the Linux client:\n{console}"));
    assert!(report.clean(), "{report:?}\n{console}");
}

/// `scripts/rig peer`'s harness end to end, small: the same stock Linux client with Debian's
/// fio runs every standard job (with crc32c verification) under the four peers, ddvm through
/// a driver domain (a) and from a file (b), QEMU with virtio-blk on an iothread (c) and with
/// vhost-user-blk to qemu-storage-daemon (d); then the long verify job once without faults for
/// each, and for (a) and (d) while their backend is killed every second. Every report must
/// arrive whole and parse; no peer may see an error or a failed check without faults; ddvm
/// must come through its kills with none either. What (d) sees under kills is reported, not
/// asserted: it is the comparison's finding, not ddvm's behaviour.
#[test]
fn peers_run_fio_with_verification_side_by_side_and_ddvm_survives_the_kills() {
    use ddvm_peer_report::{Mode, PeerLog, Report};

    // `scripts/rig peer` itself with this build of ddvm, small. A whole rig that froze (its
    // clock stopped: QEMU's TCG, not anything it runs; see scripts/rig) leaves the run
    // unfinished at the rig's timeout; that gets one more try.
    let log_file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("peer.log");
    let run = || {
        // A log left by an earlier run must not pass for this one's.
        let _ = std::fs::remove_file(&log_file);
        let out = Command::new(repo().join("scripts/rig"))
            .args(["peer", "--no-report", "--timeout", "900", "--rounds", "1"])
            .args(["--kill-seconds", "10", "--disk-mib", "16", "--qd1-mib", "1"])
            .args(["--rand-mib", "2", "--ddvm"])
            .arg(ddvm_bin())
            .arg("--log")
            .arg(&log_file)
            .output()
            .expect("scripts/rig runs");
        let console = format!(
            "{}{}",
            std::fs::read_to_string(&log_file).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
        let log = PeerLog::parse(&console).unwrap_or_else(|e| panic!("{e}\n{console}"));
        (log, console)
    };
    let (mut log, mut console) = run();
    if !log.done && console.contains("timed out after") {
        eprintln!("the rig did not finish in time; once more:\n{console}");
        (log, console) = run();
    }
    assert!(log.done, "the run did not finish:\n{console}");
    for run in &log.runs {
        for job in &run.jobs {
            assert_eq!(
                job.json_error, None,
                "{} {:?}: {}'s report",
                run.peer, run.mode, job.file
            );
        }
    }
    let report = Report::new(log, "rig", "test");
    let md = report.markdown();
    let kill_run = |peer: &str, mode: Mode| {
        report
            .kills
            .iter()
            .find(|k| k.peer == peer && k.mode == mode)
            .unwrap_or_else(|| panic!("no {mode:?} run of the kill job for ({peer}):\n{md}"))
    };
    let jobs = [
        "seqwrite-128k-qd8",
        "randread-4k-qd1",
        "randread-4k-qd32",
        "randwrite-4k-qd32",
        "seqread-128k-qd8",
    ];
    for peer in ["a", "b", "c", "d"] {
        for job in jobs {
            let row = report
                .jobs
                .iter()
                .find(|r| r.peer == peer && r.job == job)
                .unwrap_or_else(|| panic!("no row for ({peer}) {job}:\n{md}"));
            assert_eq!(row.samples, 1, "({peer}) {job}:\n{md}");
            assert!(row.mib_s.median > 0.0, "({peer}) {job}:\n{md}");
            assert_eq!(
                (row.io_errors, row.verify_failures),
                (0, 0),
                "({peer}) {job}:\n{md}"
            );
        }
        let base = kill_run(peer, Mode::Base);
        assert_eq!(base.outcome, "completed", "{md}");
        assert_eq!((base.io_errors, base.verify_failures), (0, 0), "{md}");
    }
    let a = kill_run("a", Mode::Kill);
    assert!(a.kills >= 5, "{md}");
    assert_eq!(a.outcome, "completed", "{md}");
    assert_eq!((a.io_errors, a.verify_failures), (0, 0), "{md}");
    assert!(kill_run("d", Mode::Kill).kills >= 1, "{md}");
    println!("{md}");
}
