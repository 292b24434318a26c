//! The workload client guest against QEMU's own virtio-blk (virtio-mmio on the `microvm`
//! machine, TCG): a device model written by others checks our client, as tests/qemu.rs does
//! for the driver domain. The client finds the device from Linux-style `virtio_mmio.device=`
//! tokens, runs a verified workload and reports one `ddvm-workload:` JSON line; in hostile
//! mode it submits one malformed request and reports what the device did.
//!
//! The client's block format (`pattern.rs`) is compiled in here too, to decode what the client
//! left on the disk image and to check its verdicts on blocks damaged on purpose.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

#[allow(dead_code)]
#[path = "../guest-kernel/workload/src/pattern.rs"]
mod pattern;

use pattern::{Corruption, Stamp, Verdict};

use common::qemu;
/// microvm's virtio-mmio transports: 24 windows of 512 bytes from 0xfeb00000.
const MMIO_BASE: u64 = 0xfeb0_0000;
const MMIO_SLOTS: u64 = 24;
const MMIO_SIZE: u64 = 512;

/// Every microvm virtio-mmio window as a command-line token; the client takes the first one
/// holding a block device.
fn device_tokens() -> String {
    (0..MMIO_SLOTS)
        .map(|i| format!("virtio_mmio.device=512@{:#x}", MMIO_BASE + i * MMIO_SIZE))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A sparse raw disk image of `mib` MiB in a scratch directory of its own (removed when
/// dropped).
fn disk(test: &str, mib: u64) -> (PathBuf, common::Scratch) {
    let dir = common::scratch(test);
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(mib << 20))
        .expect("disk image");
    (path, dir)
}

/// Boots the workload client under QEMU microvm with `disk` as a virtio-blk-device (extra
/// device properties in `props`) and `append` after the device tokens. Returns (exit code,
/// output).
fn boot_client(disk: &Path, props: &str, append: &str) -> (Option<i32>, String) {
    let drive = format!("id=d0,file={},format=raw,if=none", disk.display());
    let device = format!("virtio-blk-device,drive=d0,serial=ddvm-client-test{props}");
    let append = format!("{} {append}", device_tokens());
    qemu(
        "microvm,x-option-roms=off,rtc=off",
        &[
            "-global",
            "virtio-mmio.force-legacy=false",
            "-drive",
            &drive,
            "-device",
            &device,
            "-kernel",
            ddvm_images::workload_client_path(),
            "-append",
            &append,
        ],
    )
}

/// QEMU's exit code for guest exit status `status` (isa-debug-exit: `(status << 1) | 1`).
fn exit_code(status: i32) -> Option<i32> {
    Some((status << 1) | 1)
}

/// The JSON object after `prefix` on the only line that starts with it.
fn json_line(out: &str, prefix: &str) -> Value {
    let lines: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter(|l| l.starts_with('{'))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one {prefix:?} JSON line expected; output:\n{out}"
    );
    serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("{prefix:?} line is not JSON ({e}): {}", lines[0]))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("report key {key:?} is not a number: {v}"))
}

/// The keys of the report line, in order.
const REPORT_KEYS: &[&str] = &[
    "id",
    "workload",
    "bs",
    "qd",
    "ops",
    "reads",
    "writes",
    "flushes",
    "bytes",
    "elapsed_us",
    "iops",
    "mib_s",
    "lat_us",
    "errors",
    "mismatches",
    "lost",
    "misplaced",
    "corrupt",
    "unverified",
    "verified",
    "first_error",
];

/// Checks a clean report: all keys, no errors, no mismatches.
fn assert_clean(report: &Value, out: &str) {
    let keys: Vec<&str> = report
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = REPORT_KEYS.to_vec();
    expected.sort_unstable();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected, "report keys; output:\n{out}");
    for key in ["errors", "mismatches", "lost", "misplaced", "corrupt"] {
        assert_eq!(num(report, key), 0, "{key}; output:\n{out}");
    }
    assert!(report["first_error"].is_null(), "output:\n{out}");
    for key in ["p50", "p90", "p99", "max"] {
        assert!(report["lat_us"][key].is_u64(), "lat_us.{key}: {report}");
    }
}

#[test]
fn workload_client_verifies_every_block_on_qemus_virtio_blk() {
    let (disk, _dir) = disk("client-randrw", 32);
    let (code, out) = boot_client(
        &disk,
        "",
        "workload=randrw rwmix=60 count=3000 qd=32 span=8M seed=7 id=3 flush_every=200",
    );
    assert!(
        out.contains("device id \"ddvm-client-test\""),
        "GET_ID must return QEMU's serial; output:\n{out}"
    );
    let report = json_line(&out, "ddvm-workload: ");
    assert_clean(&report, &out);
    assert_eq!(report["workload"], "randrw");
    assert_eq!(num(&report, "id"), 3);
    assert_eq!(num(&report, "qd"), 32);
    assert_eq!(num(&report, "ops"), 3000, "output:\n{out}");
    assert_eq!(
        num(&report, "reads") + num(&report, "writes"),
        3000,
        "output:\n{out}"
    );
    assert_eq!(
        num(&report, "bytes"),
        3000 * 4096,
        "every request is one block"
    );
    assert!(
        num(&report, "flushes") >= 2,
        "flush_every and the final flush: {report}"
    );
    // Prefill wrote every block, so every read was checked: the timed phase's reads, the
    // WRITE_ZEROES read-backs and the verify pass over all 2048 blocks.
    assert_eq!(num(&report, "unverified"), 0, "output:\n{out}");
    assert!(
        num(&report, "verified") >= num(&report, "reads") + 2048,
        "output:\n{out}"
    );
    assert_eq!(code, exit_code(0), "output:\n{out}");

    // What the device stored is what the client meant: every block of the span holds this
    // run's well-formed block for its own number, and nothing beyond the span was written.
    let image = std::fs::read(&disk).unwrap();
    let run = pattern::header(&image[..4096])
        .expect("block 0 has a header")
        .run;
    for (block, data) in image.chunks_exact(4096).enumerate() {
        let block = block as u64;
        if block >= 2048 {
            assert!(
                data.iter().all(|&b| b == 0),
                "block {block} beyond the span"
            );
            continue;
        }
        let stamp = pattern::header(data)
            .unwrap_or_else(|| panic!("block {block} has no header; output:\n{out}"));
        assert_eq!((stamp.id, stamp.run, stamp.block), (3, run, block));
        assert!(stamp.gen >= 1);
        assert_eq!(pattern::check(data, &stamp), Verdict::Ok, "block {block}");
    }
}

#[test]
fn workload_client_without_indirect_or_event_idx_caps_its_depth_and_verifies() {
    // 512-byte blocks at depth 128 on a device without indirect descriptors: 3 descriptors
    // per request in a 256-entry queue hold 85 requests; notifications go through the ring
    // flags instead of the event indices.
    let (disk, _dir) = disk("client-seqwrite", 16);
    let (code, out) = boot_client(
        &disk,
        ",indirect_desc=off,event_idx=off",
        "workload=seqwrite bs=512 qd=128 count=2000 span=1M",
    );
    assert!(out.contains("qd 128 reduced to 85"), "output:\n{out}");
    let report = json_line(&out, "ddvm-workload: ");
    assert_clean(&report, &out);
    assert_eq!(num(&report, "qd"), 85);
    assert_eq!(num(&report, "writes"), 2000);
    assert_eq!(num(&report, "reads"), 0);
    // No prefill (the workload does not read): the verify pass checks the 2000 blocks
    // written, every one of them acknowledged.
    assert_eq!(
        num(&report, "verified"),
        2000 + 2,
        "plus the 2 zeroed blocks"
    );
    assert_eq!(code, exit_code(0), "output:\n{out}");
}

#[test]
fn hostile_read_past_the_end_gets_ioerr_and_the_device_still_works() {
    let (disk, _dir) = disk("hostile-range", 16);
    let (code, out) = boot_client(&disk, "", "hostile=sector-out-of-range");
    let line = json_line(&out, "ddvm-hostile: ");
    assert_eq!(line["case"], "sector-out-of-range", "output:\n{out}");
    assert_eq!(line["outcome"], "status", "output:\n{out}");
    assert_eq!(line["status"], 1, "VIRTIO_BLK_S_IOERR; output:\n{out}");
    assert_eq!(line["after_reset_ok"], true, "output:\n{out}");
    assert_eq!(code, exit_code(0), "output:\n{out}");
}

#[test]
fn hostile_descriptor_loop_makes_qemu_ask_for_a_reset() {
    let (disk, _dir) = disk("hostile-loop", 16);
    let (code, out) = boot_client(&disk, "", "hostile=desc-loop");
    let line = json_line(&out, "ddvm-hostile: ");
    assert_eq!(line["outcome"], "needs-reset", "output:\n{out}");
    assert!(line["status"].is_null(), "output:\n{out}");
    assert_eq!(line["after_reset_ok"], true, "output:\n{out}");
    assert_eq!(code, exit_code(0), "output:\n{out}");
}

#[test]
fn bad_command_line_names_the_key_and_exits_1() {
    let (disk, _dir) = disk("client-badarg", 16);
    let (code, out) = boot_client(&disk, "", "bs=1000");
    assert!(
        out.contains("bad command line: bs=1000: expected a multiple of 512"),
        "output:\n{out}"
    );
    assert!(!out.contains("ddvm-workload: {"), "no report: {out}");
    assert_eq!(code, exit_code(1), "output:\n{out}");
}

/// A block as the client writes it.
fn block(bs: usize, stamp: &Stamp) -> Vec<u8> {
    let mut data = vec![0; bs];
    pattern::fill(&mut data, stamp);
    data
}

#[test]
fn block_format_tells_every_kind_of_mismatch_apart() {
    let s = Stamp {
        id: 3,
        run: 0x1234_5678_9abc_def0,
        block: 17,
        gen: 5,
    };
    for bs in [512, 4096, 65536] {
        let good = block(bs, &s);
        assert_eq!(pattern::header(&good), Some(s));
        assert_eq!(pattern::check(&good, &s), Verdict::Ok);
        // An older generation, or a block of an earlier run: an acknowledged write was lost.
        let old = block(bs, &Stamp { gen: 4, ..s });
        assert_eq!(
            pattern::check(&old, &s),
            Verdict::Lost {
                gen: 4,
                earlier_run: false
            }
        );
        let earlier = block(bs, &Stamp { run: 1, ..s });
        assert_eq!(
            pattern::check(&earlier, &s),
            Verdict::Lost {
                gen: 5,
                earlier_run: true
            }
        );
        // Another block's or another client's data.
        let elsewhere = block(bs, &Stamp { block: 18, ..s });
        assert_eq!(
            pattern::check(&elsewhere, &s),
            Verdict::Misplaced { id: 3, block: 18 }
        );
        let other = block(bs, &Stamp { id: 4, ..s });
        assert_eq!(
            pattern::check(&other, &s),
            Verdict::Misplaced { id: 4, block: 17 }
        );
        // One flipped bit anywhere in the header or the payload, or a generation never written.
        for at in [0, 9, 20, 30, 41, pattern::HEADER, bs / 2, bs - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let verdict = pattern::check(&bad, &s);
            assert!(
                matches!(verdict, Verdict::Corrupt(_) | Verdict::Unwritten),
                "bit flip at {at} (bs {bs}): {verdict:?}"
            );
        }
        let future = block(bs, &Stamp { gen: 6, ..s });
        assert_eq!(
            pattern::check(&future, &s),
            Verdict::Corrupt(Corruption::Future(6))
        );
        // No header at all.
        assert_eq!(pattern::check(&vec![0; bs], &s), Verdict::Unwritten);
    }
}
