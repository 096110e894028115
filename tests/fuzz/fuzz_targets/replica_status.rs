#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ftvm_contract::fuzz::replica_status(data);
});
