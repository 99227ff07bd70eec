//! Replays the committed fuzz corpus of the config target (`fuzz/corpus/config/`): the
//! loader answers every input, a config or diagnostics, without a panic.

use std::path::Path;

#[test]
fn the_config_fuzz_corpus_is_answered_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Ok(text) = std::str::from_utf8(&data) {
            let r = std::panic::catch_unwind(|| canary_config::parse("fuzz.yaml", text).is_ok());
            assert!(r.is_ok(), "{} panics the loader", path.display());
        }
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}
