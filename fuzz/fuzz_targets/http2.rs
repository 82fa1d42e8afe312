//! Fuzz target: arbitrary plaintext both ways into the HTTP/2 inspector
//! (see `loupe_dataplane::inspect::http2::fuzz`): frames, HPACK blocks,
//! CONTINUATION floods, table size updates.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loupe_dataplane::inspect::http2::fuzz(data);
});
