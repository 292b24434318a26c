#![no_main]
//! Fuzz target: see `ddvm_fuzz::desc_chain`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::desc_chain::run(data));
