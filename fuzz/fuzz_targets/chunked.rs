//! `canary_http1::fuzzing::chunked`: see its docs for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    canary_http1::fuzzing::chunked(data);
});
