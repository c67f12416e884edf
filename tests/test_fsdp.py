"""FSDP2, sharded checkpoints, tensor parallelism and activation offloading (parallel.py) against one process.

    python -m pytest -q tests/test_fsdp.py

Two ranks on gloo (tests/fsdp_worker.py under torch.distributed.run) against the same computation in this process.
Tolerances follow from the arithmetic: DDP and FSDP sum the two ranks' gradients in another order than one process
sums the whole batch (FSDP: a reduce-scatter, DDP: an all-reduce), so gradients agree to fp32 rounding of their
scale; after that, Adam divides each gradient by its own running size, which can turn the rounding of a gradient
that is nearly zero into a visible step (conftest.assert_same_training bounds it). Checkpoints move tensors, never
compute with them: equal bit for bit. Tensor parallelism sums o's and down's halves on two ranks, then adds:
logits agree to fp32 rounding, greedy tokens exactly. ppo.py and qat.py run whole on 2 ranks (the worker's
`scripts`): ppo.py --fsdp against DDP on 2 ranks (each rank samples from its own seed, so one process would draw
other responses), qat.py --fsdp against one process (the same rows, the same global token count); a run resumed
from its own shards against the straight run."""
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, assert_refused, assert_same_training, run_script, save_tiny
from test_sft import write_chats

import common as C
import model as M
import parallel as P
import qat

sys.path.insert(0, os.path.join(ROOT, "tests"))
import fsdp_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this build")
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The worker's files (2 ranks) and this process's one-process run of the same steps."""
    out = tmp_path_factory.mktemp("fsdp")
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/fsdp_worker.py",
               str(out), env=ENV, timeout=300)
    return out, W.train("one", 0, 1)


def test_fsdp_and_ddp_train_as_one_process(two_ranks):
    out, one = two_ranks
    for kind in ("fsdp", "ddp"):
        run = torch.load(out / f"{kind}.pt", weights_only=True)
        for name, g in one["grads"].items():  # the first step, before any weight differs: reduction order only
            assert (run["grads"][name] - g).abs().max() <= 1e-5 * g.abs().max(), (kind, name)
        torch.testing.assert_close(run["losses"], one["losses"], rtol=1e-6, atol=0)
        # after 3 steps: every weight within Adam's bound, all but 0.1% of them within 1e-6 (1e-3 * lr)
        assert_same_training(run["params"], one["params"], W.LR, W.STEPS, bulk=1e-3, frac=1e-3)
        torch.testing.assert_close(run["logits"], one["logits"], rtol=0, atol=1e-5)


def test_sharded_checkpoint_resumes_in_one_process(two_ranks):
    """The 2 ranks' DCP directory, loaded into one plain process, holds the FSDP run's weights and AdamW state
    exactly (those of the gathered one-file checkpoint written beside it) and gives its logits."""
    out, _ = two_ranks
    fsdp, ckpt = torch.load(out / "fsdp.pt", weights_only=True), C.load_checkpoint(str(out / "ckpt.pt"))
    meta = P.read_meta(str(out / "ckpt.dcp"))
    assert meta["step"] == W.STEPS and meta["train_state"]["dcp"] == str(out / "ckpt.dcp")
    torch.manual_seed(1)  # other weights than the run started from: everything must come from the directory
    net = M.build_model("tiny", C.get_tokenizer("byte"), n_layer=2, d_model=64, d_ff=128, max_seq_len=64)
    model, raw, opt = C.wrap_for_training(net, W.sft.Config(lr=W.LR, weight_decay=0.1), meta["train_state"], 1,
                                          torch.device("cpu"))
    for name, p in raw.named_parameters():
        assert torch.equal(p.detach(), fsdp["params"][name]), name
        assert torch.equal(p.detach(), ckpt["model"][name]), name
    saved = ckpt["train_state"]["optimizer"]
    assert_same_optimizer(opt.state_dict(), saved)
    raw.eval()
    with torch.no_grad():
        torch.testing.assert_close(raw(W.PROBE), fsdp["logits"], rtol=0, atol=1e-6)


def assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"] and set(a["state"]) == set(b["state"])
    for i, s in a["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def test_dcp_converter_round_trip(two_ranks, tmp_path):
    """DCP directory -> one file (the CLI) equals the file the run gathered; one file -> DCP -> one file again
    equals it too."""
    out, _ = two_ranks
    run_script("parallel.py", "dcp-to-ckpt", str(out / "ckpt.dcp"), str(tmp_path / "a.pt"), timeout=120)
    P.checkpoint_to_dcp(str(tmp_path / "a.pt"), str(tmp_path / "b.dcp"))
    P.dcp_to_checkpoint(str(tmp_path / "b.dcp"), str(tmp_path / "c.pt"))
    gathered = C.load_checkpoint(str(out / "ckpt.pt"))
    for path in ("a.pt", "c.pt"):
        ckpt = C.load_checkpoint(str(tmp_path / path))
        assert set(ckpt["model"]) == set(gathered["model"]) and ckpt["step"] == gathered["step"] == W.STEPS
        assert all(torch.equal(t, gathered["model"][k]) for k, t in ckpt["model"].items())
        assert_same_optimizer(ckpt["train_state"]["optimizer"], gathered["train_state"]["optimizer"])
        assert torch.equal(ckpt["train_state"]["rng"]["torch"], gathered["train_state"]["rng"]["torch"])
        assert ckpt["config"] == gathered["config"] and ckpt["lineage"] == gathered["lineage"] == ["test"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])  # llama with GQA (4 query, 2 kv heads), gpt2 with biases
def test_tensor_parallel_matches_one_process(two_ranks, preset):
    out, _ = two_ranks
    tp = torch.load(out / "tp.pt", weights_only=True)[preset]
    one = W.decode(W.tp_model(preset))
    torch.testing.assert_close(tp["logits"], one["logits"], rtol=0, atol=1e-5)
    assert torch.equal(tp["tokens"], one["tokens"])


def test_evaluate_tp_matches_one_process(two_ranks, tmp_path):
    """evaluate.py --tp on 2 ranks (in the worker) against the same command in one process: the same greedy
    responses, the same scores, perplexity to fp32 rounding."""
    out, _ = two_ranks
    import evaluate
    evaluate.main([*W.eval_args(str(out)), "--out", str(tmp_path / "one.json"),
                   "--responses", str(tmp_path / "one.jsonl")])
    assert (tmp_path / "one.jsonl").read_text() == (out / "eval-tp.jsonl").read_text()
    tp, one = (json.loads(p.read_text())["results"] for p in (out / "eval-tp.json", tmp_path / "one.json"))
    assert [r["model"] for r in tp] == [r["model"] for r in one] and len(one) == 2
    for a, b in zip(tp, one):
        assert a["exact_match"] == b["exact_match"] and a["params"] == b["params"]
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5) and a["bpb"] == pytest.approx(b["bpb"], rel=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offload_activations_gives_the_same_gradients(checkpointing):
    """save_on_cpu copies what backward needs and copies it back: the same values, so the same gradients, bit for
    bit (and beside --grad-checkpointing too)."""
    ids, mask = W.batch()
    grads = []
    for offload in (False, True):
        torch.manual_seed(0)
        net = M.build_model("tiny", C.get_tokenizer("byte"), n_layer=2, d_model=64, d_ff=128, max_seq_len=64)
        net.grad_checkpointing = checkpointing
        cfg = W.sft.Config(offload_activations=offload)
        model, raw, _ = C.wrap_for_training(net, cfg, None, 1, torch.device("cpu"))
        model.train()
        (-M.token_logprobs(model(ids), ids, mask).sum()).backward()
        grads.append({n: p.grad for n, p in raw.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_sft_fsdp_resumes_from_its_shards_in_one_process(tmp_path, enc):
    """sft.py --fsdp on 2 ranks stopped after 2 of 4 steps, resumed from {out}.dcp in one process without torchrun:
    the same weights as 4 steps straight in one process."""
    data, base = write_chats(tmp_path / "chats.jsonl", n=24), save_tiny(tmp_path / "base.pt", enc)
    args = ["--model", base, "--data", data, "--steps", "4", "--seq-len", "64", "--eval-frac", "0", "--lr", "1e-3"]
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py", "--", *args, "--fsdp",
               "--batch-size", "4", "--stop-at", "2", "--out", str(tmp_path / "half.pt"), env=ENV, timeout=300)
    W.sft.main([*args, "--batch-size", "8", "--resume", str(tmp_path / "half.dcp"),
                "--out", str(tmp_path / "resumed.pt")])
    W.sft.main([*args, "--batch-size", "8", "--out", str(tmp_path / "straight.pt")])
    a, b = (C.load_checkpoint(str(tmp_path / f))["model"] for f in ("resumed.pt", "straight.pt"))
    assert_same_training(a, b, 1e-3, 4, bulk=1e-3, frac=1e-3)


def test_fsdp_refuses_what_it_does_not_shard(tmp_path, enc, toy_dir):
    base = save_tiny(tmp_path / "base.pt", enc)
    assert_refused("sft.py", "--model", base, "--data", f"{toy_dir}/sft.jsonl", "--fsdp", "--lora-rank", "4",
                   "--seq-len", "64", "--out", str(tmp_path / "x.pt"), message="--fsdp trains every weight")
    import ppo
    with pytest.raises(M.UserError, match="--fsdp trains every weight"):  # its reference would be the LoRA-off policy
        ppo.main(["--model", base, "--reward", "data/toyworld.py:gold_reward", "--data", f"{toy_dir}/prompts.jsonl",
                  "--fsdp", "--lora-rank", "4", "--out", str(tmp_path / "p.pt")])
    with pytest.raises(M.UserError, match="--fsdp trains every weight"):
        qat.main(["--model", base, "--data", write_chats(tmp_path / "chats.jsonl", n=4), "--seq-len", "64",
                  "--group-size", "32", "--fsdp", "--lora-rank", "4", "--out", str(tmp_path / "q.pt")])


@pytest.fixture(scope="module")
def scripts_on_two_ranks(tmp_path_factory, toy_dir, enc):
    """The worker's ppo.py and qat.py runs on 2 ranks, from a tiny policy, reward model and float base."""
    out = tmp_path_factory.mktemp("fsdp-scripts")
    save_tiny(out / "policy.pt", enc)
    save_tiny(out / "rm.pt", enc, score_std=1.0, head="scalar")
    save_tiny(out / "base.pt", enc)
    write_chats(out / "chats.jsonl", n=24)
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/fsdp_worker.py", "scripts",
               str(out), toy_dir, env=ENV, timeout=300)
    return out


def assert_same_schema(a, b, where="checkpoint"):
    """The same nested entries, tensors of the same dtype and shape, other values of the same type: one format."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for k in a:
            assert_same_schema(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_schema(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
    else:
        assert type(a) is type(b), where


def test_ppo_fsdp_trains_as_ddp(scripts_on_two_ranks):
    """ppo.py --fsdp (policy and critic sharded) against DDP, both on 2 ranks. Rank 0 alone samples the held-out
    prompts while rank 1 waits (eval mode holds the gathered weights: no collective per forward). The first rollout
    comes from the same weights: its scores and KL equal bit for bit. The updates then sum the ranks' gradients and
    the clipping norm in another order, so after PPO_UPDATES AdamW steps policy and critic agree within Adam's bound
    (conftest.assert_same_training); the one-file checkpoints have one format, the critic's state in full."""
    out = scripts_on_two_ranks
    fsdp, ddp = (C.load_checkpoint(str(out / f"ppo-{kind}.pt")) for kind in ("fsdp", "ddp"))
    assert_same_schema(fsdp, ddp)
    logs = [[json.loads(line) for line in open(out / f"ppo-{kind}.jsonl")] for kind in ("fsdp", "ddp")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [0, 1, 2, 3]
    assert logs[0][0] == logs[1][0] and "eval_proxy" in logs[0][-1]  # greedy on the start weights
    assert all(logs[0][1][k] == logs[1][1][k] for k in ("score", "kl", "entropy", "response_len"))
    assert_same_training(fsdp["model"], ddp["model"], W.LR, W.PPO_UPDATES, bulk=1e-3, frac=1e-3)
    assert_same_training(fsdp["train_state"]["critic"], ddp["train_state"]["critic"], W.LR, W.PPO_UPDATES,
                         bulk=1e-3, frac=1e-3)


def test_ppo_fsdp_resumes_from_its_shards(scripts_on_two_ranks):
    """--fsdp stopped after 1 of 3 steps, resumed from {out}.dcp (the policy's shards; beta, the critic and its
    AdamW state in full in meta.pt's train state): the same tensors restored, the same computation, so the same
    weights as 3 steps straight, bit for bit."""
    out = scripts_on_two_ranks
    straight, resumed = (C.load_checkpoint(str(out / f"ppo-{kind}.pt")) for kind in ("fsdp", "resumed"))
    assert straight["step"] == resumed["step"] == W.PPO_STEPS
    for part in ("model", "critic"):
        a, b = (straight, resumed) if part == "model" else (straight["train_state"], resumed["train_state"])
        assert set(a[part]) == set(b[part]) and all(torch.equal(t, b[part][k]) for k, t in a[part].items()), part
    for key in ("optimizer", "critic_optimizer"):
        assert_same_optimizer(straight["train_state"][key], resumed["train_state"][key])


def test_qat_fsdp_trains_as_one_process_and_resumes_from_its_shards(scripts_on_two_ranks):
    """qat.py --fsdp on 2 ranks (latent weights and learned scales sharded) against one process on the same rows:
    the latent weights within Adam's bound after QAT_STEPS steps, and so are those of the run resumed in one
    process from the 2 ranks' shards after 2 steps. The gathered file is quantize.py's format, the very convert()
    of its own latent weights, with the train state one process writes."""
    out = scripts_on_two_ranks
    qat.main(W.qat_args(str(out), "qat-one", batch_size=4))
    qat.main(W.qat_args(str(out), "qat-resumed", "--resume", str(out / "qat-half.dcp"), batch_size=4))
    fsdp, one, resumed = (C.load_checkpoint(str(out / f"qat-{kind}.pt")) for kind in ("fsdp", "one", "resumed"))
    assert_same_schema(fsdp, one)
    assert fsdp["quant"] == one["quant"] and fsdp["format"] == "int4-g32" and resumed["step"] == W.QAT_STEPS
    for run in (fsdp, resumed):
        assert_same_training(run["train_state"]["qat"], one["train_state"]["qat"], W.LR, W.QAT_STEPS, bulk=1e-3,
                             frac=1e-3)
    fake = qat.prepare(C.load_model(str(out / "base.pt"))[0], 4, 32, learn_scales=True)
    fake.load_state_dict(fsdp["train_state"]["qat"])
    want, got = qat.convert(fake).state_dict(), C.load_model(str(out / "qat-fsdp.pt"))[0].state_dict()
    assert set(want) == set(got) and all(torch.equal(t, got[k]) for k, t in want.items())
    with pytest.raises(M.UserError, match="qat.py --resume"):  # its shards are the latent model, not ours
        P.dcp_to_checkpoint(str(out / "qat-half.dcp"), str(out / "x.pt"))
