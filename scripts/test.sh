#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the end-to-end tests in tests/it, the doc
# examples, and the gold check against an independent engine (Python + DuckDB, see
# benches/reference/). Builds the `medallion` binary first: the end-to-end tests run it as a
# user would. Starts an S3 server and DynamoDB Local on loopback for the tests of the lake on
# S3 (scripts/services.sh) and stops them at the end. One target directory is shared by all of it (2 cores compile this stack
# slowly); set CARGO_TARGET_DIR to reuse a warm one.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medallion/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo build --locked --bin medallion --bin s3-test-server
source scripts/services.sh
cargo test --locked --workspace --no-fail-fast -- --include-ignored

# The reference engine lives in a cached virtual environment, made when missing.
venv="${MEDALLION_BENCH_VENV:-$HOME/.cache/medallion/bench-venv}"
if ! "$venv/bin/python" -c "import duckdb" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "duckdb==2.0.0"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"; stop_services' EXIT
echo "gold check: 3 batches landed one at a time, medallion vs. Python + DuckDB"
if "$venv/bin/python" benches/reference/check_gold.py --medallion "$CARGO_TARGET_DIR/debug/medallion" \
        --scale 0.02 --batches 3 --seed 11 --work "$work/check"; then
    echo "gold-check: 1 passed, 0 failed"
else
    echo "gold-check: 0 passed, 1 failed"
    exit 1
fi
