#![no_main]
//! Fuzz target: see `ddvm_fuzz::elf`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::elf::run(data));
