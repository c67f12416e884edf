"""quantize.py's FP8 (W8A8 e4m3, --method fp8): the rounding error bound, exactness on the grid, per-channel against
per-tensor scales, the _scaled_mm path against its reference (CUDA with compute capability >= 8.9 only), the
quantised tiny model against the float one, checkpoints bit-exact through save and load, and the CLI.

    python -m pytest -q tests/test_fp8.py          # on a GPU session the _scaled_mm tests run too
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import common as C
import model as M
import quantize as Q
from conftest import assert_one_line_error, run_script, save_tiny

NORMAL_MIN = 2.0 ** -6  # e4m3's smallest normal value; below it the codes are subnormal, 2^-9 apart
SCALED_MM = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _weights(seed, out, n, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * scale * torch.rand(out, 1, generator=g).mul(6).exp()  # rows far apart


def _e4m3_codes(seed, shape):
    """Random finite e4m3 values (every bit pattern but NaN), one of them 448 so the tensor's amax is 448."""
    bits = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0  # 0x7F / 0xFF are e4m3fn's NaNs
    codes = bits.view(torch.float8_e4m3fn).float()
    codes.view(-1)[0] = 448.0
    return codes


# -----------------------------------------------------------------------------
# The grid


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.integers(1, 6), n=st.integers(1, 70), per_row=st.booleans(),
       scale=st.sampled_from([1e-6, 1.0, 1e4]))
def test_fp8_error_is_at_most_half_an_ulp(seed, out, n, per_row, scale):
    """A normal value is off by at most half its e4m3 ulp, 2^-4 of itself (3 mantissa bits); a subnormal one by half
    the subnormal step, 2^-10 in code units. The largest |w| of each row (or of the tensor) becomes +-448 exactly."""
    W = _weights(seed, out, n, scale)
    codes, scales = Q.quantize_fp8(W, per_row)
    assert codes.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert scales.shape == ((out, 1) if per_row else (1, 1))
    err = (Q.dequantize_fp8(codes, scales) - W).abs()
    normal = W.abs() >= NORMAL_MIN * scales
    assert bool((err[normal] <= 2.0 ** -4 * W.abs()[normal] * (1 + 1e-6)).all())
    assert bool((err <= 2.0 ** -4 * W.abs() * (1 + 1e-6) + 2.0 ** -10 * scales).all())
    top = codes.float().abs().amax(-1) if per_row else codes.float().abs().amax()
    assert bool((top == 448).all())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.integers(1, 5), n=st.integers(1, 40), k=st.integers(-30, 30),
       per_row=st.booleans())
def test_fp8_is_exact_on_the_grid(seed, out, n, k, per_row):
    """e4m3 values times a power of two, 448 the largest: the same codes and scale back, bit for bit; and rounding
    the dequantised weights of any tensor again gives the same codes."""
    codes = _e4m3_codes(seed, (out, n))
    if per_row:
        codes[:, 0] = 448.0
    W = codes * 2.0 ** k
    again, scales = Q.quantize_fp8(W, per_row)
    assert torch.equal(again.float(), codes) and bool((scales == 2.0 ** k).all())
    assert torch.equal(Q.dequantize_fp8(again, scales), W)
    X = _weights(seed, out, n)
    c1, s1 = Q.quantize_fp8(X, per_row)
    c2, s2 = Q.quantize_fp8(Q.dequantize_fp8(c1, s1), per_row)
    assert torch.equal(c1.float(), c2.float()) and torch.allclose(s1, s2, rtol=2.0 ** -22, atol=0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.integers(2, 6), n=st.integers(1, 50), shifts=st.lists(
    st.integers(0, 24), min_size=6, max_size=6))
def test_per_channel_scales_are_never_worse_than_per_tensor(seed, out, n, shifts):
    """Rows whose amaxes differ by powers of two: the per-tensor grid over a row is a subset of the per-channel grid
    (the same e4m3 values shifted up, cut at 448, and no subnormal step finer), so no weight rounds worse."""
    V = _weights(seed, out, n)
    V = V / V.abs().amax(-1, keepdim=True)  # every row's amax exactly 1
    W = V * torch.tensor([2.0 ** -s for s in shifts[:out]])[:, None]
    err = {per_row: (Q.dequantize_fp8(*Q.quantize_fp8(W, per_row)) - W).abs() for per_row in (True, False)}
    assert bool((err[True] <= err[False] * (1 + 1e-6) + 1e-12 * W.abs()).all())
    assert err[True].sum() <= err[False].sum()


def test_fake_quant_scales_each_token_and_passes_gradients_straight_through():
    """Each token on its own scale: its largest entry exact, the rest within 2^-4; a tensor-wide scale set by a
    token of 1000 flushes another token's 1e-3 to zero (below half of e4m3's smallest step, 2^-10 x 1000 / 448)."""
    x = torch.tensor([[1e-3, -2e-3, 4e-3], [1000.0, 3.0, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    y = Q.fake_quant_fp8(x, per_token=True)
    assert torch.equal(y[:2].detach().abs().amax(-1), x[:2].detach().abs().amax(-1)) and y[2].eq(0).all()
    assert bool(((y - x).abs() <= 2.0 ** -4 * x.abs()).all())
    assert Q.fake_quant_fp8(x.detach(), per_token=False)[0, 0] == 0
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# -----------------------------------------------------------------------------
# The matmul: reference, and torch._scaled_mm on e4m3 tensor cores


@pytest.mark.parametrize("per_token", [True, False])
def test_fp8_matmul_reference_is_the_dequantised_product(per_token):
    x, W = _weights(1, 5, 48), _weights(2, 32, 48)
    codes, scales = Q.quantize_fp8(W, per_token)
    xq, sx = Q.quantize_fp8(x, per_token)
    want = Q.dequantize_fp8(xq, sx) @ Q.dequantize_fp8(codes, scales).t()
    assert torch.equal(Q.fp8_matmul_ref(x, codes, scales, per_token), want)
    assert torch.equal(Q.fp8_matmul(x, codes, scales, per_token), want)  # on CPU the reference itself


def _cpu_scaled_mm():
    try:
        codes, scales = Q.quantize_fp8(torch.ones(16, 16))
        torch._scaled_mm(codes, codes.t(), scale_a=scales, scale_b=scales.t(), out_dtype=torch.bfloat16)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_scaled_mm(), reason="no CPU torch._scaled_mm")),
           pytest.param("cuda", marks=pytest.mark.skipif(not SCALED_MM, reason="torch._scaled_mm needs a CUDA GPU of "
                                                          "compute capability >= 8.9"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("N", [1, 7, 64])
def test_scaled_mm_equals_the_reference(device, per_token, N):
    """Products of e4m3 values are exact in fp32; what differs is the order of the fp32 sums and the bf16 output
    (half its ulp, 2^-9 relative). On CUDA through fp8_matmul's dispatch; on CPU (torch runs _scaled_mm there too)
    the same call directly, so the scales' shapes and the row padding are checked without a GPU."""
    x, W = _weights(3, N, 256).to(device), _weights(4, 384, 256).to(device)
    codes, scales = Q.quantize_fp8(W, per_token)
    mm = Q.fp8_matmul if device == "cuda" else Q.scaled_mm_fp8
    y, ref = mm(x, codes, scales, per_token), Q.fp8_matmul_ref(x, codes, scales, per_token)
    xq, sx = Q.quantize_fp8(x, per_token)
    size = Q.dequantize_fp8(xq, sx).abs() @ Q.dequantize_fp8(codes, scales).abs().t()
    assert y.dtype == torch.float32 and y.shape == (N, 384)
    assert bool(((y - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-5 * size).all()), (y - ref).abs().max()


@pytest.mark.skipif(not SCALED_MM, reason="torch._scaled_mm needs a CUDA GPU of compute capability >= 8.9")
def test_fp8_model_on_cuda_matches_the_cpu_reference(enc, tmp_path):
    model = C.load_model(save_tiny(tmp_path / "fp.pt", enc, std=0.05, d_model=128, d_ff=256))[0]
    Q.quantize_model(model, "fp8")
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).float().cpu()
    assert (gpu - cpu).abs().max() <= 0.02 * cpu.abs().max()


# -----------------------------------------------------------------------------
# The model, its checkpoint, the CLI


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("scales", ["channel", "tensor"])
def test_fp8_model_is_close_to_float_and_reloads_bit_exact(tmp_path, enc, preset, scales):
    path = save_tiny(tmp_path / "fp.pt", enc, std=0.05, preset=preset)
    model = C.load_model(path)[0]
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        fp = model(x)
        Q.quantize_model(model, "fp8", fp8_scales=scales)
        ours = model(x)
    fmt = "w8a8-fp8" if scales == "channel" else "w8a8-fp8-tensor"
    assert model.quant["format"] == fmt and model.quant["act_bits"] == 8
    # every weight and input within 2^-4 of itself: the logits move by a few percent of their range at most
    assert 0 < (ours - fp).abs().max() < 0.05 * fp.abs().max()
    C.save_checkpoint(str(tmp_path / "q.pt"), model, enc)
    again, _, ckpt = C.load_model(str(tmp_path / "q.pt"))
    assert ckpt["format"] == fmt and ckpt["quant"] == model.quant
    saved = ckpt["model"]
    layers = [n for n, m in model.named_modules() if isinstance(m, Q.QuantLinear)]
    assert len(layers) == len(Q.linear_names(M.build_model(preset, enc, n_layer=2)))
    for name in layers:
        q, s = saved[f"{name}.qweight"], saved[f"{name}.scales"]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert s.shape == ((q.shape[0], 1) if scales == "channel" else (1, 1))
        assert torch.equal(q.view(torch.uint8), model.get_submodule(name).qweight.view(torch.uint8))
        assert torch.equal(again.get_submodule(name).dequantize(), model.get_submodule(name).dequantize())
    with torch.no_grad():
        assert torch.equal(again(x), ours)


def test_fp8_codes_and_scales_move_but_are_never_cast(tmp_path, enc):
    """model.to(torch.bfloat16) casts every float tensor, and e4m3 is a float dtype: the codes and their fp32 scales
    keep theirs, so the layers compute what they did (on a GPU: .to("cuda", torch.bfloat16), the decode setting)."""
    model = Q.quantize_model(C.load_model(save_tiny(tmp_path / "fp.pt", enc, std=0.05))[0], "fp8")
    before = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, Q.QuantLinear)}
    model.to(torch.bfloat16)
    for name, w in before.items():
        m = model.get_submodule(name)
        assert m.qweight.dtype == torch.float8_e4m3fn and m.scales.dtype == torch.float32
        assert torch.equal(m.dequantize(), w) and list(dict(m.named_buffers())) == ["qweight", "scales"]
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 8))).dtype == torch.bfloat16


def test_fp8_layer_passes_gradients_to_its_inputs():
    """QLoRA over an FP8 base: the input's gradient is the straight-through one, g W (W dequantised), so adapters
    below an FP8 layer train (sft.py --model fp8.pt --lora-rank 16)."""
    torch.manual_seed(0)
    layer = Q.QuantLinear.from_linear(torch.nn.Linear(32, 16), 8, 0, "fp8", act_bits=8)
    x, g = torch.randn(4, 32, requires_grad=True), torch.randn(4, 16)
    layer(x).backward(g)
    assert torch.allclose(x.grad, g @ layer.dequantize(), atol=1e-6)


def test_corrupt_fp8_checkpoints_are_refused(tmp_path, enc):
    model = C.load_model(save_tiny(tmp_path / "fp.pt", enc, std=0.05))[0]
    Q.quantize_model(model, "fp8")
    C.save_checkpoint(str(tmp_path / "q.pt"), model, enc)
    nan = torch.full((64, 64), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    cases = [(lambda c: c["model"].__setitem__("blocks.0.attn.q.qweight", nan), "NaN e4m3 codes"),
             (lambda c: c["model"]["blocks.0.attn.q.scales"].mul_(-1), "not positive"),
             (lambda c: c["model"].__setitem__("blocks.0.attn.q.scales", torch.ones(1, 1)),
              "expected torch.float32 [64, 1]"),
             (lambda c: c["model"].__setitem__("blocks.0.attn.q.qweight", torch.zeros(64, 64, dtype=torch.uint8)),
              "expected torch.float8_e4m3fn [64, 64]"),
             (lambda c: c["quant"].__setitem__("act_bits", 0), "expected bits 8, act_bits 8")]
    for i, (damage, message) in enumerate(cases):
        ckpt = torch.load(str(tmp_path / "q.pt"), weights_only=True)
        damage(ckpt)
        torch.save(ckpt, tmp_path / f"bad{i}.pt")
        with pytest.raises(M.UserError, match=f"bad{i}") as e:
            C.load_model(str(tmp_path / f"bad{i}.pt"))
        assert message in str(e.value), (message, str(e.value))


def test_fp8_cli_end_to_end_and_its_refusals(tmp_path, enc):
    path = save_tiny(tmp_path / "fp.pt", enc, std=0.05)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"The cat sat on mat {i}; {i} + 1 = {i + 1}.\n" for i in range(200)))
    proc = run_script("quantize.py", "--model", path, "--method", "fp8", "--data", str(text), "--calib-samples", "2",
                      "--calib-len", "48", "--eval-samples", "4", "--out", str(tmp_path / "q.pt"))
    assert "w8a8-fp8 (fp8)" in proc.stderr and "held-out" in proc.stderr
    model, _, ckpt = C.load_model(str(tmp_path / "q.pt"))
    assert ckpt["lineage"][-1] == "quantize:w8a8-fp8:fp8"
    assert abs(ckpt["metrics"]["ppl"] / ckpt["metrics"]["ppl_fp"] - 1) < 0.05
    run_script("quantize.py", "--model", path, "--method", "fp8", "--fp8-scales", "tensor",
               "--out", str(tmp_path / "t.pt"))
    assert C.load_model(str(tmp_path / "t.pt"))[2]["format"] == "w8a8-fp8-tensor"
    for flags, message in [(["--method", "rtn", "--fp8-scales", "tensor"], "--fp8-scales 'tensor'"),
                           (["--method", "fp8", "--fp8-scales", "row"], "--fp8-scales 'row'"),
                           (["--method", "fp8", "--act-bits", "8"], "smoothquant and fp8 are W8A8"),
                           (["--method", "fp8", "--out", str(tmp_path / "x.gguf")], "--out NAME.gguf"),
                           (["--method", "nf4", "--group-size", "64", "--export-hf", str(tmp_path / "hf")],
                            "not --method nf4")]:
        out = [] if any(f.endswith(".gguf") for f in flags) else ["--out", str(tmp_path / "x.pt")]
        proc = run_script("quantize.py", "--model", path, *out, *flags, check=False)
        assert_one_line_error(proc, "", message)
