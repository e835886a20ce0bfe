#!/usr/bin/env bash
# One device session: run what is asked (tree bench, gpu tests, sequence bench), each
# under a time limit so one slow part cannot eat the others; short tables come last.
# Usage: bash scripts/gpu_session.sh [tree | tree-branches tree-spec] [tests | tests-gluon tests-rest] [seq]
#        (default: tree tests seq)
# Needs attngen's Python dependencies importable (pydantic, sympy, jinja2, networkx, pyyaml)
# beside the GPU's torch and Triton; run from the repository root.
set -uo pipefail
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
parts=${*:-tree tests seq}
gpu_tests() {  # NAME PYTEST-ARGS...: the gpu-marked tests, under 575 s, into $out/gpu_tests_NAME.txt as they
    # run (a half killed by the limit keeps what it printed: session 49's first tests-rest on a fresh
    # machine, through a pipe to tail, kept one dot); its last 40 lines are shown at the end
    local name=$1; shift
    ATTNGEN_GPU_EXAMPLES=${ATTNGEN_GPU_EXAMPLES:-25} timeout 575 python3 -m pytest -v -m gpu -p no:cacheprovider \
        --durations=10 "$@" > "$out/gpu_tests_$name.txt" 2>&1
}
bench_half() {  # branches | spec: the reference cases of that query mode, into $out/tree_NAME
    local name=$1 workloads
    case $name in
        branches) workloads="--workload fewshot_4k_x20 --workload fewshot_32k_x64 --workload tot_d3_w3" ;;
        spec)     workloads="--workload spec_4k_92 --workload spec_16k_184" ;;
    esac
    mkdir -p "$out/tree_$name"
    # shellcheck disable=SC2086
    timeout 570 python3 -m attngen.bench_tree $workloads --out "$out/tree_$name" 2>&1 | grep -v Warning \
        | tee "$out/tree_$name/tree.log"
}
for part in $parts; do
    case $part in
        # the reference cases in two halves of about 250-300 s each (session 56: each case now
        # compiles FlexAttention afresh at its own shapes), each into its own folder; a device
        # call allows 600 s, so there give each half a call of its own, and join them after:
        # python -m attngen.bench_tree --merge DIR/tree_branches/tree_results.json
        #     DIR/tree_spec/tree_results.json --out DIR/tree   (no GPU needed)
        tree)          bench_half branches; bench_half spec
                       python3 -m attngen.bench_tree --merge "$out"/tree_{branches,spec}/tree_results.json \
                           --out "$out/tree" ;;
        tree-branches) bench_half branches ;;
        tree-spec)     bench_half spec ;;
        # the GPU suite took 484-531 s on the H200 in sessions 40-41 and more than 575 s on a
        # fresh machine in session 42 (the tree kernels' tests alone: 431 s, warm): a device
        # call allows 600 s, so there it runs in two halves, the Gluon tests (about half the
        # time) and the rest, each with its slowest tests listed. Each half takes 300-370 s
        # once its kernels are in Triton's cache; the rest ran past 575 s as a fresh
        # machine's first call (session 49), so run it again there if it was cut
        tests)       gpu_tests all tests ;;
        tests-gluon) gpu_tests gluon tests -k gluon ;;
        tests-rest)  gpu_tests rest tests -k "not gluon" ;;
        seq)   timeout 240 python3 -m attngen.bench --preset all --out "$out" 2>&1 | grep -v Warning | tee "$out/seq.log" ;;
    esac
done
for f in "$out"/gpu_tests_*.txt; do [ -f "$f" ] && { echo "== $f"; tail -40 "$f"; }; done
exit 0
