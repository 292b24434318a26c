#![no_main]
//! Fuzz target: see `ddvm_fuzz::virtio_net`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ddvm_fuzz::virtio_net::run(data));
