#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ftvm_log::fuzz::log_stream(data);
});
