#![no_main]
//! Fuzz target: see `ddvm_fuzz::control`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::control::run(data));
