#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| redirect_user::fuzz::zds_request(data));
