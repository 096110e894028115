#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ftvm_pair::fuzz::pair_wire(data);
});
