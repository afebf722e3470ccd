#!/usr/bin/env bash
# Build vna-core's fuzz targets with libFuzzer's coverage instrumentation and run each for a
# bounded time from its seeds (seeds.py) and the corpus kept from earlier runs.
#
# Usage: run.sh SECONDS [TARGET...]   (no TARGET: every fuzz_targets/*.rs)
#
# The build is what `cargo fuzz build -s none` does (SanitizerCoverage with inline 8-bit
# counters, a PC table and comparison tracing, `--cfg fuzzing`, debug assertions, one codegen
# unit, release with debug info) done by cargo itself: no cargo-fuzz to install, and no
# sanitizer, so a stable toolchain builds it (FUZZ_TOOLCHAIN=nightly, or any rustup name,
# picks another). The targets bound every single allocation themselves (src/lib.rs).
#
# Exit status: 0 when every target ran SECONDS without a crash; 1 on a crash (a panic, an
# input running over FUZZ_TIMEOUT seconds, an allocation over its bound, RSS over
# FUZZ_RSS_MB), whose input is kept in artifacts/TARGET/ with the command that replays it;
# 2 on a usage or build error.
set -euo pipefail

usage() { echo "usage: run.sh SECONDS [TARGET...]" >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
seconds=$1
shift

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
timeout=${FUZZ_TIMEOUT:-30}
rss_mb=${FUZZ_RSS_MB:-2048}
target_dir=${FUZZ_TARGET_DIR:-$here/target/libfuzzer}
corpus=${FUZZ_CORPUS:-$here/corpus}
cargo=(cargo)
rustc=(rustc)
if [[ -n ${FUZZ_TOOLCHAIN:-} ]]; then
  cargo+=("+$FUZZ_TOOLCHAIN")
  rustc+=("+$FUZZ_TOOLCHAIN")
fi

if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  targets=()
  for f in fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
for t in "${targets[@]}"; do
  [[ -f fuzz_targets/$t.rs ]] || { echo "fuzz: no target $t (fuzz_targets/$t.rs)" >&2; exit 2; }
done

triple=$("${rustc[@]}" -vV | sed -n 's/^host: //p')
[[ -n $triple ]] || { echo "fuzz: no Rust toolchain (${rustc[*]} -vV failed)" >&2; exit 2; }
flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  --cfg fuzzing
  -Clink-dead-code
  -Cdebug-assertions
  -Ccodegen-units=1
)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
echo "fuzz: building ${#targets[@]} target(s) with $("${cargo[@]}" --version) for $triple"
# --target keeps RUSTFLAGS off the build scripts (libfuzzer-sys compiles libFuzzer with cc)
if ! RUSTFLAGS="${flags[*]}${RUSTFLAGS:+ $RUSTFLAGS}" CARGO_TARGET_DIR=$target_dir \
    "${cargo[@]}" build --locked --release --config profile.release.debug=true \
    --target "$triple" "${bins[@]}"; then
  echo "fuzz: the build failed" >&2
  exit 2
fi
out=$target_dir/$triple/release

python3 seeds.py "$corpus"
failed=()
for t in "${targets[@]}"; do
  mkdir -p "artifacts/$t" "$corpus/$t"
  log=artifacts/$t.log
  echo "fuzz: $t for $seconds s"
  if "$out/$t" -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb="$rss_mb" \
      -artifact_prefix="$here/artifacts/$t/" -print_final_stats=1 "$corpus/$t" >"$log" 2>&1; then
    grep -E '^(Done [0-9]+ runs|stat::number_of_executed_units|#[0-9]+[[:space:]]+DONE)' "$log" || true
  else
    tail -n 40 "$log"
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    echo "fuzz: $t FAILED; replay: $out/$t ${crash:-<input from artifacts/$t/>}"
    failed+=("$t")
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz: ${#failed[@]} target(s) crashed: ${failed[*]}"
  exit 1
fi
echo "fuzz: every target ran $seconds s without a crash"
