#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_tests::fuzz::moderation_scan(data));
