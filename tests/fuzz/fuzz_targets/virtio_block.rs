#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ftvm_machine::fuzz::virtio_driver(ftvm_machine::fuzz::Device::Block, data);
});
