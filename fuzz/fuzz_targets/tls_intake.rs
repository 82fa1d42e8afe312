//! Fuzz target: hostile bytes from either side into a decrypted
//! connection (see `loupe_dataplane::tls::fuzz::intake`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loupe_dataplane::tls::fuzz::intake(data);
});
