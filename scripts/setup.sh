#!/usr/bin/env bash
# Sets up .venv with everything nanochat needs, offline-friendly: torch's CPU pin first (a plain
# `torch` would pull the multi-GB CUDA build), then the editable install, which builds the Rust
# tokenizer (rustbpe/, std only) with the local cargo.   Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${NANOCHAT_TORCH:-torch==2.13.0}

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (e.g. apt-get install cargo) to build the tokenizer" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_PIN"
.venv/bin/python -m pip install -q "setuptools>=68" wheel "setuptools-rust>=1.9"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q --no-build-isolation -e ".${extra}"
.venv/bin/python -c "import nanochat, torch; print(f'nanochat ready: torch {torch.__version__}')"
