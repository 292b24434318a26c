#![no_main]
//! Fuzz target: see `ddvm_fuzz::bzimage`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::bzimage::run(data));
