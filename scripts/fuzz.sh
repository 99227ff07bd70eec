#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 60) with
# cargo-fuzz (libFuzzer, AddressSanitizer) on the stable toolchain: cargo-fuzz passes
# `-Z` flags, which stable accepts with RUSTC_BOOTSTRAP=1. Not part of the test command
# (`cargo test` replays the committed corpora instead). New inputs go to a scratch
# corpus (target/fuzz-corpus/<target>) seeded from fuzz/corpus/<target>; copy the ones
# worth keeping (`cargo fuzz cmin` first) into fuzz/corpus and commit them. A crash is
# saved under fuzz/artifacts/<target>/ and ends the script with a failure.
#
#   scripts/fuzz.sh 60        # every target, 60 s each
#   FUZZ_TARGETS="chunked" scripts/fuzz.sh 600
set -euo pipefail

SECONDS_EACH="${1:-60}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
TARGETS="${FUZZ_TARGETS:-request_head response_head chunked config}"

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
cd "$HERE/fuzz"
status=0
for t in $TARGETS; do
    dict=http.dict
    [[ "$t" == config ]] && dict=config.dict
    # The chunked target feeds its input byte by byte among other splits (quadratic in
    # a long chunk-size line): shorter inputs keep it fast; the 4 KiB line limit is
    # reached through the committed seeds, which libFuzzer does not cut.
    max_len=4096
    [[ "$t" == chunked ]] && max_len=1024
    work="$HERE/fuzz/target/fuzz-corpus/$t"
    mkdir -p "$work"
    echo "==> $t for ${SECONDS_EACH}s"
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "$work" "corpus/$t" -- \
        -dict="$dict" -max_total_time="$SECONDS_EACH" -timeout=5 -rss_limit_mb=2048 -max_len="$max_len" \
        -print_final_stats=1 2>&1 | tee "$work.log" | grep -E '^(#[0-9]+.*(DONE|pulse)|==|SUMMARY|stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added)'; then
        :
    fi
    if grep -qE 'ERROR: libFuzzer|SUMMARY: AddressSanitizer|panicked' "$work.log"; then
        echo "!! $t: a crash; see $work.log and fuzz/artifacts/$t/"
        status=1
    fi
done
exit $status
