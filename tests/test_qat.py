"""qat.py: fake quantisation against quantize.py's quantise-dequantise, the straight-through and LSQ gradients, the
converted checkpoint against the fake-quant model it came from, PTQ starts, LoRA-only QAT, resume, refusals."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import common as C
import model as M
import qat
import quantize as Q
from conftest import assert_one_line_error, run_script, save_tiny


def _weights(seed, out, n, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * scale * torch.rand(out, 1, generator=g).mul(3).exp()


def _code(w, scales, zeros, group):
    """round(w / s) + z, unclipped, per weight."""
    n = w.shape[1]
    return torch.round(w / qat.expand_groups(scales.float(), group, n)) + qat.expand_groups(zeros.float(), group, n)


# ----------------------------------------------------------------------------- the math


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.integers(1, 5), n=st.integers(1, 70), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([0, 8, 16, 32]), symmetric=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_fake_quant_forward_equals_quantize_dequantize(seed, out, n, bits, group, symmetric, scale):
    """Bit for bit: the fake-quant weight is quantize.py's dequantize(round to nearest) on the same grid."""
    W = _weights(seed, out, n, scale)
    codes, scales, zeros = Q.quantize_rtn(W, bits, group, symmetric)
    want = Q.dequantize(codes, scales, zeros, group)
    assert torch.equal(qat.fake_quant_weight(W, scales.float(), zeros, bits, group), want)
    # on a grid too narrow for the weights (clipping at both ends), still quantize.py's round_to_grid
    s2, z2 = Q.grid_params(W * 0.4, bits, group, symmetric)
    want = Q.dequantize(Q.round_to_grid(W, s2, z2, bits, group), s2, z2, group)
    assert torch.equal(qat.fake_quant_weight(W, s2.float(), z2, bits, group), want)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.integers(1, 5), n=st.integers(1, 50), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([0, 8, 16]), symmetric=st.booleans(), narrow=st.sampled_from([0.3, 0.7, 1.0]))
def test_ste_gradient_is_one_inside_the_grid_and_zero_outside(seed, out, n, bits, group, symmetric, narrow):
    """d w_q / d w: exactly 1 where round(w / s) + z is a code, exactly 0 where the clamp cut it (grids from a
    shrunk copy of the weights, so both ends clip)."""
    W = _weights(seed, out, n)
    scales, zeros = Q.grid_params(W * narrow, bits, group, symmetric)
    w = W.clone().requires_grad_(True)
    qat.fake_quant_weight(w, scales.float(), zeros, bits, group).sum().backward()
    code = _code(W, scales, zeros, group)
    inside = (code >= 0) & (code <= 2 ** bits - 1)
    assert torch.equal(w.grad, inside.float())
    if narrow < 1:
        assert torch.equal(qat.clipped_fraction(W, scales.float(), zeros, bits, group), (~inside).float().mean())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.integers(1, 4), n=st.integers(2, 40), bits=st.sampled_from([3, 4, 8]),
       group=st.sampled_from([0, 8]), narrow=st.sampled_from([0.5, 1.0]))
def test_lsq_scale_gradient_is_the_papers(seed, out, n, bits, group, narrow):
    """LSQ (Esser et al. 2020, Eq. 3, with a zero point): d w_q / d s = round(w / s) - w / s inside the grid, the
    clamp bound's code minus z outside, times the gradient scale 1 / sqrt(g (2^(b-1) - 1)), summed over the group."""
    W = _weights(seed, out, n)
    scales, zeros = Q.grid_params(W * narrow, bits, group, False)
    layer = qat.FakeQuantLinear(W, None, scales, zeros, bits, group, learn_scales=True)
    layer.quantized_weight().sum().backward()
    s, z = qat.expand_groups(scales.float(), group, n), qat.expand_groups(zeros.float(), group, n)
    x = W / s
    code = torch.round(x) + z
    d = torch.where(code < 0, -z, torch.where(code > 2 ** bits - 1, 2 ** bits - 1 - z, torch.round(x) - x))
    g = group or n
    want = torch.nn.functional.pad(d, (0, -n % g)).view(out, -1, g).sum(-1) / (g * (2 ** (bits - 1) - 1)) ** 0.5
    torch.testing.assert_close(layer.scales.grad, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.weight.grad, ((code >= 0) & (code <= 2 ** bits - 1)).float())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 6), c=st.integers(1, 40), scale=st.sampled_from([1e-3, 1, 1e3]))
def test_token_fake_quant_equals_quantize_and_passes_the_gradient(seed, rows, c, scale):
    x = torch.randn(rows, c, generator=torch.Generator().manual_seed(seed)) * scale
    assert torch.equal(qat.fake_quant_tokens(x, 8), Q.fake_quant_per_token(x, 8))
    x.requires_grad_(True)
    qat.fake_quant_tokens(x, 8).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # absmax maps to 127 exactly: nothing is ever clipped


# ----------------------------------------------------------------------------- the model in and out


def _tiny(enc, preset="tiny"):
    torch.manual_seed(0)
    return M.build_model(preset, enc, n_layer=2, d_model=64, d_ff=128, max_seq_len=128).eval()


@pytest.mark.parametrize("bits,group,act_bits,symmetric", [(4, 32, 0, False), (3, 16, 0, False), (8, 0, 8, True),
                                                           (4, 32, 8, False)])
def test_converted_model_computes_what_the_fake_quant_model_does(enc, bits, group, act_bits, symmetric):
    """After a few steps that move weights and learned scales, convert() packs exactly the rounded weights: its
    outputs equal the fake-quant model's, bit for bit with the weights dequantised once (the same F.linear), and
    to rounding through QuantLinear's own paths."""
    model = qat.prepare(_tiny(enc), bits, group, symmetric, act_bits, learn_scales=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(ids).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = model(ids)
        q = qat.convert(model)
        assert all(isinstance(q.get_submodule(n), Q.QuantLinear) for n in Q.linear_names(_tiny(enc)))
        with Q.dequantized(q):
            assert torch.equal(q(ids), want)
        torch.testing.assert_close(q(ids), want, rtol=1e-4, atol=1e-4)


def test_a_ptq_start_is_the_ptq_model(enc):
    """prepare() of a quantize.py model keeps its grid and its weights: step 0 computes what the PTQ model does."""
    ptq = Q.quantize_model(_tiny(enc), "rtn", 3, 16, act_bits=8)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), Q.dequantized(ptq):
        want = ptq(ids)
    model = qat.prepare(ptq, 3, 16)
    assert model.quant["act_bits"] == 8 and model.quant["format"] == "int3-g16"
    with torch.no_grad():
        assert torch.equal(model(ids), want)


def test_lora_qat_rounds_the_merged_weight_and_trains_only_adapters(enc):
    model = qat.prepare(_tiny(enc), 4, 32, lora_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    layer = model.blocks[0].attn.q
    with torch.no_grad():
        layer.lora_B.normal_()
        merged = layer.weight + layer.lora_scaling * layer.lora_B @ layer.lora_A
        want = qat.fake_quant_weight(merged, layer.scales, layer.zeros, 4, 32)
        assert torch.equal(layer.quantized_weight(), want)
        assert torch.equal(layer.to_quant().dequantize(), want)


# ----------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def world(tmp_path_factory, toy_dir, enc):
    d = tmp_path_factory.mktemp("qat")
    fp = save_tiny(d / "fp.pt", enc)
    ptq = d / "ptq.pt"
    run_script("quantize.py", "--model", fp, "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(ptq))
    return {"fp": fp, "ptq": str(ptq), "data": f"{toy_dir}/sft.jsonl"}


def args(world, out, *extra, model="ptq"):
    return ["--model", world[model], "--data", world["data"], "--out", str(out), "--steps", "3", "--batch-size", "2",
            "--seq-len", "64", "--group-size", "32", "--eval-every", "0", "--lr", "1e-3", "--warmup", "1", *extra]


def _fake_model(world, ckpt, **kw):
    """The fake-quant model a qat.py checkpoint's train state holds, rebuilt as qat.py builds it."""
    model = qat.prepare(C.load_model(world["ptq"])[0], 4, 32, **kw).float()
    model.load_state_dict(ckpt["train_state"]["qat"])
    return model.eval()


def test_checkpoint_is_quantize_format_and_equals_the_fake_quant_model(world, tmp_path):
    """The output loads as a quantize.py checkpoint (through common.load_model, as every script reads it) and
    computes what the trained fake-quant model computes; it trained (latent weights moved off the PTQ start)."""
    out = tmp_path / "qat.pt"
    qat.main(args(world, out, "--teacher", world["fp"], "--act-bits", "8", "--learn-scales", "--log",
                  str(tmp_path / "log.jsonl")))
    ckpt = C.load_checkpoint(str(out))
    assert ckpt["format"] == "int4-g32" and ckpt["quant"]["act_bits"] == 8 and ckpt["quant"]["method"] == "qat"
    loaded, _, _ = C.load_model(str(out))
    fake = _fake_model(world, ckpt, act_bits=8, learn_scales=True)
    start = qat.prepare(C.load_model(world["ptq"])[0], 4, 32)
    assert not torch.equal(fake.blocks[0].mlp.up.weight, start.blocks[0].mlp.up.weight)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), Q.dequantized(loaded):
        assert torch.equal(loaded(ids), fake(ids))
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(records) == 3 and all(r["kd"] > 0 for r in records) and 0 <= records[-1]["clipped"] < 0.5
    assert "eval_kd" in records[-1] and "eval_loss" in records[-1]


def test_resume_equals_straight_run(world, tmp_path):
    """k steps + --resume + N - k steps == N steps bit for bit (the same computation in the same order): the latent
    weights, the learned scales, the optimiser and the data position restored."""
    flags = ["--steps", "4", "--learn-scales", "--teacher", world["fp"], "--ce-weight", "0.3"]
    qat.main(args(world, tmp_path / "straight.pt", *flags))
    qat.main(args(world, tmp_path / "part.pt", *flags, "--stop-at", "2"))
    qat.main(args(world, tmp_path / "resumed.pt", *flags, "--resume", str(tmp_path / "part.pt")))
    a, b = C.load_checkpoint(str(tmp_path / "straight.pt")), C.load_checkpoint(str(tmp_path / "resumed.pt"))
    assert a["step"] == b["step"] == 4
    for part in (a["model"], a["train_state"]["qat"]):
        other = b["model"] if part is a["model"] else b["train_state"]["qat"]
        assert part.keys() == other.keys()
        for k in part:
            assert torch.equal(part[k], other[k]), k


def test_lora_qat_and_data_targets_run(world, tmp_path):
    """LoRA-only QAT from the float model (RTN's grid), the data's tokens as targets: only adapters train, and the
    converted model still equals the fake-quant one."""
    out = tmp_path / "lora.pt"
    qat.main(args(world, out, "--lora-rank", "4", "--lr", "1e-2", model="fp"))
    ckpt = C.load_checkpoint(str(out))
    state = ckpt["train_state"]["qat"]
    fp = C.load_checkpoint(world["fp"])["model"]
    assert torch.equal(state["blocks.0.attn.q.weight"], fp["blocks.0.attn.q.weight"])  # the base is frozen
    assert state["blocks.0.attn.q.lora_B"].abs().sum() > 0  # the adapters trained
    model = qat.prepare(C.load_model(world["fp"])[0], 4, 32, lora_rank=4)
    model.load_state_dict(state)
    loaded = C.load_model(str(out))[0]
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), Q.dequantized(loaded):
        assert torch.equal(loaded(ids), model.eval()(ids))


def test_self_distillation_closes_the_gap_to_the_float_model(world, tmp_path):
    """A 2-bit start is far from its float teacher; a few QAT steps toward the teacher bring eval_kd down."""
    fp = world["fp"]
    ptq = tmp_path / "w2.pt"
    run_script("quantize.py", "--model", fp, "--method", "rtn", "--bits", "2", "--group-size", "32", "--out", str(ptq))
    log = tmp_path / "log.jsonl"
    qat.main(["--model", str(ptq), "--teacher", fp, "--data", world["data"], "--out", str(tmp_path / "q.pt"),
              "--bits", "2", "--group-size", "32", "--steps", "12", "--batch-size", "4", "--seq-len", "64",
              "--eval-every", "1", "--lr", "3e-3", "--warmup", "1", "--log", str(log)])
    kd = [json.loads(line)["eval_kd"] for line in open(log)]
    assert kd[-1] < 0.8 * kd[0], kd


@pytest.mark.parametrize("extra,where,message", [
    (["--bits", "3"], "ptq.pt", "is int4-g32 (min-max): QAT keeps its grid"),
    (["--ce-weight", "0.5"], "", "--ce-weight mixes the CE"),
    (["--act-bits", "4"], "", "--act-bits 4"),
    (["--group-size", "12"], "", "--group-size 12"),
])
def test_impossible_flags_are_refused(world, tmp_path, extra, where, message):
    proc = run_script("qat.py", *args(world, tmp_path / "x.pt", *extra), check=False)
    assert_one_line_error(proc, where, message)
    assert not (tmp_path / "x.pt").exists()
