#![no_main]
//! Fuzz target: see `ddvm_fuzz::e1000`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::e1000::run(data));
