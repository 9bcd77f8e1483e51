#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| redirect_user::fuzz::control_request(data));
