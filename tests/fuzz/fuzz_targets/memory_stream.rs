#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ftvm_machine::fuzz::memory_stream(data);
});
