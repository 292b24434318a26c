#![no_main]
//! Fuzz target: see `ddvm_fuzz::log_panic`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::log_panic::run(data));
