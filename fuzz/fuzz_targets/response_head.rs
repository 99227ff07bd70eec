//! `canary_http1::fuzzing::response_head`: see its docs for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    canary_http1::fuzzing::response_head(data);
});
