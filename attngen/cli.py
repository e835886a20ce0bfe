"""The ``attngen`` command line.

    attngen build SPEC... [-o DIR] [--check]   render specs into DIR (default generated/)
    attngen check SPEC [--examples N] [--seed S] [--device D]
    attngen show SPEC                          canonical spec, hash, path, tile analysis
    attngen bench SPEC [--shape S]... [--plot PNG]
    attngen schema                             JSON Schema of the spec language
    attngen plan WORKLOAD | --parents ... --tokens ...

Every :class:`~attngen.errors.AttngenError` is printed as one paragraph on stderr with
exit code 2 — never a traceback. Exit code 1 means the command ran and found a problem
(stale files, failed checks).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from attngen import plotting
from attngen.errors import AttngenError, SpecError
from attngen.progress import Progress
from attngen.spec import Spec, load_spec

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2


def _load_all(paths: Sequence[str]) -> list[Spec]:
    """Validate every spec before anything is written, so one bad spec writes nothing."""
    specs = [load_spec(p) for p in paths]
    seen: dict[str, str] = {}
    for path, spec in zip(paths, specs, strict=True):
        if spec.name in seen:
            raise AttngenError(f"{path}: spec name {spec.name!r} is also used by {seen[spec.name]}; "
                               "each spec renders to <name>.py, so names must be unique")
        seen[spec.name] = path
    return specs


# ---------------------------------------------------------------------------------------
# build


def cmd_build(args: argparse.Namespace) -> int:
    from attngen import render

    specs = _load_all(args.specs)
    out_dir = Path(args.out)
    with Progress(len(specs), "check" if args.check else "build") as bar:
        # Render everything first (cached), so a spec that cannot be lowered stops the
        # build before any file is written.
        for path, spec in zip(args.specs, specs, strict=True):
            bar.begin(spec.name)
            _render(path, spec)
            bar.step(spec.name)
    if not args.check:
        _check_targets(args.specs, specs, out_dir)
    results = []
    for spec in specs:
        try:
            results.append(render.build(spec, out_dir, check=args.check))
        except OSError as err:  # what the checks cannot foresee (a full disk): one line, not a traceback
            target = render.generated_path(spec, out_dir)
            raise AttngenError(f"-o {out_dir}: cannot write {target} ({err.strerror or err})") from None
    stale = [r.path for r in results if r.stale]
    if not args.check:
        written = sum(r.changed for r in results)
        print(f"build: {written} written, {len(results) - written} unchanged in {out_dir}", file=sys.stderr)
    if stale:
        print("stale or missing generated files (run `attngen build` to refresh):", file=sys.stderr)
        for path in stale:
            print(f"  {path}", file=sys.stderr)
        return EXIT_FOUND
    return EXIT_OK


def _check_targets(paths: Sequence[str], specs: Sequence[Spec], out_dir: Path) -> None:
    """Every module's file can be written, checked before the first is: exit 2 means
    nothing was written."""
    from attngen.render import generated_path

    for path, spec in zip(paths, specs, strict=True):
        target = generated_path(spec, out_dir)
        if why := _why_unwritable(target):
            raise AttngenError(f"-o {out_dir}: cannot write {target}, the module of {path}: {why}; "
                               "nothing was written")


# ---------------------------------------------------------------------------------------
# check


def _render(path: str, spec: Spec) -> None:
    """Render ``spec`` (through the cache), so that what its lowering refuses (an
    expression with no Triton form, a topology the family lacks) is reported against its
    file before any other work."""
    from attngen import render

    try:
        render.render(spec)
    except SpecError as err:
        raise (err if err.file else err.in_file(path)) from None
    except AttngenError as err:
        text = str(err)
        raise AttngenError(text if path in text else f"{path}: {text}") from None


def cmd_check(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    _render(args.spec, spec)
    device = _check_device(args.device) if args.device else _default_device()
    from attngen.check import check_spec

    bar = Progress(args.examples, f"check {spec.name}")

    def progress(done: int, total: int, case: Any) -> None:
        bar.step(f"case {done}", "ok" if getattr(case, "passed", True) else "FAILED")

    report = check_spec(spec, examples=args.examples, seed=args.seed, device=device, progress=progress)
    bar.close()
    print(report.summary())
    return EXIT_OK if report.passed else EXIT_FOUND


def _check_device(device: str) -> str:
    """``--device`` as given, if this machine has it: cpu (the Triton interpreter) or a
    CUDA device; otherwise every case would fail on the same error."""
    name, _, index = device.partition(":")
    if name not in ("cpu", "cuda") or (index and not index.isdigit()) or (name == "cpu" and index):
        raise AttngenError(f"--device {device!r}: allowed are cpu (the Triton interpreter), cuda and cuda:N")
    if name == "cuda":
        count = _torch().cuda.device_count()
        if int(index or 0) >= count:
            raise AttngenError(f"--device {device}: this machine has {count} CUDA device(s); "
                               "use --device cpu for the Triton interpreter")
    return device


def _default_device() -> str:
    return "cuda" if _torch().cuda.is_available() else "cpu"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise AttngenError("attngen check needs torch; install it first (see README: set-up)") from None
    return torch


# ---------------------------------------------------------------------------------------
# show


def tile_classification(spec: Spec) -> list[str]:
    """Lines describing the symbolic tile analysis the sequence lowering uses: the
    spec's mask within the sequence bounds, with the key bounds the kernels read (clamped
    into [0, kv_len) by the same function the lowering calls)."""
    from attngen.ir import sequence_tiles

    result = sequence_tiles(spec)
    meaning = {
        "all_visible": "every pair visible: the mask is skipped",
        "none_visible": "no pair visible: the tile is skipped",
        "kv_lo": "visible keys of the query tile start at",
        "kv_hi": "... and end before",
        "full_lo": "keys visible to every query of the tile start at",
        "full_hi": "... and end before",
        "exact": "every atom affine (False: some decided only at run time)",
    }
    lines = [f"  {name}: {getattr(result, name)}    # {doc}" for name, doc in meaning.items()]
    pieces = ", ".join(f"[{lo}, {hi})" for lo, hi in result.pieces) or "none"
    lines.append(f"  pieces: {pieces}    # visible keys lie in these; the kernels read no tile between them")
    return ["tile analysis of visibility & 0 <= kv_pos < kv_len, for a query tile [q_lo, q_hi] "
            "and a KV tile [k_lo, k_hi]:", *lines]


def tree_visibility(spec: Spec) -> list[str]:
    """What decides visibility in the tree kernels."""
    return [
        "tree visibility: a query sees its node's tokens up to itself and every ancestor's "
        "tokens; the run-time plan carries this as per-(group, query) bits "
        "(`attngen plan` shows one)",
        "positions: q_pos / kv_pos are depths on the root path; batch is the tree",
    ]


def cmd_show(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    from attngen import semantics

    print(spec.canonical_yaml().rstrip())
    print("---")
    print(f"hash: {spec.content_hash}")
    print(f"generated: {Path(args.out) / (spec.name + '.py')}")
    print(f"softmax scale: {spec.softmax_scale:.6g}")
    print(f"visibility: {semantics.visibility(spec)}")
    if spec.score_mod is not None:
        print(f"score: {semantics.score(spec)}")
    lines = tile_classification(spec) if spec.topology.kind == "sequence" else tree_visibility(spec)
    for line in lines:
        print(line)
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# bench


def cmd_bench(args: argparse.Namespace) -> int:
    from attngen import bench

    spec = load_spec(args.spec)
    _render(args.spec, spec)
    if args.plot is not None:  # before minutes of timing
        plotting.require("--plot")
    plot = _output_file("--plot", args.plot, example="bench.png", png=True) if args.plot is not None else None
    if spec.topology.kind != "sequence":
        from attngen import bench_tree

        if args.shape:
            raise AttngenError(f"--shape applies to sequence specs; {spec.name} is a tree spec, which runs the "
                               "reference workloads of its query mode (python -m attngen.bench_tree --workload "
                               "NAME runs others)")
        rows = bench_tree.bench_spec(spec)
        print(bench_tree.format_table(rows))
        if plot:
            with _writing("--plot", plot) as path:
                bench_tree.plot(rows, path)
        return EXIT_OK
    shapes = [bench.parse_shape(s, spec) for s in args.shape] if args.shape else bench.default_shapes(spec)
    results = bench.run_cases([(spec, s) for s in shapes], seed=args.seed)
    if plot:
        with _writing("--plot", plot) as path:
            bench.plot(results, path)
    print(bench.format_table(results))
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# schema


def _rule_schema() -> dict[str, Any]:
    """The mask rule forms, written by hand (pydantic sees the mask as Any)."""
    count = {"type": "integer", "minimum": 0}
    bound = {"anyOf": [count, {"type": "null"}]}
    rule_list = {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/MaskRule"}}
    one_key: list[tuple[str, dict[str, Any], str]] = [
        ("window", {"anyOf": [count, {"type": "object", "additionalProperties": False,
                                      "properties": {"left": bound, "right": bound}}]},
         "q_pos - left <= kv_pos <= q_pos + right (an int is left, with right 0; null is unbounded)"),
        ("sink", {"type": "integer", "minimum": 1}, "the first n keys are always visible"),
        ("prefix_lm", {"anyOf": [count, {"type": "string"}]},
         "causal plus a bidirectional prefix: a length, or the name of a per-batch tensor"),
        ("document", {"type": "string"}, "name of a per-token segment-id tensor; same id sees same id"),
        ("expr", {"type": "string", "minLength": 1},
         "boolean expression over q_pos, kv_pos, head, batch, q_len, kv_len and declared tensors"),
        ("all", rule_list, "every rule holds (a plain list means the same)"),
        ("any", rule_list, "at least one rule holds"),
        ("not", {"$ref": "#/$defs/MaskRule"}, "the rule does not hold"),
    ]
    forms: list[dict[str, Any]] = [
        {"const": "causal", "description": "kv_pos <= q_pos"},
        {"const": "full", "description": "every key visible"},
    ]
    for key, value, doc in one_key:
        forms.append({"type": "object", "description": doc, "properties": {key: value},
                      "required": [key], "additionalProperties": False})
    return {"description": "A mask rule: 'causal', 'full', or a one-key mapping", "anyOf": forms}


def json_schema() -> dict[str, Any]:
    """JSON Schema of the spec language (for editors)."""
    schema = Spec.model_json_schema()
    schema.setdefault("$defs", {})["MaskRule"] = _rule_schema()
    schema["properties"]["mask"] = {
        "description": "Visibility: one rule, or a list of rules that must all hold. Default 'full'.",
        "anyOf": [{"$ref": "#/$defs/MaskRule"},
                  {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/MaskRule"}}],
        "default": "full",
    }
    schema["properties"]["score_mod"]["description"] = (
        "Expression over score (= scale * q.k), q_pos, kv_pos, head, batch, q_len, kv_len and "
        "declared tensors, e.g. '30 * tanh(score / 30)'")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "attngen spec"
    return schema


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# plan (tree family; the planner lives in attngen.plan, its display in attngen.plan_show)


#: What each list option of `attngen plan` holds, for its errors.
LIST_MEANING = {
    "--parents": "the parent of each node, -1 for a root, such as '-1,0,0'",
    "--tokens": "the token count of each node (0 for an empty one), such as '4000,400,400'",
    "--queries": "the query nodes, such as '1,2' (leave the option out for the leaves)",
}


def _ints(option: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise AttngenError(f"{option}: expected a comma-separated list of integers, given {text!r}") from None
    if not values:  # a tree of no nodes, or no queries, is a slip, not a request
        raise AttngenError(f"{option}: given an empty list; expected {LIST_MEANING[option]}")
    return values


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        from attngen import plan as planner
        from attngen import plan_show
        from attngen.cost import HeadLayout
    except ImportError:
        raise AttngenError("attngen plan needs the tree planner (attngen.plan), "
                           "which this installation does not have") from None
    if args.png is not None:
        plotting.require("--png")
    dot = _output_file("--dot", args.dot, example="plan.dot") if args.dot is not None else None
    png = _output_file("--png", args.png, example="plan.png", png=True) if args.png is not None else None
    if dot and png and dot.resolve() == png.resolve():
        raise AttngenError(f"--dot {args.dot} and --png {args.png} name the same file; give each its own")
    tree_options = [option for option, value in (("--parents", args.parents), ("--tokens", args.tokens),
                                                 ("--queries", args.queries), ("--mode", args.mode))
                    if value is not None]
    if args.workload and tree_options:
        raise AttngenError(f"give a WORKLOAD or a tree of your own ({', '.join(tree_options)}), "
                           f"not both: workload {args.workload!r} has its own tree and queries")
    if args.workload:
        tree: Any = _workload_tree(args.workload)
    elif args.parents is not None and args.tokens is not None:
        from attngen.tree import TreeBatch

        queries = _ints("--queries", args.queries) if args.queries is not None else None
        parents, tokens = _ints("--parents", args.parents), _ints("--tokens", args.tokens)
        tree = TreeBatch.from_parents(parents, tokens, queries, mode=args.mode or "node")
    elif tree_options:
        raise AttngenError("a tree of your own needs both --parents and --tokens "
                           "(a parent and a token count per node)")
    else:
        raise AttngenError("give a WORKLOAD name, or a tree of your own from --parents and --tokens")
    heads = HeadLayout(heads_q=args.heads_q, heads_kv=args.heads_kv,
                       head_dim_qk=args.head_dim, head_dim_v=args.head_dim)
    times = []
    for i in range(6):  # the first call pays one-time set-up; a decode loop pays the rest
        # each on the tree built afresh, as a decode step's is: a tree keeps the arrays it
        # derives on first use, which planning one tree object again would not pay
        fresh = tree if i == 0 else dataclasses.replace(tree)
        started = time.perf_counter()
        plan = planner.plan_tree(fresh, chunk=args.chunk, queries_per_group=args.queries_per_group,
                                 span=args.span, heads=heads)
        times.append(time.perf_counter() - started)
    print(plan_show.describe(plan))
    print(f"planned in {statistics.median(times[1:]) * 1e3:.2f} ms on the host (median of 5 calls "
          f"after a first of {times[0] * 1e3:.2f} ms)")
    if dot:
        with _writing("--dot", dot) as path:
            path.write_text(plan_show.to_dot(tree, plan), encoding="utf-8")
    if png:
        with _writing("--png", png) as path:
            plan_show.draw_png(tree, plan, str(path))  # matplotlib: checked before planning
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# output files: checked before any work, written whole or not at all


def _why_unwritable(path: Path) -> str | None:
    """Why no file can be written at ``path`` (its missing folders made first), or None."""
    if path.is_dir():
        return "it is a directory"
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        if folder.exists() or folder.is_symlink():  # a file (or a dangling link) where a folder must go
            return f"{folder} is not a directory"
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    return None


def _output_file(option: str, name: str, *, example: str, png: bool = False) -> Path:
    """``name`` as the path of the file ``option`` writes, exactly as given: refused
    before any work when it names a folder, lacks the .png ending a picture needs (the
    file written would otherwise be another, or none), or lies where nothing can be
    written. ``example`` is a file name to suggest."""
    path = Path(name)
    if not name:
        raise AttngenError(f"{option}: given an empty path; allowed is the path of a file, such as {example}")
    if name.endswith(("/", os.sep)) or path.is_dir():
        raise AttngenError(f"{option} {name}: names a directory; allowed is the path of a file, such as "
                           f"{path / example}")
    if png and path.suffix.lower() != ".png":
        raise AttngenError(f"{option} {name}: the picture is written as PNG; allowed is a file name "
                           f"ending in .png, such as {path.with_suffix('.png')}")
    if why := _why_unwritable(path):
        raise AttngenError(f"{option} {name}: cannot write it: {why}")
    return path


@contextlib.contextmanager
def _writing(option: str, path: Path) -> Iterator[Path]:
    """A temporary file to write ``option``'s file into; moved onto ``path`` (its folder
    made as `build -o` makes one) only once written whole. An OSError while writing
    becomes an AttngenError naming the option and the file."""
    from attngen.render import replacing

    try:
        with replacing(path, suffix=".tmp" + path.suffix) as tmp:  # the suffix tells matplotlib PNG
            yield tmp
    except OSError as err:
        raise AttngenError(f"{option} {path}: cannot write it ({err.strerror or err})") from None


def _workload_tree(name: str) -> Any:
    from attngen.errors import did_you_mean

    try:
        from attngen.workloads import WORKLOADS
    except ImportError:
        raise AttngenError("named workloads need attngen.workloads, which this installation does not have") from None
    if name not in WORKLOADS:
        hint = did_you_mean(name, WORKLOADS)
        raise AttngenError(f"unknown workload {name!r}; allowed: {', '.join(WORKLOADS)}"
                           + (f"; {hint}" if hint else ""))
    workload = WORKLOADS[name]()
    print(f"{workload.name}: {workload.description}")
    return workload.tree


# ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, given {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attngen", description="Compile YAML attention specs to Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="render specs into generated modules")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec YAML files")
    p.add_argument("-o", "--out", default="generated", metavar="DIR", help="output directory (default: generated/)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file is stale or missing")
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("check", help="property-test a spec's kernel against the float64 reference")
    p.add_argument("spec", metavar="SPEC", help="a spec YAML file")
    p.add_argument("--examples", type=_positive_int, default=20, metavar="N",
                   help="random cases to draw and check (default 20)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="draw the cases of an earlier run again (its report prints its seed; default: a new one)")
    p.add_argument("--device", default=None, help="cuda, or cpu for the Triton interpreter (default: cuda if present)")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("show", help="canonical spec, hash, generated path and tile analysis")
    p.add_argument("spec", metavar="SPEC", help="a spec YAML file")
    p.add_argument("-o", "--out", default="generated", metavar="DIR",
                   help="where `attngen build` writes its module (default: generated/)")
    p.set_defaults(run=cmd_show)

    p = sub.add_parser("bench", help="time a spec's kernel against torch SDPA and FlexAttention (GPU)")
    p.add_argument("spec", metavar="SPEC", help="a spec YAML file")
    p.add_argument("--shape", action="append", metavar="S",
                   help="BxS or BxQxKV (prefill), BxKV (decode); repeatable (sequence specs only: a tree "
                        "spec runs its reference workloads)")
    p.add_argument("--plot", metavar="PNG", help="draw the timings beside the floor as a PNG (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("schema", help="print the JSON Schema of the spec language")
    p.set_defaults(run=cmd_schema)

    p = sub.add_parser("plan", help="show a tree plan: groups, visibility bits, predicted bytes")
    p.add_argument("workload", nargs="?", metavar="WORKLOAD",
                   help="a named tree workload, e.g. fewshot_4k_x20 (an unknown name lists them "
                        "all); or a tree of your own from --parents and --tokens")
    p.add_argument("--parents", help="parent of each node, -1 for a root: '-1,0,0'")
    p.add_argument("--tokens", help="tokens per node: '4000,400,400'")
    p.add_argument("--queries", help="query nodes (default: the leaves)")
    p.add_argument("--mode", choices=["node", "token"], default=None,
                   help="node (the default): a query per query node, seeing the node and its "
                        "ancestors; token: a query per token of the query nodes, seeing its ancestors "
                        "and itself (a speculative token tree)")
    p.add_argument("--heads-q", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--heads-kv", type=int, default=32, help="KV heads, dividing --heads-q (default 32)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--chunk", type=int, default=None, help="KV chunk size (default: the cost model's choice)")
    p.add_argument("--queries-per-group", type=int, default=None, metavar="QG",
                   help="queries per group, a power of two (default: the cost model's choice)")
    p.add_argument("--span", type=int, default=None,
                   help="tokens a group of a long node's fully visible chunks may hold "
                        "(default: the cost model's choice)")
    p.add_argument("--dot", metavar="FILE", help="write the plan as Graphviz DOT")
    p.add_argument("--png", metavar="FILE", help="draw the tree and its groups")
    p.set_defaults(run=cmd_plan)
    return parser


#: Options whose value is a list of ints that may start with a minus ('--parents -1,0,0').
LIST_OPTIONS = ("--parents", "--tokens", "--queries")


def _joined_list_values(argv: Sequence[str]) -> list[str]:
    """``argv`` with each list option joined to its value ('--parents=-1,0,0'): argparse
    takes a word that starts with '-' and is not a plain number for an option, so
    '--parents -1,0,0' would fail with 'expected one argument'."""
    out: list[str] = []
    words = iter(argv)
    for word in words:
        value = next(words, None) if word in LIST_OPTIONS else None
        out.append(word if value is None else f"{word}={value}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attngen`` script; returns the exit code."""
    args = build_parser().parse_args(_joined_list_values(sys.argv[1:] if argv is None else argv))
    try:
        code: int = args.run(args)
    except AttngenError as err:
        print(f"attngen {args.command}: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
