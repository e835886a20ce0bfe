"""The command line: build/--check, errors as one paragraph with exit code 2 and no file
written, show, schema, and the README's commands kept in sync with .ci/run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from attngen import cli
from attngen.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_example_spec_loads_and_says_what_it_is() -> None:
    assert len(SPECS) >= 10
    for path in SPECS:
        spec = load_spec(path)
        assert spec.name == path.stem
        assert spec.description
    sequence = [p.stem for p in SPECS if load_spec(p).topology.kind == "sequence"]
    assert len(sequence) >= 10


def test_build_writes_then_check_finds_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(ROOT / "specs" / "causal_prefill.yaml")
    out = tmp_path / "gen"
    code, _, err = run(capsys, "build", spec, "-o", str(out))
    assert code == 0, err
    target = out / "causal_prefill.py"
    text = target.read_text()
    assert load_spec(spec).content_hash in text

    assert run(capsys, "build", spec, "-o", str(out), "--check")[0] == 0

    target.write_text(text + "# edited\n")
    code, _, err = run(capsys, "build", spec, "-o", str(out), "--check")
    assert code == 1
    assert "causal_prefill.py" in err
    assert target.read_text().endswith("# edited\n")  # --check writes nothing

    assert run(capsys, "build", spec, "-o", str(out))[0] == 0
    assert target.read_text() == text


def test_check_mode_reports_missing_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "build", str(ROOT / "specs" / "decode_gqa.yaml"), "-o", str(tmp_path), "--check")
    assert code == 1
    assert "decode_gqa.py" in err
    assert list(tmp_path.iterdir()) == []


BAD_SPECS = {
    "malformed": "name: x\nheads: {q: 8, kv: 2\n",
    "unknown_field": "name: x\nheads: {q: 8, kv: 2}\nhead_dim: 64\nmaks: [causal]\n",
    "heads_not_divisible": "name: x\nheads: {q: 8, kv: 3}\nhead_dim: 64\n",
    "unknown_rule": "name: x\nheads: {q: 8, kv: 2}\nhead_dim: 64\nmask: [casual]\n",
    "unknown_name": "name: x\nheads: {q: 8, kv: 2}\nhead_dim: 64\nmask: [{expr: 'kv_pos <= qpos'}]\n",
    "bad_dtype": "name: x\nheads: {q: 8, kv: 2}\nhead_dim: 64\ndtype: fp8\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_SPECS))
def test_bad_spec_is_one_paragraph_exit_2_and_writes_nothing(
        kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    shutil.copy(ROOT / "specs" / "causal_prefill.yaml", good)
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_SPECS[kind])
    out = tmp_path / "gen"
    code, _, err = run(capsys, "build", str(good), str(bad), "-o", str(out))
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "bad.yaml" in err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["build", "show"])
def test_a_spec_that_is_not_utf8_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: x\n\xff\xfe: 1\n")
    code, _, err = run(capsys, command, str(bad), *(["-o", str(tmp_path / "gen")] if command == "build" else []))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{bad}: cannot read the spec: it is not UTF-8 text (byte 0xff at offset 8)" in err
    assert _files(tmp_path) == ["bad.yaml"]


def test_did_you_mean_reaches_the_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_SPECS["unknown_rule"])
    code, _, err = run(capsys, "show", str(bad))
    assert code == 2
    assert "causal" in err and "mask[0]" in err


def test_show_prints_canonical_spec_hash_and_tiles(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "specs" / "sliding_window_sinks_decode.yaml"
    code, out, err = run(capsys, "show", str(path))
    assert code == 0, err
    spec = load_spec(path)
    assert spec.content_hash in out
    assert "generated/sliding_window_sinks_decode.py" in out
    assert "spec_version: 1" in out
    for field in ("all_visible", "none_visible", "kv_lo", "kv_hi", "full_lo", "full_hi", "exact", "pieces"):
        assert f"{field}:" in out


def test_show_of_a_tree_spec_explains_tree_visibility(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "show", str(ROOT / "specs" / "tree_speculative.yaml"))
    assert code == 0, err
    assert "tree visibility:" in out and "attngen plan" in out
    assert "all_visible" not in out  # the sequence tile analysis does not apply to trees


def test_schema_is_json_with_mask_rules(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["properties"]["mask"]["anyOf"][0] == {"$ref": "#/$defs/MaskRule"}
    forms = schema["$defs"]["MaskRule"]["anyOf"]
    consts = {f.get("const") for f in forms}
    keys = {k for f in forms for k in f.get("properties", {})}
    assert {"causal", "full"} <= consts
    assert keys == {"window", "sink", "prefix_lm", "document", "expr", "all", "any", "not"}
    for name in ("heads", "head_dim", "dtype", "topology", "tensors", "score_mod", "scale", "tune"):
        assert name in schema["properties"]


def test_schema_accepts_the_example_specs(capsys: pytest.CaptureFixture[str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    run(capsys, "schema")
    schema = cli.json_schema()
    for path in SPECS:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_bench_without_gpu_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    code, _, err = run(capsys, "bench", str(ROOT / "specs" / "causal_prefill.yaml"))
    assert code == 2
    assert "CUDA" in err and "Traceback" not in err


def test_bench_shape_on_a_tree_spec_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A tree spec runs its workloads; a --shape would be ignored, so it is refused (before
    any GPU work: this runs without one too)."""
    code, _, err = run(capsys, "bench", str(ROOT / "specs" / "tree_fewshot.yaml"), "--shape", "1x4096")
    assert code == 2
    assert "--shape applies to sequence specs" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "allowed are cpu"), ("cuda:x", "allowed are cpu"), ("cpu:0", "allowed are cpu"), ("cuda:99", "CUDA device")],
)
def test_check_bad_device_is_exit_2(capsys: pytest.CaptureFixture[str], device: str, message: str) -> None:
    """Refused before the first case, where every case would fail on the same error."""
    pytest.importorskip("torch")
    code, out, err = run(capsys, "check", str(ROOT / "specs" / "tree_fewshot.yaml"), "--device", device)
    assert code == 2 and message in err and "case" not in out, err


@pytest.mark.parametrize("examples", ["0", "-3", "x"])
def test_check_examples_must_be_positive(capsys: pytest.CaptureFixture[str], examples: str) -> None:
    with pytest.raises(SystemExit) as exit_:  # argparse's own error: usage and one line
        run(capsys, "check", str(ROOT / "specs" / "tree_fewshot.yaml"), "--examples", examples)
    assert exit_.value.code == 2
    assert "--examples: expected a whole number of at least 1" in capsys.readouterr().err


def test_build_into_an_unwritable_folder_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the output folder should be
    code, _, err = run(capsys, "build", str(ROOT / "specs" / "tree_fewshot.yaml"), "-o", str(blocker / "out"))
    assert code == 2 and f"{blocker} is not a directory" in err and "Traceback" not in err, err


def test_plan_without_a_tree_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan")
    assert code == 2
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# README and CI agree


def _readme_command(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(re.escape(heading) + r".*?```bash\n(.+?)\n```", text, re.S)
    assert found, f"README has no bash block after {heading!r}"
    (command,) = found.group(1).strip().splitlines()
    return command


def test_ci_runs_the_readme_test_command() -> None:
    command = _readme_command("**Set up and run the tests:**")
    assert command.endswith("pytest -q")
    assert command.startswith("python3 -m venv .venv")
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci
    assert "ruff check" in ci and "mypy" in ci


def test_readme_main_job_names_real_specs() -> None:
    command = _readme_command("**Set up and run the main job**")
    assert "attngen build specs/*.yaml" in command
    for name in re.findall(r"specs/(\w+)\.yaml", command):
        assert (ROOT / "specs" / f"{name}.yaml").is_file()


def test_plan_from_parents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As the README spells it: '--parents -1,0,0' (a value argparse alone would take
    for an option), and a DOT file in a folder that does not exist yet."""
    pytest.importorskip("attngen.plan")
    dot = tmp_path / "new" / "plan.dot"
    code, out, err = run(capsys, "plan", "--parents", "-1,0,0", "--tokens", "100,20,30", "--dot", str(dot))
    assert code == 0, err
    assert "group" in out
    assert "(median of 5 calls after a first of " in out  # a decode loop's cost, not the first call's
    assert dot.read_text().startswith("digraph")
    assert "attngen plan --parents -1,0,0 --tokens" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parents", "-1,0", "--tokens", "3,x"], "--tokens: expected a comma-separated list of integers"),
        (["--parents", "-1,0", "--tokens", "3,3", "--queries", "-2"], "queries: node -2 does not exist"),
        (["fewshot_4k_x20", "--heads-kv", "5"], "heads_kv 5 must divide heads_q 32"),
        (["fewshot_4k_x20", "--head-dim", "0"], "head_dim_qk must be at least 1, got 0"),
        # a workload has its own tree: options for a tree of one's own are not dropped silently
        (["fewshot_4k_x20", "--parents", "-1,0", "--tokens", "3,3"], "(--parents, --tokens), not both"),
        (["fewshot_4k_x20", "--mode", "token"], "(--mode), not both"),
        (["fewshot_4k_x20", "--queries", "1"], "(--queries), not both"),
        (["--tokens", "3,3"], "needs both --parents and --tokens"),
        (["--parents", "-1,0", "--mode", "token"], "needs both --parents and --tokens"),
        (["fewshot_4k_x20", "--queries-per-group", "3"], "queries_per_group 3 must be a power of two"),
        (["fewshot_4k_x20", "--span", "0"], "span 0 must be a positive number of tokens"),
        (["fewshot_4k_x20", "--chunk", "100"], "chunk 100 must be a positive multiple of 32"),
    ],
)
def test_plan_bad_arguments_are_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    pytest.importorskip("attngen.plan")
    code, _, err = run(capsys, "plan", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_plan_at_given_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    """--chunk, --queries-per-group and --span fix the plan's parameters (those not given
    are the cost model's), so that plans can be compared by their prediction."""
    pytest.importorskip("attngen.plan")
    code, chosen, err = run(capsys, "plan", "fewshot_4k_x20", "--heads-kv", "8")
    assert code == 0, err
    assert "plan: chunk 512, 16 queries/group, span 768," in chosen
    code, given, err = run(capsys, "plan", "fewshot_4k_x20", "--heads-kv", "8", "--chunk", "256",
                           "--queries-per-group", "32", "--span", "2048")
    assert code == 0, err
    assert "plan: chunk 256, 32 queries/group, span 2048," in given
    code, qg_only, err = run(capsys, "plan", "fewshot_4k_x20", "--heads-kv", "8", "--queries-per-group", "4")
    assert code == 0, err
    assert "4 queries/group" in qg_only


def test_missing_matplotlib_is_named_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib, --png stops before the plan is made or its folder written, and
    the plotting functions name the option that asked for a picture."""
    pytest.importorskip("attngen.plan")
    import sys

    from attngen import plotting
    from attngen.errors import AttngenError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, find_spec raises ValueError
    monkeypatch.setattr(plotting.importlib.util, "find_spec", lambda name: None)
    png = tmp_path / "new" / "plan.png"
    code, out, err = run(capsys, "plan", "--parents", "-1,0", "--tokens", "3,3", "--png", str(png))
    assert code == 2 and "--png needs matplotlib" in err and "planned" not in out, err
    assert not png.parent.exists()
    with pytest.raises(AttngenError, match="--plot needs matplotlib"):
        plotting.pyplot("--plot")


def test_plan_unwritable_dot_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("attngen.plan")
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the DOT file's folder should be
    code, _, err = run(capsys, "plan", "--parents", "-1,0", "--tokens", "3,3", "--dot", str(blocker / "plan.dot"))
    assert code == 2 and "--dot" in err and "cannot write it" in err, err


def test_plan_bad_tree_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("attngen.plan")
    code, _, err = run(capsys, "plan", "--parents=0,0", "--tokens", "1,1")
    assert code == 2
    assert "cycle" in err and len(err.strip().splitlines()) == 1


def test_a_spec_that_cannot_be_rendered_stops_the_build_before_any_write(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from attngen import render
    from attngen.errors import AttngenError

    real = render.render

    def fussy(spec):
        if spec.name == "decode_gqa":
            raise AttngenError("cannot lower this spec")
        return real(spec)

    monkeypatch.setattr(render, "render", fussy)
    out = tmp_path / "gen"
    code, _, err = run(capsys, "build", str(ROOT / "specs" / "causal_prefill.yaml"),
                       str(ROOT / "specs" / "decode_gqa.yaml"), "-o", str(out))
    assert code == 2
    assert "decode_gqa.yaml" in err and "cannot lower" in err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize(("field", "line", "says"), [
    ("score_mod", "score_mod: score * q_pos ** 7", "the power q_pos**7 has no Triton form"),
    ("score_mod", "score_mod: q_pos ** 7", "the power q_pos**7"),  # no score in it: still the score_mod's
    ("score_mod", "score_mod: score * exp(1000)", "beyond float32"),
    ("scale", "scale: 1.0e+300", "beyond float32"),
    ("mask.expr", "mask: {expr: 'kv_pos ** 9 < q_pos'}", "the power kv_pos**9"),
])
@pytest.mark.parametrize("command", ["build", "check"])
def test_an_expression_with_no_triton_form_names_file_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, field: str, line: str, says: str) -> None:
    """An expression with no Triton form is refused where it is read (or, for the scale,
    when it is lowered), naming the file and the field, before anything runs or is
    written."""
    spec = tmp_path / "odd.yaml"
    spec.write_text(f"name: odd\nheads: {{q: 4, kv: 2}}\nhead_dim: 16\n{line}\n")
    out = tmp_path / "gen"
    code, _, err = run(capsys, command, str(spec), *(["-o", str(out)] if command == "build" else []))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"odd.yaml: {field}: " in err and says in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# output files: checked before any work, written whole, at the path given, with the umask


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_build_checks_every_target_before_writing_any(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder where the second module goes stops the build before the first is written,
    and the message names that module's file."""
    out = tmp_path / "gen"
    (out / "decode_gqa.py").mkdir(parents=True)
    code, _, err = run(capsys, "build", str(ROOT / "specs" / "causal_prefill.yaml"),
                       str(ROOT / "specs" / "decode_gqa.yaml"), "-o", str(out))
    assert code == 2 and "Traceback" not in err, err
    assert f"{out / 'decode_gqa.py'}" in err and "is a directory" in err and "nothing was written" in err
    assert _files(out) == ["decode_gqa.py"]


def test_build_over_a_file_says_it_is_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    code, _, err = run(capsys, "build", str(ROOT / "specs" / "causal_prefill.yaml"), "-o", str(blocker))
    assert code == 2 and f"{blocker} is not a directory" in err and "File exists" not in err, err
    assert _files(tmp_path) == ["afile"]


def test_an_unforeseen_write_error_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from attngen import render

    def full_disk(spec, out_dir, *, check=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(render, "build", full_disk)
    out = tmp_path / "gen"
    code, _, err = run(capsys, "build", str(ROOT / "specs" / "causal_prefill.yaml"), "-o", str(out))
    assert code == 2 and f"cannot write {out / 'causal_prefill.py'} (No space left on device)" in err, err


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_have_the_mode_open_would_give(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    umask: int) -> None:
    """Not mkstemp's 0600: 0666 less the umask for a new file, an existing file's own mode
    when it is rewritten."""
    import os

    pytest.importorskip("attngen.plan")
    out, dot = tmp_path / "gen", tmp_path / "plan.dot"
    old = os.umask(umask)
    try:
        assert run(capsys, "build", str(ROOT / "specs" / "causal_prefill.yaml"), "-o", str(out))[0] == 0
        assert run(capsys, "plan", "--parents", "-1,0", "--tokens", "3,3", "--dot", str(dot))[0] == 0
        target = out / "causal_prefill.py"
        target.chmod(0o600)
        target.write_text("stale\n")
        assert run(capsys, "build", str(ROOT / "specs" / "causal_prefill.yaml"), "-o", str(out))[0] == 0
    finally:
        os.umask(old)
    assert dot.stat().st_mode & 0o777 == 0o666 & ~umask
    assert target.stat().st_mode & 0o777 == 0o600 and target.read_text() != "stale\n"
    assert _files(tmp_path) == ["gen", "gen/causal_prefill.py", "plan.dot"]  # no temporary file left


@pytest.mark.parametrize(("option", "name", "says"), [
    ("--png", "{tmp}/", "names a directory; allowed is the path of a file, such as {tmp}/plan.png"),
    ("--png", "{tmp}", "names a directory"),
    ("--png", "{tmp}/p.txt", "written as PNG; allowed is a file name ending in .png, such as {tmp}/p.png"),
    ("--png", "{tmp}/pnoext", "ending in .png, such as {tmp}/pnoext.png"),
    ("--png", "{tmp}/afile/x.png", "cannot write it: {tmp}/afile is not a directory"),
    ("--dot", "{tmp}/", "names a directory; allowed is the path of a file, such as {tmp}/plan.dot"),
    ("--dot", "{tmp}/new/", "names a directory"),
    ("--dot", "{tmp}/afile/x.dot", "cannot write it: {tmp}/afile is not a directory"),
    ("--dot", "", "given an empty path; allowed is the path of a file, such as plan.dot"),
])
def test_plan_output_that_is_no_file_of_its_kind_is_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, name: str, says: str) -> None:
    """Refused before planning, naming the option, the path and what is allowed; nothing
    is written, in the folder or beside it."""
    pytest.importorskip("attngen.plan")
    pytest.importorskip("matplotlib")
    (tmp_path / "afile").write_text("")
    name, says = name.format(tmp=tmp_path), says.format(tmp=tmp_path)
    code, out, err = run(capsys, "plan", "tot_d3_w3", option, name)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"attngen plan: {option} {name}".rstrip() in err and says in err and "planned" not in out
    assert _files(tmp_path) == ["afile"]
    assert not tmp_path.with_suffix(".png").exists() and not tmp_path.with_suffix(".dot").exists()


def test_plan_png_is_written_at_exactly_the_path_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("attngen.plan")
    pytest.importorskip("matplotlib")
    png = tmp_path / "new" / "Plan.PNG"
    code, _, err = run(capsys, "plan", "--parents", "-1,0,0", "--tokens", "40,8,8", "--png", str(png))
    assert code == 0, err
    assert _files(tmp_path) == ["new", "new/Plan.PNG"]
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plan_dot_and_png_at_one_path_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("attngen.plan")
    pytest.importorskip("matplotlib")
    both = str(tmp_path / "plan.png")
    code, _, err = run(capsys, "plan", "tot_d3_w3", "--dot", both, "--png", both)
    assert code == 2 and "name the same file" in err, err
    assert _files(tmp_path) == []


def test_bench_plot_that_is_not_a_png_is_refused_before_timing(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before any GPU work (so this runs without a GPU too)."""
    pytest.importorskip("matplotlib")
    plot = tmp_path / "timings.txt"
    code, _, err = run(capsys, "bench", str(ROOT / "specs" / "tree_fewshot.yaml"), "--plot", str(plot))
    assert code == 2 and f"--plot {plot}: the picture is written as PNG" in err and "CUDA" not in err, err
    assert _files(tmp_path) == []


# ---------------------------------------------------------------------------------------
# plan: trees with no nodes, no queries, no tokens


@pytest.mark.parametrize(("args", "says"), [
    (["--parents", "", "--tokens", ""], "--parents: given an empty list; expected the parent of each node"),
    (["--parents", "-1,0", "--tokens", "3,3", "--queries", ""], "--queries: given an empty list"),
])
def test_plan_empty_list_is_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], says: str) -> None:
    pytest.importorskip("attngen.plan")
    code, _, err = run(capsys, "plan", *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("mode", ["node", "token"])
def test_plan_of_a_tree_holding_no_tokens_is_an_empty_plan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    """Nodes with no tokens yet (a tree about to be filled) plan to nothing: no groups."""
    pytest.importorskip("attngen.plan")
    dot = tmp_path / "plan.dot"
    code, out, err = run(capsys, "plan", "--parents", "-1,0,0", "--tokens", "0,0,0", "--mode", mode, "--dot", str(dot))
    assert code == 0, err
    assert "0 groups" in out and "0 KV tokens" in out and "no groups: the queries see no KV tokens" in out
    assert dot.read_text().startswith("digraph")


# ---------------------------------------------------------------------------------------
# show prints the bounds the kernels use


def test_show_prints_the_clamped_bounds_of_the_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    """The pieces and bounds clamped into [0, kv_len), as the lowering uses them: the sink
    piece starts at 0, not -oo."""
    code, out, err = run(capsys, "show", str(ROOT / "specs" / "sliding_window_sinks_decode.yaml"))
    assert code == 0, err
    assert "oo" not in out
    assert "  kv_lo: 0    #" in out
    assert "  pieces: [0, Min(4, kv_len, q_hi + 1)), [Max(0, q_lo - 4095), Min(kv_len, q_hi + 1))    #" in out


@pytest.mark.parametrize("path", [p for p in SPECS if load_spec(p).topology.kind == "sequence"], ids=lambda p: p.stem)
def test_show_and_the_lowering_read_one_analysis(path: Path) -> None:
    """Every piece `show` prints is one the kernel visits: its printed ends are those of
    sequence_tiles, whose Triton forms are the kernel's piece_codes."""
    from attngen.ir import TILE_NAMES, lower, make_tensor_load, print_for, sequence_tiles

    spec = load_spec(path)
    tiles = sequence_tiles(spec)
    lines = cli.tile_classification(spec)
    assert not any(re.search(r"\boo\b", line) for line in lines)  # sympy's infinity, not floor
    for lo, hi in tiles.pieces:
        assert f"[{lo}, {hi})" in "\n".join(lines)
    kernel = lower(spec).piece_codes
    assert len(kernel) == max(len(tiles.pieces), 1)
    if tiles.pieces:
        load = make_tensor_load(spec, spec.heads.q)
        assert kernel == tuple((print_for(spec, lo, TILE_NAMES, load), print_for(spec, hi, TILE_NAMES, load))
                               for lo, hi in tiles.pieces)
