//! Config parsing: a topology file's text through `Config::parse`, which deserialises and
//! validates it.
//!
//! Input: the file's text (bytes, made UTF-8).
//!
//! Checked: parsing is deterministic; a refusal names the file; an accepted topology keeps
//! what validation promises to the code after it: unique, well-formed domain and client
//! names, memory sizes in range, and a channel that fits its domain's memory.

use std::path::Path;

use ddvm::config::Config;

use crate::Seed;

/// Runs one input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let file = Path::new("/fuzz/topology.toml");
    let first = Config::parse(file, &text);
    let second = Config::parse(file, &text);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("parsing the same text twice disagreed"),
    }
    match first {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("topology.toml"),
                "refusal without the file: {msg}"
            );
        }
        Ok(c) => {
            for (i, d) in c.domains.iter().enumerate() {
                assert!(!d.name.is_empty());
                assert!(c.domains[..i].iter().all(|o| o.name != d.name));
                assert!((4..=4096).contains(&d.memory_mib) && d.memory_mib % 2 == 0);
                assert!(d.channel_kib > 0 && d.channel_kib * 2 <= d.memory_mib * 1024);
            }
            for (i, cl) in c.clients.iter().enumerate() {
                assert!(!cl.name.is_empty());
                assert!(c.clients[..i].iter().all(|o| o.name != cl.name));
            }
        }
    }
}

/// Seeds: the topologies in `configs/`, and one with every section.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for path in files {
        if path.extension().is_some_and(|e| e == "toml") {
            if let Ok(text) = std::fs::read(&path) {
                let name = path.file_stem().unwrap_or_default().to_string_lossy();
                out.push((name.into_owned(), Seed::new().bytes(&text).finish()));
            }
        }
    }
    out
}
