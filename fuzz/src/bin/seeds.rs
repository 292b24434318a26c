//! Writes the seed corpora: `seeds [TARGET...]` (default: every target) replaces the files
//! named `seed-*` in `corpus/<target>/` with the target's seeds, after running each through
//! the target once (a seed must pass its target's checks). Other files there, inputs the
//! fuzzer found and crashes kept as regressions, are left alone.

use std::path::Path;

// Built with the fuzz targets' coverage flags, the binary needs libFuzzer's coverage callbacks.
extern crate libfuzzer_sys;

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for &(name, run, seeds) in ddvm_fuzz::TARGETS {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for entry in std::fs::read_dir(&dir).expect("corpus directory").flatten() {
            if entry.file_name().to_string_lossy().starts_with("seed-") {
                std::fs::remove_file(entry.path()).expect("old seed");
            }
        }
        let seeds = seeds();
        for (seed, bytes) in &seeds {
            run(bytes);
            std::fs::write(dir.join(format!("seed-{seed}")), bytes).expect("seed file");
        }
        println!("{name}: {} seeds", seeds.len());
    }
}
