//! `canary_http1::fuzzing::request_head`: see its docs for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    canary_http1::fuzzing::request_head(data);
});
