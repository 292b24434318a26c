#![no_main]
//! Fuzz target: see `ddvm_fuzz::virtio_mmio`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::virtio_mmio::run(data));
