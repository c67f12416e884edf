"""
The demo's report, built from the stages' metrics files and nothing else: out/demo/report.md, report.json and,
when matplotlib is installed (an optional extra: pip install matplotlib), PNG figures beside them.

    python scripts/report.py out/demo                 # rebuild the report from what the stages wrote
    python scripts/report.py out/demo --readme        # and put report.md into README.md between its markers

Spread. Every mean over prompts carries its standard error over prompts (evaluate.py's per_item: each prompt's
score, the mean of --samples sampled responses); a model is compared with SFT prompt by prompt (the same prompts
in the same order): the paired difference's mean with its 95% interval, mean +- 1.96 standard errors of the
differences. A difference whose interval holds 0 is "within noise" and the report says so. These are intervals
over prompts for one training run of each method; they do not include seed-to-seed variation of training.

report.json keeps every number of every table as a cell {"value", "src": [[file, key, ...]], "fn"}: fn "value"
is the number at that key path of that file; "se", "diff" and "diff_ci" are computed from per_item lists (the
test tests/test_demo.py recomputes every cell from its sources).
"""

import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from evaluate import standard_error  # noqa: E402  (the one evaluate.py's JSON "stderr" holds)

Z95 = 1.959963984540054


# -----------------------------------------------------------------------------
# Numbers: pure functions


def paired_difference(a, b):
    """Prompt-by-prompt difference a - b over the same prompts -> (mean, lo, hi): the 95% normal interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs two lists of one length, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, se = sum(d) / len(d), standard_error(d)
    return m, m - Z95 * se, m + Z95 * se


def resolve(cell, root):
    """The number a report cell stands for, recomputed from its source files (root: the demo directory's parent
    for relative paths)."""
    vals = []
    for src in cell["src"]:
        with open(os.path.join(root, src[0])) as f:  # a JSONL file is the list of its lines
            v = [json.loads(x) for x in f if x.strip()] if src[0].endswith(".jsonl") else json.load(f)
        for k in src[1:]:
            v = v[k]
        vals.append(v)
    fn = cell["fn"]
    if fn == "value":
        return vals[0]
    if fn == "se":
        return standard_error(vals[0])
    if fn in ("diff", "diff_lo", "diff_hi"):
        return paired_difference(vals[0], vals[1])[("diff", "diff_lo", "diff_hi").index(fn)]
    raise ValueError(f"unknown cell function {fn!r}")


# -----------------------------------------------------------------------------
# Reading the metrics files


class Sources:
    """The metrics files of one demo directory; cells made from them remember where each number came from."""

    def __init__(self, out):
        self.out = out
        self.loaded = {}  # name -> parsed JSON (None: absent or unreadable); each file is read once

    def path(self, name):
        return os.path.join(self.out, name)

    def load(self, name):
        if name not in self.loaded:
            try:
                with open(os.path.join(ROOT, self.path(name))) as f:
                    self.loaded[name] = json.load(f)
            except (OSError, ValueError):
                self.loaded[name] = None
        return self.loaded[name]

    def eval_cell(self, name, model, key, fn="value"):
        """A cell from evals/NAME.json: the results row of `model` at `key` (fn value), or its standard error."""
        data = self.load(f"evals/{name}.json")
        if data is None or model not in [r["model"] for r in data["results"]]:
            return None
        file = self.path(f"evals/{name}.json")
        idx = [r["model"] for r in data["results"]].index(model)
        if fn == "value":
            if data["results"][idx].get(key) is None:
                return None
            return cell(data["results"][idx][key], [[file, "results", idx, key]], "value")
        items = data.get("per_item", {}).get(model, {}).get(key)
        if items is None:
            return None
        return cell(standard_error(items), [[file, "per_item", model, key]], "se")

    def diff_cells(self, name, model, base_name, base_model, key):
        a, b = self.load(f"evals/{name}.json"), self.load(f"evals/{base_name}.json")
        if a is None or b is None or key not in a["per_item"].get(model, {}) or \
                key not in b["per_item"].get(base_model, {}):
            return None
        src = [[self.path(f"evals/{name}.json"), "per_item", model, key],
               [self.path(f"evals/{base_name}.json"), "per_item", base_model, key]]
        d = paired_difference(a["per_item"][model][key], b["per_item"][base_model][key])
        return [cell(v, src, fn) for v, fn in zip(d, ("diff", "diff_lo", "diff_hi"))]

    def log(self, name):
        """A training log (JSONL), [] if absent."""
        try:
            with open(os.path.join(ROOT, self.path(f"logs/{name}.jsonl"))) as f:
                return [json.loads(line) for line in f if line.strip()]
        except OSError:
            return []


def cell(value, src, fn):
    return {"value": value, "src": src, "fn": fn}


def fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return "nan"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"


# -----------------------------------------------------------------------------
# Tables


def table(title, columns, rows, note=""):
    """rows: [(label, {column: cell or None or [mean, se] cells or a diff triple})] -> a report table."""
    return {"title": title, "columns": columns, "rows": [{"label": label, **cells} for label, cells in rows],
            "note": note}


def render_cell(c):
    if c is None:
        return ""
    if isinstance(c, dict):
        return fmt(c["value"])
    if len(c) == 2:  # mean, standard error
        return f"{fmt(c[0]['value'])} ± {fmt(c[1]['value'])}" if c[1] else fmt(c[0]["value"])
    m, lo, hi = (x["value"] for x in c)  # a paired difference
    noise = " (within noise)" if lo <= 0 <= hi else ""
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]{noise}"


def render_table(t):
    lines = [f"### {t['title']}", "", "| model | " + " | ".join(t["columns"]) + " |",
             "|---|" + "---:|" * len(t["columns"])]
    for r in t["rows"]:
        lines.append(f"| {r['label']} | " + " | ".join(render_cell(r.get(c)) for c in t["columns"]) + " |")
    if t["note"]:
        lines += ["", t["note"]]
    return "\n".join(lines)


def alignment_tables(src, plan):
    names = list(plan["aligned"])
    out = []
    for mode, title in (("t1", "The alignment chain, sampled at temperature 1 (the policies' own distributions)"),
                        ("greedy", "The same models, greedy")):
        rows = []
        for key in names:
            name, model = f"{key}_{mode}", plan["aligned"][key]
            cells = {}
            for col in ("gold_reward", "accuracy", "safety"):
                m = src.eval_cell(name, model, col)
                cells[col] = [m, src.eval_cell(name, model, col, "se")] if m else None
            if mode == "t1":
                cells["kl_ref"] = src.eval_cell(name, model, "kl_ref")
            rows.append((key, cells))
        cols = ["gold_reward", "accuracy", "safety"] + (["kl_ref"] if mode == "t1" else [])
        note = ("Mean ± standard error over prompts (200 held-out tasks for gold reward and accuracy, 100 held-out "
                "red-team prompts for safety); kl_ref: nats per response to SFT along the policy's own samples."
                if mode == "t1" else "")
        out.append(table(title, cols, rows, note))
        diffs = []
        for key in names:
            if key == "sft":
                continue
            cells = {col: src.diff_cells(f"{key}_{mode}", plan["aligned"][key], f"sft_{mode}", plan["aligned"]["sft"],
                                         col) for col in ("gold_reward", "accuracy", "safety")}
            diffs.append((f"{key} - sft", cells))
        out.append(table(f"Against SFT, prompt by prompt ({'temperature 1' if mode == 't1' else 'greedy'})",
                         ["gold_reward", "accuracy", "safety"], diffs,
                         "Paired difference over the same prompts, mean [95% interval]; 'within noise' where the "
                         "interval holds 0."))
    return out


def legs_table(src, plan):
    """The points of the gold-vs-KL figure: each method after each leg of its training, sampled at T = 1."""
    rows = []
    for key, paths in plan["legs"].items():
        for k, path in enumerate(paths):
            name = f"{key}.{k + 1}_t1" if k < len(paths) - 1 else f"{key}_t1"
            g = src.eval_cell(name, path, "gold_reward")
            rows.append((f"{key}, leg {k + 1} of {len(paths)}", {
                "kl_ref": src.eval_cell(name, path, "kl_ref"),
                "gold_reward": [g, src.eval_cell(name, path, "gold_reward", "se")] if g else None}))
    return table("Gold reward against KL to SFT after each leg of training (temperature 1; the figure's points)",
                 ["kl_ref", "gold_reward"], rows, "The earlier legs are sampled once a prompt, the last twice (its row "
                 "of the first table): their standard errors are larger.")


def ablation_table(src, out):
    base, plain = os.path.join(out, "base.pt"), os.path.join(out, "sft_plain.pt")
    rows = []
    for label, model in (("base, plain prompt", base), ("plain SFT, plain prompt", plain)):
        cells = {}
        for col in ("gold_reward", "accuracy", "safety"):
            m = src.eval_cell("plain", model, col)
            cells[col] = [m, src.eval_cell("plain", model, col, "se")] if m else None
        rows.append((label, cells))
    return table("The no-template ablation (greedy, prompted as 'User: ...\\nAssistant: ')",
                 ["gold_reward", "accuracy", "safety"], rows)


def compression_table(src, plan):
    rows = []
    for key, model in plan["compressed"].items():
        name = f"{key}_compressed"
        cells = {c: src.eval_cell(name, model, c) for c in ("params", "size_mb", "ppl", "decode_tok_s")}
        for col in ("accuracy", "gold_reward"):
            m = src.eval_cell(name, model, col)
            cells[col] = [m, src.eval_cell(name, model, col, "se")] if m else None
        rows.append((key, cells))
    return table("Compression of the SFT model (greedy)", ["params", "size_mb", "ppl", "accuracy", "gold_reward",
                                                            "decode_tok_s"], rows,
                 "ppl: perplexity of the good replies to the 200 held-out task prompts (eval_chats.jsonl, text "
                 "no stage trains on); size_mb: the file (with the optimiser state where a training run wrote it); "
                 "decode_tok_s: batch 4 on one CPU thread beside another stage (a rough guide, not a benchmark).")


def sweep_table(src, plan):
    rows = []
    for kind, method, knob, path in plan["sweep"]:
        label = f"{method}, {knob:.0%} sparse" if kind == "prune" else f"{method}, {knob} bits"
        rows.append((label, {"ppl": src.eval_cell(f"sweep_{kind}", path, "ppl")}))
    return table("Perplexity against sparsity and bits (the figures' points)", ["ppl"], rows,
                 "The same held-out replies; quantisation in groups of 32 weights; QAT starts from GPTQ at its bits.")


def rm_table(src):
    log = src.log("rm")
    last = next((r for r in reversed(log) if "eval_accuracy" in r), None)
    if last is None:
        return None
    idx = log.index(last)
    file = src.path("logs/rm.jsonl")
    cells = {k: cell(last[k], [[file, idx, k]], "value") for k in ("eval_accuracy", "gold_accuracy",
                                                                          "rm_gold_agreement") if k in last}
    return table("The reward model (held-out preference pairs)", list(cells), [("rm.pt", cells)],
                 "eval_accuracy: the RM agrees with the noisy held-out labels; gold_accuracy: the gold reward's own "
                 "agreement with them (the ceiling); rm_gold_agreement: the RM orders pairs as the gold reward does.")


# -----------------------------------------------------------------------------
# Figures (matplotlib, optional)


def figures(src, plan, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(os.path.join(ROOT, path), dpi=110)
        plt.close(fig)
        made.append(name)

    # training curves: every stage's loss (PPO / GRPO: the reward-model score), against its steps
    # (title, the logs in order, the training key, its held-out twin)
    curves = [("base", ["base"], "loss", "eval_loss"), ("sft", ["sft"], "loss", "eval_loss"),
              ("sft_plain", ["sft_plain"], "loss", "eval_loss"), ("rm", ["rm"], "loss", "eval_loss"),
              ("dpo", ["dpo.1", "dpo.2", "dpo.3"], "loss", "eval_loss"),
              ("ppo", ["ppo.1", "ppo.2", "ppo.3"], "score", None),
              ("grpo", ["grpo.1", "grpo.2", "grpo.3"], "score", None),
              ("student_kd", ["student_kd"], "kd", "eval_kd"), ("student_sft", ["student_sft"], "loss", "eval_loss"),
              ("sparsegpt50_healed", ["sparsegpt50_healed"], "kd", "eval_kd"), ("qat4", ["qat4"], "loss", "eval_loss"),
              ("qat2", ["qat2"], "loss", "eval_loss")]
    curves = [(t, [r for n in names for r in src.log(n)], k, ek) for t, names, k, ek in curves]
    curves = [c for c in curves if c[1]]
    if curves:
        cols = 4
        fig, axes = plt.subplots((len(curves) + cols - 1) // cols, cols, figsize=(14, 2.8 * ((len(curves) + 3) // 4)),
                                 squeeze=False)
        for ax, (title, records, key, eval_key) in zip(axes.flat, curves):
            pts = [(r["step"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label="training")
            evals = [(r["step"], r[eval_key]) for r in records if eval_key in r]
            if evals:
                ax.plot([p[0] for p in evals], [p[1] for p in evals], "o-", ms=3, label="held-out")
                ax.legend(fontsize=7)
            ax.set_title(f"{title}: {key}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(curves):]:
            ax.axis("off")
        save(fig, "curves.png")

    # gold reward against KL to SFT: SFT at 0, then each leg of DPO, PPO, GRPO
    sft = src.eval_cell("sft_t1", plan["aligned"]["sft"], "gold_reward")
    if sft:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, colour in (("dpo", "C0"), ("ppo", "C1"), ("grpo", "C2")):
            pts = [(0.0, sft["value"], 0.0)]
            for k, path in enumerate(plan["legs"][key]):
                name = f"{key}.{k + 1}_t1" if k < len(plan["legs"][key]) - 1 else f"{key}_t1"
                g, kl = src.eval_cell(name, path, "gold_reward"), src.eval_cell(name, path, "kl_ref")
                se = src.eval_cell(name, path, "gold_reward", "se")
                if g and kl:
                    pts.append((kl["value"], g["value"], se["value"] if se else 0.0))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", color=colour,
                        label=key.upper(), capsize=3)
            for i, (x, y, _) in enumerate(pts[1:]):
                ax.annotate(f"{i + 1}/{len(pts) - 1}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            color=colour)
        ax.set_xlabel("KL to SFT (nats per response, along the policy's samples)")
        ax.set_ylabel("gold reward (T = 1, ± s.e.)")
        ax.set_title("Gold reward against KL to SFT, after each leg of training", fontsize=9)
        ax.legend()
        save(fig, "gold_vs_kl.png")

    float_ppl = src.eval_cell("sft_compressed", plan["compressed"]["sft"], "ppl")
    for kind, xlabel, name in (("quant", "bits per weight (groups of 32)", "ppl_vs_bits.png"),
                               ("prune", "sparsity (fraction of each row set to zero)", "ppl_vs_sparsity.png")):
        if src.load(f"evals/sweep_{kind}.json"):
            fig, ax = plt.subplots(figsize=(6, 4))
            methods = sorted({m for k, m, *_ in plan["sweep"] if k == kind}, key=lambda m: [
                x[1] for x in plan["sweep"]].index(m))
            for method in methods:
                pts = [(knob, src.eval_cell(f"sweep_{kind}", path, "ppl")) for k, m, knob, path in plan["sweep"]
                       if k == kind and m == method]
                pts = [(x, c["value"]) for x, c in pts if c]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            if float_ppl:
                ax.axhline(float_ppl["value"], color="grey", ls="--", label="SFT (float)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity (held-out replies)")
            if kind == "quant":
                ax.invert_xaxis()
            else:
                ax.set_yscale("log")
            ax.legend()
            save(fig, name)
    return made


# -----------------------------------------------------------------------------


def stage_seconds(out):
    d = os.path.join(ROOT, out, "stamps")
    got = {}
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if f.endswith(".json"):
            try:
                got[f[:-5]] = json.load(open(os.path.join(d, f)))["seconds"]
            except (OSError, ValueError, KeyError):
                pass
    return got


def build(out, plan, fast):
    """Write out/report.md and out/report.json (and figures) from the metrics files; returns the markdown."""
    src = Sources(out)
    tables = alignment_tables(src, plan) + [legs_table(src, plan), ablation_table(src, out)]
    rm = rm_table(src)
    if rm:
        tables.append(rm)
    tables += [compression_table(src, plan), sweep_table(src, plan)]
    made = figures(src, plan, out)
    secs = stage_seconds(out)
    md = [f"## Results on the built-in world (`{'make demo FAST=1' if fast else 'make demo'}`)", "",
          "Every number below was written by a stage of `scripts/demo.py` into a metrics file in "
          f"`{out}/` (evals/*.json, logs/*.jsonl) and copied here by `scripts/report.py`.", ""]
    if fast:
        md += ["FAST: a few steps per stage and 20 prompts per evaluation, a smoke run: the numbers mean nothing.", ""]
    for t in tables:
        md += [render_table(t), ""]
    if made:
        md += ["### Figures", ""] + [f"![{m}]({m})" for m in made] + [""]
    if secs:
        md += [f"Stages: {len(secs)}, {sum(secs.values()) / 60:.1f} minutes of stage time in all (two at a time)."]
    text = "\n".join(md).rstrip() + "\n"
    write_report(out, text, {"tables": tables, "figures": made, "stage_seconds": secs, "fast": fast})
    return text


def build_real(out, plan, fast):
    """make demo-real's report: one row per SmolLM2 variant, and llama.cpp's agreement where it ran."""
    src = Sources(out)
    rows = []
    for key, model in plan["real"].items():
        cells = {c: src.eval_cell(key, model, c) for c in ("params", "size_mb", "ppl", "bpb", "decode_tok_s")}
        for col in ("accuracy", "gold_reward"):
            m = src.eval_cell(key, model, col)
            cells[col] = [m, src.eval_cell(key, model, col, "se")] if m else None
        rows.append((key, cells))
    tables = [table("SmolLM2-135M-Instruct, compressed", ["params", "size_mb", "ppl", "bpb", "accuracy",
                                                           "gold_reward", "decode_tok_s"], rows,
                    "ppl / bpb: the first 20,000 characters of the pydoc text (windows of 512, stride 256); accuracy "
                    "and gold_reward: greedy on the world's held-out tasks (the untuned model, so low); size_mb: the "
                    "file (float: the Q4_1 GGUF it was read from); decode_tok_s: batch 1, one CPU thread beside "
                    "another stage; gptq3 decodes dequantised (no int3 CPU kernel), so at the float's speed.")]
    llama = src.load("evals/llama_cpp.json")
    if llama:
        file = src.path("evals/llama_cpp.json")
        tables.append(table("Our GGUF files in llama.cpp (greedy tokens equal to ours)", ["equal", "tokens"],
                            [(k, {c: cell(v[c], [[file, k, c]], "value") for c in ("equal", "tokens")})
                             for k, v in llama.items()]))
    md = [f"## SmolLM2-135M-Instruct compressed (`make demo-real{' FAST=1' if fast else ''}`)", "",
          f"Every number below was written by a stage of `scripts/demo.py --real` into `{out}/evals/` and copied "
          "here by `scripts/report.py`.", ""]
    md += [x for t in tables for x in (render_table(t), "")]
    if not llama:
        md += ["llama.cpp did not run here (llama-cpp-python is not installed; `make bench-gguf` builds it).", ""]
    secs = stage_seconds(out)
    if secs:
        md += [f"Stages: {len(secs)}, {sum(secs.values()) / 60:.1f} minutes of stage time in all (two at a time)."]
    text = "\n".join(md).rstrip() + "\n"
    write_report(out, text, {"tables": tables, "figures": [], "stage_seconds": secs, "fast": fast})
    return text


def write_report(out, text, payload):
    for name, body in (("report.md", text), ("report.json", json.dumps(payload, indent=1))):
        tmp = os.path.join(ROOT, out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(body)
        os.replace(tmp, os.path.join(ROOT, out, name))


def put_in_readme(out, readme="README.md", figures_dir="docs/demo", name="demo"):
    """Replace the README's text between its two markers with out/report.md less its title; its figures are
    copied to docs/demo/ (out/ is not in the repository) and linked from there."""
    import shutil
    path = os.path.join(ROOT, readme)
    text = open(path).read()
    start, end = f"<!-- {name} report: start -->", f"<!-- {name} report: end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: no '{start}' ... '{end}' markers to replace between")
    body = open(os.path.join(ROOT, out, "report.md")).read()
    body = "\n".join(body.splitlines()[1:]) + "\n"  # the README's section has its own title
    for m in json.load(open(os.path.join(ROOT, out, "report.json")))["figures"]:
        os.makedirs(os.path.join(ROOT, figures_dir), exist_ok=True)
        shutil.copy(os.path.join(ROOT, out, m), os.path.join(ROOT, figures_dir, m))
        body = body.replace(f"]({m})", f"]({figures_dir}/{m})")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path + ".tmp", "w") as f:
        f.write(head + start + "\n" + body + end + tail)
    os.replace(path + ".tmp", path)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="out/demo")
    p.add_argument("--fast", action="store_true", help="the directory is a --fast run's")
    p.add_argument("--real", action="store_true", help="the directory is a --real run's (make demo-real)")
    p.add_argument("--readme", action="store_true", help="also replace README.md's demo section with the report")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import demo
    _, plan = (demo.chain_real if args.real else demo.chain)(args.out, args.fast)
    print((build_real if args.real else build)(args.out, plan, args.fast))
    if args.readme:
        put_in_readme(args.out, name="demo-real" if args.real else "demo")


if __name__ == "__main__":
    main()
