#![no_main]
//! Fuzz target: see `ddvm_fuzz::blk_intake`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::blk_intake::run(data));
