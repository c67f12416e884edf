"""scripts/demo.py (the stage runner: skip finished stages, rerun changed ones, resume after a kill) and
scripts/report.py (every number of the report equals its metrics file's)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, strategies as st

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import demo  # noqa: E402
import report  # noqa: E402

PY = sys.executable


def copy_stage(name, src, dst, extra=""):
    """A stage that copies src to dst (after `extra` Python statements) and appends its name to a run log."""
    code = (f"import shutil, pathlib\n{extra}\nshutil.copy({src!r}, {dst!r})\n"
            f"open(pathlib.Path({dst!r}).parent / 'runs.txt', 'a').write({name!r} + '\\n')")
    return demo.Stage(name, f"copy {os.path.basename(src)}", [[PY, "-c", code, src]], [dst])


def runs(tmp_path):
    f = tmp_path / "runs.txt"
    return f.read_text().split() if f.exists() else []


def two_stages(tmp_path, extra_b=""):
    (tmp_path / "in.txt").write_text("one")
    a = copy_stage("a", str(tmp_path / "in.txt"), str(tmp_path / "a.txt"))
    b = copy_stage("b", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), extra_b)
    return [a, b]


def test_finished_stages_are_skipped_and_changed_inputs_rerun(tmp_path):
    out = str(tmp_path / "out")
    stages = two_stages(tmp_path)
    needs = demo.find_inputs(stages)
    assert needs == {"a": [], "b": ["a"]}  # b reads a's output
    assert str(tmp_path / "in.txt") in stages[0].inputs
    assert demo.run(stages, needs, out, 2, 1) == ["a", "b"]
    assert (tmp_path / "b.txt").read_text() == "one"
    assert demo.run(stages, needs, out, 2, 1) == []  # all finished: nothing runs
    (tmp_path / "b.txt").unlink()  # an output gone: that stage alone
    assert demo.run(stages, needs, out, 2, 1) == ["b"]
    (tmp_path / "in.txt").write_text("two")  # an input changed: it and everything after it
    assert demo.run(stages, needs, out, 2, 1) == ["a", "b"]
    assert (tmp_path / "b.txt").read_text() == "two"
    stages[1].cmds[0][2] += "\nx = 1"  # a changed command reruns its stage
    assert demo.run(stages, demo.find_inputs(stages), out, 2, 1) == ["b"]
    assert runs(tmp_path) == ["a", "b", "b", "a", "b", "b"]


def test_a_log_the_stage_writes_is_not_its_input(tmp_path):
    """A file after --log (or --out) is written by the stage: left by an earlier run, it must not change the
    stage's key, or a rerun would redo a finished stage."""
    stages = two_stages(tmp_path)
    log = str(tmp_path / "a.log.jsonl")
    stages[0].cmds[0] += ["--log", log]
    code = stages[0].cmds[0][2]
    stages[0].cmds[0][2] = code + f"\nopen({log!r}, 'a').write('{{}}\\n')"
    out = str(tmp_path / "out")
    assert demo.run(stages, demo.find_inputs(stages), out, 2, 1) == ["a", "b"]
    assert log not in stages[0].inputs
    again = two_stages(tmp_path)  # a new process: the inputs are found again, now with the log on disk
    again[0].cmds[0] = list(stages[0].cmds[0])
    needs = demo.find_inputs(again)
    assert log not in again[0].inputs and demo.run(again, needs, out, 2, 1) == []
    (tmp_path / "in.txt").write_text("two")  # a rerun starts its log afresh: one run's lines, not two runs'
    assert demo.run(again, needs, out, 2, 1) == ["a", "b"]
    assert open(log).read() == "{}\n"


def test_code_files_follow_imports():
    files = demo.code_files("dpo.py")
    assert {"dpo.py", "common.py", "model.py"} <= set(files) and "ppo.py" not in files


def test_a_failing_stage_stops_the_run_and_shows_its_log(tmp_path, capsys):
    stages = two_stages(tmp_path, extra_b="raise SystemExit('stage b broke')")
    with pytest.raises(SystemExit) as e:
        demo.run(stages, demo.find_inputs(stages), str(tmp_path / "out"), 1, 1)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "stage b broke" in err and "stage b failed" in err
    assert (tmp_path / "a.txt").exists() and not (tmp_path / "b.txt").exists()
    assert not (tmp_path / "out" / "stamps" / "b.json").exists()


def test_killed_mid_stage_then_rerun_completes(tmp_path):
    """The runner is killed (SIGTERM) while stage b runs: b is stopped, leaves no stamp, and the same command run
    again skips a and completes b."""
    gate = tmp_path / "gate"
    extra = f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.05)"
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import demo, test_demo, pathlib
stages = test_demo.two_stages(pathlib.Path({str(tmp_path)!r}), {extra!r})
demo.run(stages, demo.find_inputs(stages), {str(tmp_path / 'out')!r}, 2, 1)
""")
    proc = subprocess.Popen([PY, str(script)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "out" / "logs" / "b.txt").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # b is waiting at its gate
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 130
    assert "run the same command again" in proc.stderr.read()
    assert not (tmp_path / "b.txt").exists() and not (tmp_path / "out" / "stamps" / "b.json").exists()
    gate.write_text("open")
    again = subprocess.run([PY, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b.txt").read_text() == "one" and runs(tmp_path) == ["a", "b"]  # a ran once


def test_the_chain_is_a_graph_every_stage_can_reach(tmp_path):
    stages, plan = demo.chain("out/x", fast=True)
    needs = demo.find_inputs(stages)
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    order = {n: i for i, n in enumerate(names)}
    for s in stages:  # every input an earlier stage makes: the list is one valid order
        assert all(order[d] < order[s.name] for d in needs[s.name]), s.name
    must = {"world", "base", "sft", "sft_plain", "rm", "dpo", "ppo", "grpo", "cai", "student_kd", "sparsegpt50",
            "sparsegpt50_healed", "student", "gptq4", "rtn4", "qat4", "gguf"}
    assert must <= set(names)
    evaluated = {m for s in stages if s.name.startswith("eval_") for c in s.cmds
                 for m in c[c.index("--model") + 1].split(",")}
    checkpoints = {p for s in stages if not s.name.startswith("eval_") for p in s.outputs
                   if p.endswith((".pt", ".gguf"))}
    assert checkpoints - evaluated == {"out/x/rm.pt"}  # every model by evaluate.py; the RM by reward.py's log


# -----------------------------------------------------------------------------
# report.py


@given(st.lists(st.floats(-100, 100), min_size=2, max_size=30), st.floats(-5, 5))
def test_paired_difference_is_the_mean_difference_with_its_interval(a, shift):
    b = [x - shift for x in a]  # every prompt differs by shift: the interval is that point
    m, lo, hi = report.paired_difference(a, b)
    assert m == pytest.approx(shift, abs=1e-9) and lo == pytest.approx(shift, abs=1e-6)
    assert hi == pytest.approx(shift, abs=1e-6)


def test_paired_difference_matches_a_direct_computation():
    a, b = [1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 1.0]
    d = [1, 0, 0, 1, -1]
    se = math.sqrt(sum((x - 0.2) ** 2 for x in d) / 4 / 5)
    assert report.paired_difference(a, b) == pytest.approx((0.2, 0.2 - 1.959964 * se, 0.2 + 1.959964 * se))
    assert report.standard_error([1.0]) == 0
    with pytest.raises(ValueError):
        report.paired_difference([1.0], [1.0, 2.0])


def fake_evals(out, plan, rng):
    """Metrics files as the demo's stages write them (evaluate.py's JSON, training logs), random numbers. out:
    relative to the repository root, as the stages' paths are."""
    models_out, out = out, os.path.join(ROOT, out)
    os.makedirs(os.path.join(out, "evals"), exist_ok=True)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    def write(name, models, keys, n=12):
        rows, per_item = [], {}
        for m in models:
            items = {k: [rng.random() for _ in range(n)] for k in ("gold_reward", "accuracy", "safety", "kl_ref")}
            per_item[m] = items
            rows.append({"model": m, **{k: sum(v) / n for k, v in items.items()},
                         **{k: rng.random() * 100 for k in keys}})
        with open(os.path.join(out, "evals", f"{name}.json"), "w") as f:
            json.dump({"results": rows, "per_item": per_item}, f)

    for key, path in plan["aligned"].items():
        write(f"{key}_t1", [path], [])
        write(f"{key}_greedy", [path], [])
    for key, leg in plan["legs"].items():
        for k in range(1, len(leg)):
            write(f"{key}.{k}_t1", [leg[k - 1]], [])
    write("plain", [os.path.join(models_out, "base.pt"), os.path.join(models_out, "sft_plain.pt")], [])
    for key, path in plan["compressed"].items():
        write(f"{key}_compressed", [path], ["params", "size_mb", "ppl", "decode_tok_s"])
    for kind in ("prune", "quant"):
        write(f"sweep_{kind}", [p for k, *_, p in plan["sweep"] if k == kind], ["ppl"])
    with open(os.path.join(out, "logs", "rm.jsonl"), "w") as f:
        for step in range(3):
            f.write(json.dumps({"step": step + 1, "loss": 0.7 - step / 10}) + "\n")
        f.write(json.dumps({"step": 4, "loss": 0.3, "eval_accuracy": 0.7, "gold_accuracy": 0.8,
                            "rm_gold_agreement": 0.75}) + "\n")


def check_every_cell(out):
    """Every number of report.json recomputed from the file it names; counts them."""
    payload = json.load(open(os.path.join(ROOT, out, "report.json")))
    n = 0
    for t in payload["tables"]:
        for row in t["rows"]:
            for col in t["columns"]:
                c = row.get(col)
                for one in ([] if c is None else [c] if isinstance(c, dict) else c):
                    assert report.resolve(one, ROOT) == pytest.approx(one["value"], rel=1e-12, abs=1e-12), \
                        (t["title"], row["label"], col)
                    n += 1
    return payload, n


def test_report_numbers_equal_the_metrics_files(tmp_path):
    import random
    out = os.path.relpath(tmp_path / "demo", ROOT)
    _, plan = demo.chain(out, fast=False)
    fake_evals(out, plan, random.Random(0))
    text = report.build(out, plan, fast=False)
    payload, n = check_every_cell(out)
    assert n > 150
    # a number in the markdown is the cell's value: the chain table's first gold reward
    first = payload["tables"][0]["rows"][0]["gold_reward"]
    assert report.fmt(first[0]["value"]) in text and "±" in text and "[" in text
    # and the cell is what the file says, independently of report.resolve
    evals = json.load(open(os.path.join(ROOT, out, "evals", "base_t1.json")))
    assert first[0]["value"] == evals["results"][0]["gold_reward"]
    items = evals["per_item"][plan["aligned"]["base"]]["gold_reward"]
    assert first[1]["value"] == pytest.approx(
        math.sqrt(sum((x - sum(items) / 12) ** 2 for x in items) / 11 / 12), rel=1e-12)


def test_the_readme_section_is_the_report(tmp_path):
    """report.py --readme: the text between the markers becomes report.md (less its title), the rest is kept,
    figures are copied beside the README and linked there."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("## Title\n\n| a | b |\n\n![fig.png](fig.png)\n")
    (out / "report.json").write_text(json.dumps({"figures": ["fig.png"]}))
    (out / "fig.png").write_bytes(b"png")
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- demo report: start -->\nold\n<!-- demo report: end -->\nafter\n")
    report.put_in_readme(str(out), readme=str(readme), figures_dir=str(tmp_path / "docs"))
    text = readme.read_text()
    assert text == ("before\n<!-- demo report: start -->\n\n| a | b |\n\n"
                    f"![fig.png]({tmp_path / 'docs'}/fig.png)\n<!-- demo report: end -->\nafter\n")
    assert (tmp_path / "docs" / "fig.png").read_bytes() == b"png"
    with pytest.raises(SystemExit, match="markers"):
        report.put_in_readme(str(out), readme=str(readme), name="demo-real")


@pytest.mark.skipif(not os.environ.get("DEMO_OUT"), reason="set by make demo after a run: DEMO_OUT=out/demo")
def test_the_demo_report_equals_its_metrics_files():
    """After `make demo` (or FAST=1, or demo-real): the real report, every cell against the real metrics files."""
    payload, n = check_every_cell(os.environ["DEMO_OUT"])
    assert n > 100 and payload["tables"]  # make demo: ~300 cells; demo-real: ~125
