//! Fuzz target: arbitrary bytes as frames and segment streams into the TCP
//! layer (see `loupe_dataplane::tcp::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loupe_dataplane::tcp::fuzz::segments(data);
});
