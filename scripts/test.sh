#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the end-to-end tests in tests/it, and the
# doc examples. Builds the `medallion` binary first: the end-to-end tests run it as a user
# would. One target directory is shared by all of it (2 cores compile this stack slowly);
# set CARGO_TARGET_DIR to reuse a warm one.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medallion/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo build --locked --bin medallion
cargo test --locked --workspace --no-fail-fast -- --include-ignored
