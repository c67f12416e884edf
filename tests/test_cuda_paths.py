"""The paths only a CUDA GPU takes, each against the path every CPU test checks: packed rows through compiled
flex_attention (a document BlockMask) against the dense (B, 1, T, T) mask, forward and backward; the compiled decode
step in CUDA graphs against eager decoding; fused AdamW against the loop; sft.py end to end in bf16 with --compile.
All skip without a GPU.

    python -m pytest -q tests/test_cuda_paths.py          # on a GPU machine (scripts/gpu_check.sh runs it)
"""
import pytest
import torch

import common as C
import model as M
from conftest import assert_same_training, packed_rows, run_script, save_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_flex_packed_attention_equals_the_dense_mask(preset, enc, monkeypatch):
    """The same packed rows in fp32 on CUDA: compiled flex_attention with the document BlockMask and SDPA with the
    dense mask give the same loss and gradients (tf32 off: both in fp32, so only the summation order differs)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = M.build_model(preset, enc).cuda().train()
    ids, doc = (t.cuda() for t in packed_rows(model.cfg.vocab_size, 4, 256))
    results = []
    for flex in (True, False):
        monkeypatch.setattr(M, "FLEX_DEVICES", {"cuda"} if flex else set())
        model.zero_grad()
        logits = model(ids, doc_ids=doc)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lf, gf), (ld, gd) = results
    torch.testing.assert_close(lf, ld, rtol=1e-4, atol=1e-4)
    for name in gf:
        torch.testing.assert_close(gf[name], gd[name], rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_decode_in_cuda_graphs_equals_eager(enc):
    """generate(compile=True) on CUDA ("reduce-overhead": the step replayed as a CUDA graph): greedy tokens equal
    eager's and its log-probs agree; sampled with one seed, the same tokens."""
    torch.manual_seed(0)
    model = M.build_model("tiny", enc).cuda().eval()
    prompts = [[10, 11, 12, 13, 14], [20], [30, 31, 32]]
    for temperature in (0.0, 1.0):
        runs = [M.generate(model, prompts, 24, temperature, compile=compile,
                           generator=torch.Generator("cuda").manual_seed(5)) for compile in (False, True)]
        (tokens, logps, mask), (tokens_c, logps_c, mask_c) = runs
        assert torch.equal(tokens, tokens_c) and torch.equal(mask, mask_c)
        assert (logps - logps_c).abs().max() < 1e-4


def test_fused_adamw_steps_as_the_loop(enc):
    """make_optimizer's fused AdamW on CUDA against torch's for-loop AdamW over the same groups: the same update in
    fp32. The first step's weights agree to fp32 rounding; after 3 steps, within assert_same_training's Adam bound
    (a weight whose gradient is near zero may move by up to a step)."""
    torch.manual_seed(0)
    base = M.build_model("tiny", enc).cuda()
    ids, doc = (t.cuda() for t in packed_rows(base.cfg.vocab_size, 2, 64))
    states = []
    for fused in (True, False):
        model = M.build_model("tiny", enc).cuda()
        model.load_state_dict(base.state_dict())
        opt = C.make_optimizer(model, 1e-3, weight_decay=0.1)
        if fused:
            assert opt.defaults["fused"]
        else:
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        for step in range(3):
            logits = model(ids, doc_ids=doc)
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
            if step == 0:
                states.append({k: v.clone() for k, v in model.state_dict().items()})
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    first_fused, last_fused, first_loop, last_loop = states
    for k in first_fused:
        torch.testing.assert_close(first_fused[k], first_loop[k], rtol=1e-6, atol=1e-3 * 1e-5, msg=k)
    assert_same_training(last_fused, last_loop, lr=1e-3, steps=3)


def test_sft_in_bf16_with_compile_on_cuda(tmp_path, enc, toy_dir):
    """sft.py end to end on the GPU: bf16 autocast, --compile, packed rows (flex attention), fused AdamW: finite
    losses, and the checkpoint loads on the CPU."""
    base = save_tiny(tmp_path / "base.pt", enc)
    out = tmp_path / "sft.pt"
    run_script("sft.py", "--model", base, "--data", f"{toy_dir}/sft.jsonl", "--steps", "4", "--batch-size", "8",
               "--seq-len", "128", "--device", "cuda", "--dtype", "bf16", "--compile", "--out", str(out),
               "--log", str(tmp_path / "log.jsonl"))
    import json
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "log.jsonl") if '"loss"' in line]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    C.load_model(str(out))
