#![no_main]
//! Fuzz target: see `ddvm_fuzz::nvme`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::nvme::run(data));
