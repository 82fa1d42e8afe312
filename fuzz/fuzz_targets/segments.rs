//! Fuzz target: arbitrary bytes decoded into a split connection's life,
//! with relay integrity checked (see `loupe_dataplane::session::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loupe_dataplane::session::fuzz::segments(data);
});
