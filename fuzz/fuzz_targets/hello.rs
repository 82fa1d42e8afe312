//! Fuzz target: arbitrary first bytes into the decision point's ClientHello
//! parser (see `loupe_dataplane::tls::fuzz::hello`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loupe_dataplane::tls::fuzz::hello(data);
});
