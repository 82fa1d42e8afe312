//! Fuzz target: arbitrary bytes as frames and segment streams into the TCP
//! layer (see `loupe_dataplane::session::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loupe_dataplane::session::fuzz::segments(data);
});
