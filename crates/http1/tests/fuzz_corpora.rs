//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same checks
//! the fuzz targets run (`canary_http1::fuzzing`), on the stable toolchain and without
//! libFuzzer: every seed, and every input a fuzzing run found worth keeping, stays a
//! test.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: {} fails", path.display());
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}

#[test]
fn the_request_head_corpus_passes() {
    replay("request_head", canary_http1::fuzzing::request_head);
}

#[test]
fn the_response_head_corpus_passes() {
    replay("response_head", canary_http1::fuzzing::response_head);
}

#[test]
fn the_chunked_corpus_passes() {
    replay("chunked", canary_http1::fuzzing::chunked);
}
