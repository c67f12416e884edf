"""
parallel.py: training and inference beyond one device's memory, beside DDP (common.setup_ddp, wrap_for_training).

  FSDP2     fully sharded data parallel (Zhao et al. 2023, "PyTorch FSDP"; torch's per-parameter `fully_shard`):
            each of N ranks keeps 1/N of every parameter, of its gradient and of its AdamW moments; a block's full
            weights exist only while it runs (all-gather before, reduce-scatter of its gradients after). `--fsdp`
            in sft.py, dpo.py, reward.py, distill.py, ppo.py (policy and critic) and qat.py goes through
            common.wrap_for_training: fully_shard on every transformer block, then on the root (embeddings, final
            norm, head). On GPU the weights compute in bf16 and gradients reduce in fp32 (MixedPrecisionPolicy; qat.py's
            fake-quantised model keeps fp32 weights). The arithmetic is DDP's: gradients averaged over
            ranks, so a script's `loss * world` convention holds unchanged. Measuring it on CPU: glibc keeps freed
            all-gather buffers in its heap (its mmap threshold grows to 32 MiB), hiding the saving from peak RSS;
            MALLOC_MMAP_THRESHOLD_=131072 returns them (gpt2 preset, 2 ranks: 3043 -> 1878 MiB per rank).
  DCP       sharded checkpoints (torch.distributed.checkpoint): every save of an --fsdp run writes each rank's
            shards to {out}.dcp/ (weights and AdamW state; the rest in its meta.pt, loadable with weights_only),
            and the one-file --out checkpoint of our schema, gathered on rank 0 (which holds the full weights and
            AdamW state in CPU memory while it writes). `--resume {out}.dcp` loads on any
            number of ranks, one process without torchrun included (DCP reshards on load). A DCP directory is
            trusted input: torch writes its .metadata as a pickle, so load only directories you wrote.
  offload   --offload-activations: the tensors a forward keeps for backward are copied to CPU memory and back in
            backward (torch.autograd.graph.save_on_cpu); parameters saved for backward are copied too. Beside
            --grad-checkpointing (recompute instead of store). Exact: the same gradients, bit for bit.
  TP        tensor-parallel inference (Megatron-LM, Shoeybi et al. 2019) with DTensor: q, k, v, gate, up split by
            output rows (ColwiseParallel), o and down by input columns (RowwiseParallel), so rank r holds query
            heads r*n_head/N.. and key/value heads r*n_kv_head/N.. and one all-reduce per attention and per MLP
            joins them; embeddings, norms and head replicated. Same `model.generate`; `evaluate.py --tp` uses it.

Departures: under --fsdp, eval mode holds the gathered weights (`shard`): evaluation and sampling loops differ in
length across ranks (each rank scores its share, generate stops early, ppo.py's rollouts end at different lengths),
which per-forward all-gathers cannot follow. --fsdp trains a dense model in full (no LoRA / prefix adapters, no
pruned or packed quantised model; qat.py's fake-quantised model trains its float weights).

    torchrun --nproc_per_node=2 sft.py --fsdp --model out/base.pt --data data/toy/sft.jsonl --out out/sft.pt
    torchrun --nproc_per_node=4 sft.py --fsdp --resume out/sft.dcp --model out/base.pt ...   # any N, 1 included
    python parallel.py dcp-to-ckpt out/sft.dcp out/sft-again.pt    # and back: ckpt-to-dcp out/sft.pt out/x.dcp
    torchrun --nproc_per_node=2 parallel.py generate --model out/sft.pt --prompt "What is 2 + 3?"   # TP=2
    torchrun --nproc_per_node=2 evaluate.py --tp --model out/sft.pt --data data/toy/eval.jsonl    # TP=2 evaluation
"""

import contextlib
import copy
import functools
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import common as C
import model as M

# -----------------------------------------------------------------------------
# FSDP2


def distributed():
    return dist.is_available() and dist.is_initialized()


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def check_fsdp(model, cfg):
    """What --fsdp trains: a dense model in full. Anything else is one line."""
    if C.peft_kind(cfg):
        raise M.UserError("--fsdp trains every weight: leave out --lora-rank / --peft (an adapter is small enough "
                          "for DDP: torchrun without --fsdp)")
    packed = any(hasattr(m, "qweight") for m in model.modules())  # quantize.QuantLinear (qat.py's layers hold floats)
    if packed or C.weight_masks(model):
        raise M.UserError("--fsdp trains a dense model: a quantised or pruned one trains with DDP (no --fsdp)")


def shard(model, device, dtype="auto"):
    """fully_shard every block, then the root, in place (one process without torchrun: left as it is). Gives the
    model DDP's `no_sync()` (FSDP2 spells it set_requires_gradient_sync) and makes eval mode hold the full weights:
    model.eval() all-gathers them once (every rank calls it at the same point), forwards then need no collective
    until model.train() frees them, so ranks may run evaluation and sampling loops of different lengths."""
    if not distributed():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy()
    fake_quant = getattr(model, "quant", None) is not None  # qat.py: w / s rounded in bf16 would leave its grid
    if device.type == "cuda" and dtype in ("auto", "bf16") and not fake_quant:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)  # the root's weights are the first backward needs
    model.no_sync = functools.partial(_no_sync, model)
    model.train = functools.partial(_train, model)
    if not model.training:  # the shards are training's state: a model sharded in eval mode gathers them now
        torch.nn.Module.train(model, True)
        model.train(False)
    return model


@contextlib.contextmanager
def _no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _train(model, mode=True):
    if mode != model.training:
        for m in fsdp_modules(model):  # in training the blocks free their gathered weights after forward, not the root
            m.set_reshard_after_forward(mode and m is not model, recurse=False)
            m.reshard() if mode else m.unshard()
    return torch.nn.Module.train(model, mode)


def offload_activations(model):
    """--offload-activations: every forward of `model` that records for backward runs under save_on_cpu."""
    active = []

    def enter(module, args):
        if torch.is_grad_enabled():
            active.append(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
            active[-1].__enter__()

    def leave(module, args, out):
        if active:
            active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    return model


# -----------------------------------------------------------------------------
# Checkpoints: full (one file, rank 0) and sharded (DCP directory, every rank)


def optimizer_names(model):
    """The parameter names in common.make_optimizer's order (matrices, then the rest): entry i of torch's own
    optimiser state dict is names[i]; torch.distributed.checkpoint keys the same state by name."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


def by_index(osd):
    """An optimiser state dict keyed by parameter name -> torch's own, keyed by position in the param groups."""
    index = {n: i for i, n in enumerate(n for g in osd["param_groups"] for n in g["params"])}
    return {"state": {index[n]: s for n, s in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def by_name(osd, names):
    """The inverse of by_index, names from optimizer_names."""
    return {"state": {names[i]: s for i, s in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}


def load_full_optimizer(model, optimizer, osd):
    """A one-file checkpoint's optimiser state (full tensors, on every rank) into a sharded optimiser."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, by_name(osd, optimizer_names(model)),
                             options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(optimizer.param_groups, osd["param_groups"]):  # as saved: torch's loader makes betas a list
        group.update({k: v for k, v in saved.items() if k != "params"})


def plain_copy(cfg, sd):
    """A plain Transformer holding the full state dict `sd` (no copy of the tensors): what save_checkpoint writes."""
    with torch.device("meta"):
        net = M.Transformer(cfg)
    tied = {"lm_head.weight": sd["embed.weight"]} if C.shares_head(cfg) else {}
    net.load_state_dict({**tied, **sd}, assign=True)
    return net


def dcp_path(out):
    """Where a run writing `out` (x.pt) puts its sharded checkpoint: x.dcp/."""
    return (out[:-3] if out.endswith(".pt") else out) + ".dcp"


def gather(model, optimizer):
    """(state dict, optimiser state dict) in full, the optimiser's in torch's own format (by position): what a
    one-file checkpoint holds. A sharded model's are gathered to rank 0's CPU memory, a collective (every rank
    calls it; the others get None, None); an unsharded model's are its own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    if not fsdp_modules(model):
        return model.state_dict(), optimizer.state_dict()
    sd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return (sd, by_index(osd)) if dist.get_rank() == 0 else (None, None)


def dcp_meta(cfg, raw, enc, step, metrics, lineage, train_state):
    """What a DCP directory's meta.pt holds beside the param groups: our checkpoint dict without "model" (the
    shards hold it), with "quant" for a quantised model (qat.py's fake-quantised one)."""
    meta = {"config": asdict(raw.cfg), "tokenizer": enc.name, "chat_template": enc.chat_template, "step": int(step),
            "args": asdict(cfg), "metrics": dict(metrics or {}), "lineage": list(lineage),
            "format": C.DTYPE_NAMES.get(next(raw.parameters()).dtype, "fp32"), "train_state": train_state}
    if getattr(raw, "quant", None) is not None:
        meta["quant"] = dict(raw.quant)
    return meta


def save_fsdp(cfg, raw, enc, optimizer, step, metrics, lineage, rank, extra=None):
    """common.save_training under --fsdp, on every rank: the sharded checkpoint {out}.dcp/, then the one-file
    --out gathered on rank 0 (weights and optimiser state in full, so any script or a plain run reads it)."""
    train_state = {"rng": C.rng_state(), "data_position": step, **(extra or {})}
    save_dcp(dcp_path(cfg.out), raw, optimizer, dcp_meta(cfg, raw, enc, step, metrics, lineage, train_state))
    sd, osd = gather(raw, optimizer)
    if rank == 0:
        net = plain_copy(raw.cfg, sd) if fsdp_modules(raw) else raw
        C.save_checkpoint(cfg.out, net, enc, step, asdict(cfg), metrics, lineage, {"optimizer": osd, **train_state})
    return f"{cfg.out} (step {step})"


def save_dcp(path, model, optimizer, meta):
    """Every rank writes its shards of the weights and AdamW's tensors into the directory `path`; rank 0 also
    meta.pt: `meta` and the param groups (the non-tensor entries: DCP would pickle them). Written as path.tmp and
    swapped in at the end, so a run killed mid-save leaves the last good directory (or path.old, for a moment)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    rank, tmp, old = dist.get_rank() if distributed() else 0, path + ".tmp", path + ".old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if distributed():
        dist.barrier()
    sd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": sd, "optim": osd["state"]}, checkpoint_id=tmp, no_dist=not distributed())
    if rank == 0:
        torch.save({**meta, "param_groups": osd["param_groups"]}, os.path.join(tmp, "meta.pt"))
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if distributed():
        dist.barrier()


def read_meta(path):
    """A DCP directory's meta.pt -> our checkpoint dict without "model" (train_state["dcp"] names the directory)."""
    try:
        meta = torch.load(os.path.join(path, "meta.pt"), weights_only=True)
        meta["train_state"]["dcp"] = path
        C.config_from_dict(meta["config"], path)
    except (OSError, RuntimeError, KeyError, TypeError, EOFError) as e:
        raise M.UserError(f"{path}: not a sharded checkpoint of this project ({C._one_line(e)})")
    return meta


def load_dcp(path, model, optimizer):
    """Weights and optimiser state from the DCP directory `path` into this run's model and optimiser, sharded or
    not, on any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict, get_state_dict
    sd, osd = get_state_dict(model, optimizer)
    dcp.load({"model": sd, "optim": osd["state"]}, checkpoint_id=path, no_dist=not distributed())
    groups = torch.load(os.path.join(path, "meta.pt"), weights_only=True)["param_groups"]
    set_state_dict(model, optimizer, model_state_dict=sd, optim_state_dict={"state": osd["state"],
                                                                            "param_groups": groups})


def dcp_to_checkpoint(path, out):
    """A DCP directory -> our one-file checkpoint at `out` (one process; the tensors in full)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    meta = read_meta(path)
    if "quant" in meta:
        raise M.UserError(f"{path}: qat.py's fake-quantised weights: continue them with qat.py --resume {path}; the "
                          "one-file checkpoint written beside it holds the converted model")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "full.pt"))
        full = torch.load(os.path.join(tmp, "full.pt"), weights_only=True)
    cfg = C.config_from_dict(meta["config"], path)
    state = {k: v for k, v in meta["train_state"].items() if k != "dcp"}
    state["optimizer"] = by_index({"state": full["optim"], "param_groups": meta["param_groups"]})
    C.save_checkpoint(out, plain_copy(cfg, full["model"]), C.get_tokenizer(meta["tokenizer"], meta["chat_template"]),
                      meta["step"], meta["args"], meta["metrics"], meta["lineage"], state)


def checkpoint_to_dcp(path, out):
    """Our one-file checkpoint (written by a training script: weights and train_state) -> a DCP directory."""
    import torch.distributed.checkpoint as dcp
    ckpt = C.load_checkpoint(path)
    state = dict(ckpt.get("train_state") or {})
    if "optimizer" not in state or "lora" in state or "qat" in state:
        raise M.UserError(f"{path}: no full-training state to convert (a checkpoint of a training run without "
                          "--lora-rank / --peft; qat.py's resumes from itself)")
    cfg = C.config_from_dict(ckpt["config"], path)
    sd = ckpt["model"]
    if C.shares_head(cfg):
        sd = {**sd, "lm_head.weight": sd["embed.weight"]}
    with torch.device("meta"):
        osd = by_name(state.pop("optimizer"), optimizer_names(M.Transformer(cfg)))
    shutil.rmtree(out, ignore_errors=True)
    dcp.save({"model": sd, "optim": osd["state"]}, checkpoint_id=out, no_dist=True)
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "train_state")}
    torch.save({**meta, "train_state": state, "param_groups": osd["param_groups"]}, os.path.join(out, "meta.pt"))


# -----------------------------------------------------------------------------
# Tensor parallelism (inference)


def tensor_parallel(model, mesh):
    """Split every block's projections over the 1-D device mesh, in place (Megatron-LM's column / row split).
    Each Attention then computes its local heads: n_head / N and n_kv_head / N (set on the module), and model.cfg
    becomes a copy with those local counts (head_dim pinned) for the KV cache: such a model is never saved."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    n, cfg = mesh.size(), model.cfg
    if cfg.n_kv_head % n or cfg.d_ff % n:
        raise M.UserError(f"tensor parallel over {n} ranks needs n_kv_head ({cfg.n_kv_head}) and d_ff ({cfg.d_ff}) "
                          f"divisible by {n}")
    if any(type(m) not in (torch.nn.Linear,) for b in model.blocks for m in (b.attn.q, b.mlp.down)):
        raise M.UserError("tensor parallel splits plain linear layers: merge LoRA and keep quantised models whole")
    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel(), "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()}
    if cfg.arch == "llama":
        plan["mlp.gate"] = ColwiseParallel()
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
        block.attn.n_head, block.attn.n_kv_head = cfg.n_head // n, cfg.n_kv_head // n
    local = copy.copy(cfg)  # attribute writes: Config's checks (gpt2 has no head_dim) are for files, not shards
    local.n_head, local.n_kv_head, local.head_dim = cfg.n_head // n, cfg.n_kv_head // n, cfg.head_size
    model.cfg = local
    return model


@dataclass
class Generate:
    model: str = "out/sft.pt"  # checkpoint to sample from (split over the torchrun ranks)
    prompt: str = "What is 2 + 3?"  # the user's message (chat models) or the text to continue
    max_new_tokens: int = 64  # tokens to generate
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda


def generate_main(argv):
    """`torchrun --nproc_per_node=N parallel.py generate ...`: greedy tokens of a tensor-parallel model."""
    cfg = C.parse_config(Generate, argv, description="greedy decoding, tensor parallel over the torchrun ranks")
    rank, world, device = C.setup_ddp(cfg.device)
    model, enc, _ = C.load_model(cfg.model, device)
    model.eval()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        tensor_parallel(model, init_device_mesh(device.type, (world,)))
    chat = enc.chat_template is not None
    ids = (C.render_chat(enc, [{"role": "user", "content": cfg.prompt}], add_generation_prompt=True)[0] if chat
           else enc.encode_ordinary(cfg.prompt))
    tokens, _, mask = M.generate(model, [ids], cfg.max_new_tokens, temperature=0,
                                 stop_ids=C.stop_ids(enc, enc.chat_template), pad_id=C.special_id(enc, "<|pad|>"))
    if rank == 0:
        print(enc.decode([t for t, m in zip(tokens[0].tolist(), mask[0].tolist()) if m]))


def main():
    usage = ("usage: python parallel.py dcp-to-ckpt DIR OUT.pt | ckpt-to-dcp CKPT.pt DIR | "
             "torchrun --nproc_per_node=N parallel.py generate [--model ...]")
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "generate":
        return generate_main(sys.argv[2:])
    if command not in ("dcp-to-ckpt", "ckpt-to-dcp") or len(sys.argv) != 4:
        raise M.UserError(usage)
    src, out = sys.argv[2:]
    if command == "dcp-to-ckpt":
        if not C.is_dcp(src):
            raise M.UserError(f"{src}: not a DCP directory (no .metadata)")
        dcp_to_checkpoint(src, out)
    else:
        checkpoint_to_dcp(src, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    C.run(main)
