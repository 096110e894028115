#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ftd::fuzz::grpc_request(data);
});
