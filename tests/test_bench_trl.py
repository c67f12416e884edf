"""Benchmark: our sft.py / dpo.py training loops against TRL's SFTTrainer / DPOTrainer on the same model.

    make bench-trl      (installs trl, a benchmark-only dependency, then runs this; JSON in out/bench/trl.json)

"The same model": our transformer and its `export_hf` copy loaded by `transformers` (LlamaForCausalLM), the same
random weights, the same tokenised data (the built-in world's sft.jsonl and prefs.jsonl rendered with our ChatML
template and byte tokenizer, handed to TRL pre-tokenised), the same batch size, sequence length, optimiser
(AdamW, warmup + cosine, grad clip 1.0), fp32, same device and thread count. TRL's reference log-probs are
precomputed, as ours are cached.

Per-step cost is the median interval between consecutive optimiser-step ends (our scripts' per-step log call,
TRL's `on_step_end` callback), the first and last intervals dropped: everything a step does (batching, forward,
backward, clip, AdamW, logging) and nothing done once (imports, data preparation, reference caching, the final
evaluation and save). Epoch time = rows per epoch / batch size x seconds per step. Timings are measured, never
asserted; the assertions check only that both trainers ran their steps.
"""
import contextlib
import json
import os
import statistics
import time

import pytest
import torch

import common as C
import formats
import model as M
import sft
import dpo
from conftest import ROOT, hf_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

BATCH, SEQ_LEN, LR, WARMUP = 16, 256, 1e-4, 2


def make_models(tmp, preset):
    """Random weights -> our ckpt.pt and an HF directory holding the same tensors; -> (tokenizer, params)."""
    enc = C.get_tokenizer("byte")
    torch.manual_seed(0)
    net = M.build_model(preset, enc, dropout=0.0)
    C.save_checkpoint(str(tmp / "init.pt"), net, enc)
    formats.export_hf(net, enc, str(tmp / "hf"))
    return enc, net.num_params()


def trl_args(cls, tmp, steps, **kw):
    return cls(output_dir=str(tmp / "trl_out"), max_steps=steps, per_device_train_batch_size=BATCH,
               gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP,
               weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no",
               report_to="none", use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
               disable_tqdm=True, max_length=SEQ_LEN, **kw)


@contextlib.contextmanager
def our_step_clock(stamps):
    """Our scripts call model.log_jsonl once per optimiser step (with or without --log): time-stamp each call."""
    original = C.log_jsonl

    def stamped(path, record):
        stamps.append(time.perf_counter())
        original(path, record)
    C.log_jsonl = stamped
    try:
        yield
    finally:
        C.log_jsonl = original


class TRLStepClock(transformers.TrainerCallback):
    def __init__(self, stamps):
        self.stamps = stamps

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def step_seconds(stamps, steps):
    """Median and mean of the intervals between step ends, without the first and the last (one-off work)."""
    assert len(stamps) == steps, (len(stamps), steps)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][1:-1]
    return {"s_per_step": statistics.median(gaps), "s_per_step_mean": statistics.fmean(gaps)}


# ----------------------------------------------------------------------------- SFT

def bench_sft(tmp, toy_dir, enc, n):
    data = os.path.join(toy_dir, "sft.jsonl")
    examples, _ = sft.tokenize(sft.Config(data=data, seq_len=SEQ_LEN), enc)
    tok = hf_tokenizer(enc)
    train = datasets.Dataset.from_list([{"input_ids": ids, "assistant_masks": mask} for ids, mask in examples])
    pad = C.special_id(enc, "<|pad|>")
    out = {"examples": len(examples),
           "supervised_tokens_per_example": sum(sum(m[1:]) for _, m in examples) / len(examples)}

    def ours(packing):
        stamps = []
        with our_step_clock(stamps):
            sft.main(["--model", str(tmp / "init.pt"), "--data", data, "--out", str(tmp / "ours_sft.pt"),
                      "--steps", str(n), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--lr", str(LR),
                      "--warmup", str(WARMUP), "--eval-frac", "0", "--eval-every", "0", "--device", "cpu",
                      "--packing" if packing else "--no-packing"])
        return len(sft.make_rows(examples, sft.Config(seq_len=SEQ_LEN, packing=packing), pad)[0]), stamps

    def theirs(packing):
        stamps = []
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf"), attn_implementation="sdpa")
        args = trl_args(trl.SFTConfig, tmp, n, packing=packing, dataset_num_proc=None)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                                 callbacks=[TRLStepClock(stamps)])
        trainer.train()
        return len(trainer.train_dataset), stamps

    for packing in (False, True):
        for side, run in (("ours", ours), ("trl", theirs)):
            rows, stamps = run(packing)
            r = {"rows": rows, **step_seconds(stamps, n)}
            r["epoch_s_est"] = rows / BATCH * r["s_per_step"]
            r["examples_per_s"] = len(examples) / r["epoch_s_est"]
            out[f"{side}_{'packed' if packing else 'padded'}"] = r
    out["speedup_padded"] = out["trl_padded"]["s_per_step"] / out["ours_padded"]["s_per_step"]
    out["speedup_epoch_packed"] = out["trl_packed"]["epoch_s_est"] / out["ours_packed"]["epoch_s_est"]
    out["speedup_epoch_best"] = (min(out["trl_padded"]["epoch_s_est"], out["trl_packed"]["epoch_s_est"])
                                 / out["ours_packed"]["epoch_s_est"])
    return out


# ----------------------------------------------------------------------------- DPO

class PreTokenizedDPOTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer fed our {prompt_ids, chosen_ids, rejected_ids} rows as they are (its own preparation
    step only tokenises text into these same columns)."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset


def bench_dpo(tmp, toy_dir, enc, n):
    data = os.path.join(toy_dir, "prefs.jsonl")
    cfg = dpo.Config(data=data, seq_len=SEQ_LEN, eval_frac=0.0)
    train, _, _ = dpo.load_examples(cfg, enc)
    rows = []
    for ex in train:  # the exact token sequences ours trains on: shared prompt, then each response
        (chosen, start), (rejected, _) = ex["seqs"]
        rows.append({"prompt_ids": chosen[:start], "chosen_ids": chosen[start:], "rejected_ids": rejected[start:]})
    tok = hf_tokenizer(enc)
    pairs = datasets.Dataset.from_list(rows)
    out = {"pairs": len(rows)}

    def ours():
        stamps = []
        with our_step_clock(stamps):
            dpo.main(["--model", str(tmp / "init.pt"), "--data", data, "--out", str(tmp / "ours_dpo.pt"),
                      "--steps", str(n), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--lr", str(LR),
                      "--warmup", str(WARMUP), "--eval-frac", "0", "--eval-every", "0", "--kl-prompts", "0",
                      "--device", "cpu", "--loss", "sigmoid", "--beta", "0.1"])
        return stamps

    def theirs():
        stamps = []
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf"), attn_implementation="sdpa")
        args = trl_args(trl.DPOConfig, tmp, n, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                        precompute_ref_batch_size=64)
        PreTokenizedDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok,
                               callbacks=[TRLStepClock(stamps)]).train()
        return stamps

    for side, run in (("ours", ours), ("trl", theirs)):
        out[side] = step_seconds(run(), n)
        out[side]["pairs_per_s"] = BATCH / out[side]["s_per_step"]
    out["speedup"] = out["trl"]["s_per_step"] / out["ours"]["s_per_step"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_bench_vs_trl(tmp_path, toy_dir, preset):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    enc, params = make_models(tmp_path, preset)
    n = int(os.environ.get("BENCH_TRL_STEPS", "12"))
    result = {"preset": preset, "params": params,
              "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
              "device": "cpu", "torch_threads": torch.get_num_threads(), "batch_size": BATCH, "seq_len": SEQ_LEN,
              "steps_measured": n}
    result["sft"] = bench_sft(tmp_path, toy_dir, enc, n)
    result["dpo"] = bench_dpo(tmp_path, toy_dir, enc, n)
    path = os.path.join(ROOT, "out", "bench", f"trl_{preset}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    assert result["sft"]["ours_padded"]["s_per_step"] > 0 and result["sft"]["trl_padded"]["s_per_step"] > 0
    assert result["dpo"]["ours"]["s_per_step"] > 0 and result["dpo"]["trl"]["s_per_step"] > 0
