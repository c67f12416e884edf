"""Helper for tests/test_fsdp.py: FSDP2, DDP, a sharded checkpoint and tensor-parallel decoding on 2 ranks (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_worker.py scripts OUT_DIR TOY_DIR

Every rank builds the same tiny model (seed 0) and the same batch with uneven loss masks and takes its own rows;
the one-process references come from the same functions called in the test's own process. Rank 0 writes:
  OUT_DIR/fsdp.pt, ddp.pt   {"grads": the first step's gradients, "params": the weights after STEPS AdamW steps,
                             "losses": each step's loss, "logits": the trained model's logits on PROBE}
  OUT_DIR/ckpt.pt, ckpt.dcp the FSDP run saved by parallel.save_fsdp: one gathered file and the sharded directory
  OUT_DIR/tp.pt             {preset: {"logits": ..., "tokens": greedy tokens of PROMPTS}} of the model split TP=2
  OUT_DIR/eval-tp.json, eval-tp.jsonl   evaluate.py --tp's results and responses on eval_args(OUT_DIR)'s files
`scripts` runs ppo.py and qat.py through their main() on these ranks, from the files the test wrote to OUT_DIR
(policy.pt, rm.pt, base.pt, chats.jsonl) and the world's prompts in TOY_DIR; every run writes NAME.pt (and
NAME.dcp with --fsdp), ppo.py's runs NAME.jsonl too:
  ppo-fsdp, ppo-ddp     ppo_args' PPO_STEPS steps under --fsdp and under DDP
  ppo-half, ppo-resumed --fsdp stopped after 1 step, then resumed from ppo-half.dcp to PPO_STEPS
  qat-fsdp, qat-half    qat_args' QAT_STEPS steps under --fsdp, and the same stopped after 2
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import model as M  # noqa: E402
import parallel as P  # noqa: E402
import ppo  # noqa: E402
import qat  # noqa: E402
import sft  # noqa: E402

STEPS, LR = 3, 1e-3
PPO_STEPS, PPO_UPDATES = 3, 3 * 2 * 2  # rollouts; optimiser steps: x --ppo-epochs 2 x --minibatches 2 (defaults)
QAT_STEPS = 4
PROBE = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))  # (B, T)
PROMPTS = [[72, 101, 108, 108, 111], [87, 104, 97, 116, 32, 105, 115, 32, 50]]  # two lengths: left padding


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (4, 16), generator=g)  # (B, T), the same batch on every rank
    mask = (torch.rand(4, 16, generator=g) < torch.tensor([[0.9], [0.3], [0.6], [0.5]])).long()  # uneven counts
    return ids, mask


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(kind, rank, world, out=""):
    """STEPS steps of AdamW (weight decay, gradient clipping) through common.wrap_for_training, as sft.py takes them:
    the summed token loss over the GLOBAL token count, times world (DDP and FSDP average gradients over ranks)."""
    torch.manual_seed(0)
    enc = C.get_tokenizer("byte")
    net = M.build_model("tiny", enc, n_layer=2, d_model=64, d_ff=128, max_seq_len=64)
    cfg = sft.Config(lr=LR, weight_decay=0.1, fsdp=kind == "fsdp", out=out)
    model, raw, opt = C.wrap_for_training(net, cfg, None, world, torch.device("cpu"))
    ids, mask = batch()
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    grads, losses = {}, []
    for step in range(STEPS):
        nll = -M.token_logprobs(model(ids[rows]), ids[rows], mask[rows]).sum()
        count = C.all_reduce_sum(mask[rows, 1:].sum().float())  # position 0 is never a target
        (nll / count * world).backward()
        losses.append(C.all_reduce_sum(nll.detach()) / count)
        if step == 0:
            grads = {n: full(p.grad).clone() for n, p in raw.named_parameters()}
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = {n: full(p.detach()).clone() for n, p in raw.named_parameters()}
    raw.eval()
    with torch.no_grad():
        logits = raw(PROBE)
    raw.train()
    if out:  # every rank: its shards to ckpt.dcp, the gathered file from rank 0
        P.save_fsdp(cfg, raw, enc, opt, STEPS, {"loss": losses[-1].item()}, ["test"], rank)
    return {"grads": grads, "params": params, "losses": torch.stack(losses), "logits": logits}


def tp_model(preset):
    """A tiny model of `preset` (seed 0) with weights larger than the init, so a wrong split would show."""
    torch.manual_seed(0)
    model = M.build_model(preset, C.get_tokenizer("byte"), n_layer=2, dropout=0.0).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def decode(model):
    with torch.no_grad():
        logits = model(PROBE)
        tokens = M.generate(model, PROMPTS, 8, temperature=0, pad_id=0)[0]
    return {"logits": logits, "tokens": tokens}


def eval_args(out_dir, write=False):
    """evaluate.py's flags for two tiny models (llama with GQA, gpt2) and their files, written if `write`."""
    models = [os.path.join(out_dir, f"{preset}.pt") for preset in ("tiny", "tiny-gpt2")]
    data, text = os.path.join(out_dir, "eval.jsonl"), os.path.join(out_dir, "text.txt")
    if write:
        for path, preset in zip(models, ("tiny", "tiny-gpt2")):
            C.save_checkpoint(path, tp_model(preset), C.get_tokenizer("byte"))
        C.write_jsonl(data, [{"prompt": f"What is {a} + 2?", "answer": str(a + 2)} for a in range(4)])
        with open(text, "w") as f:
            f.write("The quick brown fox jumps over the lazy dog. " * 8)
    return ["--model", ",".join(models), "--data", data, "--text", text, "--max-new-tokens", "6", "--no-speed",
            "--device", "cpu"]


def ppo_args(out_dir, toy_dir, name, *extra):
    """PPO with a critic (initialised from the reward model), sampled at temperature 1 from per-rank seeds, and the
    held-out prompts sampled greedily on rank 0 alone before and after training."""
    path = os.path.join(out_dir, name)
    return ["--model", os.path.join(out_dir, "policy.pt"), "--reward-model", os.path.join(out_dir, "rm.pt"),
            "--data", os.path.join(toy_dir, "prompts.jsonl"), "--eval-data", os.path.join(toy_dir, "eval.jsonl"),
            "--eval-limit", "4", "--eval-every", "0", "--steps", str(PPO_STEPS), "--batch-size", "2",
            "--max-new-tokens", "8", "--lr", str(LR), "--warmup", "1", "--debug-logprobs-every", "1",
            "--device", "cpu", "--out", path + ".pt", "--log", path + ".jsonl", *extra]


def qat_args(out_dir, name, *extra, batch_size=2):
    """QAT of the float base on RTN's int4 grid, the scales learned (LSQ), the data's tokens as targets."""
    return ["--model", os.path.join(out_dir, "base.pt"), "--data", os.path.join(out_dir, "chats.jsonl"),
            "--out", os.path.join(out_dir, name + ".pt"), "--steps", str(QAT_STEPS), "--batch-size", str(batch_size),
            "--seq-len", "64", "--group-size", "32", "--learn-scales", "--eval-frac", "0", "--eval-every", "0",
            "--lr", str(LR), "--warmup", "1", "--device", "cpu", *extra]


def scripts(out_dir, toy_dir):
    ppo.main(ppo_args(out_dir, toy_dir, "ppo-fsdp", "--fsdp"))
    ppo.main(ppo_args(out_dir, toy_dir, "ppo-ddp"))
    ppo.main(ppo_args(out_dir, toy_dir, "ppo-half", "--fsdp", "--stop-at", "1"))
    ppo.main(ppo_args(out_dir, toy_dir, "ppo-resumed", "--fsdp", "--resume", os.path.join(out_dir, "ppo-half.dcp")))
    qat.main(qat_args(out_dir, "qat-fsdp", "--fsdp"))
    qat.main(qat_args(out_dir, "qat-half", "--fsdp", "--stop-at", "2"))


def main():
    from torch.distributed.device_mesh import init_device_mesh
    import evaluate
    rank, world, device = C.setup_ddp("cpu")
    if sys.argv[1] == "scripts":
        return scripts(*sys.argv[2:])
    out_dir = sys.argv[1]
    results = {kind: train(kind, rank, world, os.path.join(out_dir, "ckpt.pt") if kind == "fsdp" else "")
               for kind in ("fsdp", "ddp")}
    mesh = init_device_mesh("cpu", (world,))
    tp = {preset: decode(P.tensor_parallel(tp_model(preset), mesh)) for preset in ("tiny", "tiny-gpt2")}
    if rank == 0:
        for kind, result in results.items():
            torch.save(result, os.path.join(out_dir, f"{kind}.pt"))
        torch.save(tp, os.path.join(out_dir, "tp.pt"))
    eval_args(out_dir, write=rank == 0)
    torch.distributed.barrier()  # rank 0's files written
    evaluate.main(["--tp", *eval_args(out_dir), "--out", os.path.join(out_dir, "eval-tp.json"),
                   "--responses", os.path.join(out_dir, "eval-tp.jsonl")])


if __name__ == "__main__":
    C.run(main)
