//! Every example topology in configs/ parses and runs.

mod common;

use common::*;

#[test]
fn every_example_config_runs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        n += 1;
        // Domain-only topologies run for the duration; client topologies until their clients
        // finish (the duration is then a limit).
        let clients = std::fs::read_to_string(&path)
            .unwrap()
            .contains("[[client]]");
        let duration = if clients { "60" } else { "0.3" };
        let out = ddvm(&["run", path.to_str().unwrap(), "--duration", duration]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stdout}{stderr}", path.display());
        assert!(stdout.contains("ready in"), "{}: {stdout}", path.display());
    }
    assert!(n > 0, "no configs found in {}", dir.display());
}
