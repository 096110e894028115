#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ftvm_contract::fuzz::control_request(data);
});
