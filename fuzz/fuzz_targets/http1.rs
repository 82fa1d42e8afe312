//! Fuzz target: arbitrary plaintext both ways into the HTTP/1.1 inspector
//! (see `loupe_dataplane::inspect::http1::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loupe_dataplane::inspect::http1::fuzz(data);
});
