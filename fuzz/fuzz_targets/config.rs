#![no_main]
//! Fuzz target: see `ddvm_fuzz::config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::config::run(data));
