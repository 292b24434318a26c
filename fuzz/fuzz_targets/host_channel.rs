#![no_main]
//! Fuzz target: see `ddvm_fuzz::host_channel`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::host_channel::run(data));
