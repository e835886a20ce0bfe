#!/usr/bin/env bash
# One device session: run what is asked (tree bench, gpu tests, sequence bench), each
# under a time limit so one slow part cannot eat the others; short tables come last.
# Usage: bash scripts/gpu_session.sh [tree] [tests] [seq]   (default: all three)
# Needs attngen's Python dependencies importable (pydantic, sympy, jinja2, networkx, pyyaml)
# beside the GPU's torch and Triton; run from the repository root.
set -uo pipefail
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
parts=${*:-tree tests seq}
for part in $parts; do
    case $part in
        tree)  timeout 420 python3 -m attngen.bench_tree --out "$out" 2>&1 | grep -v Warning | tee "$out/tree.log" ;;
        # the GPU suite took 484-531 s on the H200 in sessions 40-41: alone in a device call
        # (600 s at most), with the slowest tests listed so that a growing one shows
        tests) ATTNGEN_GPU_EXAMPLES=${ATTNGEN_GPU_EXAMPLES:-25} timeout 575 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=10 tests 2>&1 | tail -40 > "$out/gpu_tests.txt" ;;
        seq)   timeout 240 python3 -m attngen.bench --preset all --out "$out" 2>&1 | grep -v Warning | tee "$out/seq.log" ;;
    esac
done
[ -f "$out/gpu_tests.txt" ] && cat "$out/gpu_tests.txt"
exit 0
