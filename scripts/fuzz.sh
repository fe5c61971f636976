#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser (docs/RELIABILITY.md), with cargo fuzz (nightly).
#   scripts/fuzz.sh [RUNS] [TARGET...]   RUNS executions per target (default 1000000)
#   FUZZ_SECONDS=1800 scripts/fuzz.sh ... also stops each target after that many seconds
# Each target starts from its committed corpus (tests/fixtures/fuzz/<target>), explores in
# fuzz/corpus/<target>, and the minimized result is written back to the committed corpus.
# Limits per input: 10 s, 2048 MB RSS and 2048 MB for any single allocation. One line per
# target: executions, crashes, coverage (edges), features, corpus files. Needs the models in
# the cache (`detoxfuse fetch`) and `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1000000}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(jsonl_line openai_request tokenizers cross_text model_dir gguf gguf_structured)
(cd fuzz && cargo +nightly fuzz build -O)
mkdir -p fuzz/logs
printf '| target | executions | crashes | edges (cov) | features | corpus (minimized) | seconds |\n|---|---|---|---|---|---|---|\n'
for t in "${targets[@]}"; do
  work=fuzz/corpus/$t
  mkdir -p "$work" "tests/fixtures/fuzz/$t" fuzz/artifacts/$t
  cp "tests/fixtures/fuzz/$t"/* "$work"/ 2>/dev/null || true
  t0=$(date +%s)
  set +e
  (cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
     -runs="$runs" -max_total_time="${FUZZ_SECONDS:-0}" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 -max_len=4096 \
     -print_final_stats=1 -artifact_prefix="artifacts/$t/") > "fuzz/logs/$t.log" 2>&1
  rc=$?
  set -e
  secs=$(( $(date +%s) - t0 ))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/logs/$t.log" | grep -o '[0-9]*$' | tail -1 || true)
  last=$(grep -E '^#[0-9]+' "fuzz/logs/$t.log" | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  crashes=$(ls fuzz/artifacts/$t 2>/dev/null | wc -l)
  if [ $rc -eq 0 ]; then
    # minimize into the committed corpus (crash-* regression inputs stay)
    keep=$(mktemp -d)
    cp tests/fixtures/fuzz/$t/crash-* "$keep"/ 2>/dev/null || true
    (cd fuzz && cargo +nightly fuzz cmin -O "$t" "corpus/$t" -- -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10) >> "fuzz/logs/$t.log" 2>&1 || true
    if [ -n "$(ls fuzz/corpus/$t)" ]; then
      rm -f tests/fixtures/fuzz/$t/*
      cp fuzz/corpus/$t/* tests/fixtures/fuzz/$t/
      cp "$keep"/* tests/fixtures/fuzz/$t/ 2>/dev/null || true
    fi
    rm -rf "$keep"
  fi
  n=$(ls tests/fixtures/fuzz/$t | wc -l)
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$t" "${execs:-?}" "$crashes" "${cov:-?}" "${ft:-?}" "$n" "$secs"
done
