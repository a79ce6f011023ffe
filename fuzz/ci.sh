#!/usr/bin/env bash
# Bounded fuzz run for CI (called by scripts/test; see fuzz/README.md).
#
# Installs what it needs (the nightly toolchain only when missing,
# cargo-fuzz), builds every target once, then runs each for its share of
# the fuzzing time, two at a time on a machine with two or more CPUs. The
# fuzzing time is TIDELOG_FUZZ_SECONDS (default 300) in all, cut so that
# set-up + build + fuzzing stay within TIDELOG_FUZZ_BUDGET_SECONDS (default
# 570) but not below 120 s (unless TIDELOG_FUZZ_SECONDS asks for less): on
# a busy or slow machine the run fuzzes less rather than pushing CI past its
# time limit. Exits non-zero if any target finds a crash, an OOM
# (-malloc_limit_mb: one allocation over 512 MiB, -rss_limit_mb: 2 GiB in
# all), a leak or a timeout; the failing input is printed as base64 with
# the command that reproduces it, so a CI log is enough to replay it.
#
# Each target's working corpus is fuzz/corpus/<target> (not committed;
# it grows run after run locally) on top of the committed seeds in
# fuzz/seeds/<target>.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
FUZZ="$(pwd)"
FUZZ_SECONDS_MAX="${TIDELOG_FUZZ_SECONDS:-300}"
BUDGET_SECONDS="${TIDELOG_FUZZ_BUDGET_SECONDS:-570}"
FUZZ_SECONDS_MIN=120
TARGETS=(request_header request record_batch storage_files metadata_log request_sequence)
LIBFUZZER_FLAGS=(-rss_limit_mb=2048 -malloc_limit_mb=512 -max_len=65536 -timeout=20 -print_final_stats=1)
# Extra libFuzzer flags for local runs, e.g. TIDELOG_FUZZ_FLAGS="-only_ascii=1".
read -r -a EXTRA_FLAGS <<<"${TIDELOG_FUZZ_FLAGS:-}"
started=$SECONDS

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: installing the nightly toolchain (cargo-fuzz needs -Zsanitizer)"
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "fuzz: building ${#TARGETS[@]} targets"
cargo +nightly fuzz build
build_seconds=$((SECONDS - started))
TOTAL_SECONDS=$((BUDGET_SECONDS - build_seconds))
[ "$TOTAL_SECONDS" -ge "$FUZZ_SECONDS_MIN" ] || TOTAL_SECONDS="$FUZZ_SECONDS_MIN"
[ "$TOTAL_SECONDS" -le "$FUZZ_SECONDS_MAX" ] || TOTAL_SECONDS="$FUZZ_SECONDS_MAX"
echo "fuzz: set-up and build took ${build_seconds}s; fuzzing ${TOTAL_SECONDS}s in all"

triple="$(rustc +nightly -vV | sed -n 's/^host: //p')"
BIN="${CARGO_TARGET_DIR:-$FUZZ/target}/$triple/release"

jobs=1
if [ "$(nproc)" -ge 2 ]; then
    jobs=2
fi
per_target=$((TOTAL_SECONDS * jobs / ${#TARGETS[@]}))
[ "$per_target" -ge 10 ] || per_target=10
LOGS="$(mktemp -d /var/tmp/tidelog-fuzz-logs.XXXXXX)"
trap 'rm -rf "$LOGS"' EXIT

seeds_for() {
    case "$1" in
        request_header) echo "$FUZZ/seeds/request" ;;
        *) echo "$FUZZ/seeds/$1" ;;
    esac
}

run_target() {
    local t="$1"
    local corpus="$FUZZ/corpus/$t" artifacts="$FUZZ/artifacts/$t"
    local seeds
    seeds="$(seeds_for "$t")"
    mkdir -p "$corpus" "$artifacts" "$seeds"
    # A fresh artifacts dir per run: what is in it afterwards is this run's finding.
    find "$artifacts" -maxdepth 1 -type f -delete
    "$BIN/$t" "${LIBFUZZER_FLAGS[@]}" ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"} -max_total_time="$per_target" -artifact_prefix="$artifacts/" \
        "$corpus" "$seeds" >"$LOGS/$t.log" 2>&1
}

report() {
    local t="$1" status="$2"
    local artifacts="$FUZZ/artifacts/$t"
    local runs
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$LOGS/$t.log" | grep -o '[0-9]*$' || true)"
    if [ "$status" -eq 0 ] && [ -z "$(ls -A "$artifacts")" ]; then
        echo "fuzz: $t: ok (${runs:-?} runs in ${per_target}s, corpus $(ls "$FUZZ/corpus/$t" | wc -l) files)"
        return 0
    fi
    echo "fuzz: $t: FAILED (exit $status)" >&2
    echo "----- $t: libFuzzer output (last 60 lines) -----" >&2
    tail -n 60 "$LOGS/$t.log" >&2
    for f in "$artifacts"/*; do
        [ -f "$f" ] || continue
        echo "----- $t: failing input $(basename "$f") ($(stat -c %s "$f") bytes), base64 -----" >&2
        base64 -w 76 "$f" >&2
        echo "----- reproduce: base64 -d > input <<'EOF' (the lines above) EOF; then" >&2
        echo "      cd fuzz && cargo +nightly fuzz run $t input" >&2
    done
    return 1
}

echo "fuzz: running each target for ${per_target}s, $jobs at a time"
failed=0
i=0
while [ "$i" -lt "${#TARGETS[@]}" ]; do
    batch=("${TARGETS[@]:i:jobs}")
    pids=()
    for t in "${batch[@]}"; do
        run_target "$t" &
        pids+=($!)
    done
    for k in "${!batch[@]}"; do
        status=0
        wait "${pids[$k]}" || status=$?
        report "${batch[$k]}" "$status" || failed=1
    done
    i=$((i + jobs))
done
echo "fuzz: done in $((SECONDS - started))s (set-up and build ${build_seconds}s)"
exit "$failed"
