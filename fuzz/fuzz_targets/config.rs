//! The config loader on arbitrary text: it answers (a config or diagnostics) and never
//! panics. The same check runs on the corpus in `crates/config/tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = canary_config::parse("fuzz.yaml", text);
    }
});
