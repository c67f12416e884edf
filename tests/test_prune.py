"""prune.py: masks (exact per-row sparsity, exact N:M), SparseGPT (sparsity 0 is the identity, a diagonal Hessian is
Wanda, output error below Wanda's below magnitude's), structured pruning (the smaller model is the full one with the
removed units zeroed), masks in checkpoints and through fine-tuning, the CLI and its refusals."""
import dataclasses
import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import common as C
import distill
import dpo
import evaluate
import model as M
import prune as P
import sft
from conftest import assert_one_line_error, run_script, save_tiny

shapes = st.tuples(st.integers(1, 12), st.sampled_from([8, 16, 24, 64]), st.integers(0, 10**6))


def _weights(out, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g), torch.rand(n, generator=g) * 4


def _correlated_inputs(seed, tokens, n):
    """Inputs as a transformer's linears see them: correlated channels, a few (1 in 16) some 20x louder."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(n)
    scale[torch.randperm(n, generator=g)[:max(1, n // 16)]] = 20
    scale *= torch.rand(n, generator=g) + 0.5
    return (torch.randn(tokens, n, generator=g) @ (torch.eye(n) + 0.5 * torch.randn(n, n, generator=g))) * scale


# ----------------------------------------------------------------------------- masks


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from([0.0, 0.25, 0.5, 0.7]))
def test_unstructured_masks_remove_the_same_count_from_every_row(shape, sparsity):
    out, n, seed = shape
    W, sqnorm = _weights(out, n, seed)
    H = torch.diag(sqnorm) + 0.1
    for mask in (P.magnitude_mask(W, sparsity), P.wanda_mask(W, sqnorm, sparsity),
                 P.sparsegpt_prune(W, H, sparsity, block_size=n)[1]):
        assert mask.dtype == torch.bool and mask.shape == W.shape
        assert (mask.sum(1) == n - int(sparsity * n)).all()


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from([(2, 4), (4, 8), (1, 4)]))
def test_n_m_masks_keep_exactly_n_of_every_m(shape, nm):
    out, n_in, seed = shape
    n, m = nm
    W, sqnorm = _weights(out, n_in, seed)
    X = _correlated_inputs(seed, 64, n_in)
    pruned, sgpt = P.sparsegpt_prune(W, X.t() @ X, 0, n, m, block_size=16)
    for mask in (P.magnitude_mask(W, 0, n, m), P.wanda_mask(W, sqnorm, 0, n, m), sgpt):
        assert (mask.view(out, -1, m).sum(-1) == n).all()
    assert (pruned[~sgpt] == 0).all()


def test_masks_keep_the_highest_scores():
    W = torch.tensor([[0.1, -3.0, 0.5, 2.0, -0.2, 0.3, 1.0, -0.05]])
    assert P.magnitude_mask(W, 0.5).tolist() == [[False, True, True, True, False, False, True, False]]
    assert P.magnitude_mask(W, 0, 2, 4).tolist() == [[False, True, False, True, False, True, True, False]]
    # Wanda: the quiet input's large weight loses to the loud input's small one
    sqnorm = torch.tensor([100.0, 0.01, 1, 0.01, 1, 1, 1, 1])
    assert P.wanda_mask(W, sqnorm, 0, 1, 4).tolist()[0][:4] == [True, False, False, False]


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_mask_pack_unpack_round_trip(shape):
    out, n, seed = shape
    n += seed % 7  # not a multiple of 8 too
    mask = torch.rand(out, n, generator=torch.Generator().manual_seed(seed)) < 0.5
    packed = C.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (out, -(-n // 8))
    assert torch.equal(C.unpack_mask(packed, n), mask)


# ----------------------------------------------------------------------------- SparseGPT


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_sparsegpt_at_sparsity_zero_leaves_the_weights(shape):
    out, n, seed = shape
    W, _ = _weights(out, n, seed)
    X = _correlated_inputs(seed, 4 * n, n)
    pruned, mask = P.sparsegpt_prune(W, X.t() @ X, 0.0, block_size=8)
    assert mask.all() and torch.equal(pruned, W)


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_sparsegpt_with_a_diagonal_hessian_is_wanda(nm):
    """H diagonal: H^-1's Cholesky factor is diag(h^-1/2), so OBS's cost w^2 / [H^-1]_jj^2 = w^2 h_jj is Wanda's
    score squared, and no weight has a neighbour to take an error: the same mask, the kept weights untouched."""
    n, m = nm
    W, sqnorm = _weights(16, 64, 3)
    pruned, mask = P.sparsegpt_prune(W, torch.diag(sqnorm), 0.5, n, m, block_size=64, damp=0.0)
    assert torch.equal(mask, P.wanda_mask(W, sqnorm, 0.5, n, m))
    torch.testing.assert_close(pruned, W * mask, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_output_error_orders_sparsegpt_wanda_magnitude(seed, nm):
    """On a layer whose inputs have correlated channels and a few outliers: ||X W^T - X W'^T||^2 of SparseGPT below
    Wanda's below magnitude's, each by a clear margin (measured on these seeds: SparseGPT / Wanda 0.65-0.8, Wanda /
    magnitude under 0.1). Not a law for every input: where many channels are far quieter than the mean, the damping
    (1% of H's mean diagonal) swamps their Hessian entries and SparseGPT can fall behind Wanda."""
    n, m = nm
    W, _ = _weights(32, 64, seed)
    X = _correlated_inputs(seed, 2048, 64)
    H = X.t() @ X
    error = {"magnitude": W * P.magnitude_mask(W, 0.5, n, m),
             "wanda": W * P.wanda_mask(W, X.pow(2).sum(0), 0.5, n, m),
             "sparsegpt": P.sparsegpt_prune(W, H, 0.5, n, m, block_size=32)[0]}
    error = {k: (X @ (W - v).t()).pow(2).mean().item() for k, v in error.items()}
    assert error["sparsegpt"] < 0.9 * error["wanda"] < 0.9 * 0.9 * error["magnitude"], error


# ----------------------------------------------------------------------------- whole models


def _model(enc, preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    shape = dict(n_layer=3, d_model=64, d_ff=128, n_head=4, max_seq_len=64, dropout=0.0)
    model = M.build_model(preset, enc, **{**shape, **overrides}).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    return model


def _ids(seed, n=8, T=32):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruned_model_checkpoint_round_trip(tmp_path, enc, method):
    model = _model(enc)
    P.prune_model(model, method, 0.5, 2, 4, ids=_ids(0))
    assert P.sparsity_of(model) == 0.5
    C.save_checkpoint(str(tmp_path / "p.pt"), model, enc)
    loaded, _, ckpt = C.load_model(str(tmp_path / "p.pt"))
    assert ckpt["sparsity"]["pattern"] == "2:4" and loaded.sparsity["method"] == method
    assert C.weight_masks(loaded).keys() == C.weight_masks(model).keys()
    for name, mask in C.weight_masks(model).items():
        assert torch.equal(C.weight_masks(loaded)[name], mask)
    x = _ids(1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_calibrated_pruning_beats_magnitude_on_a_model(enc):
    """Wanda and SparseGPT, each block fed the pruned blocks' outputs, keep the model's outputs closer than
    magnitude pruning on held-out ids."""
    held = _ids(9)
    with torch.no_grad():
        ref = _model(enc)(held)
    error = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = P.prune_model(_model(enc), method, 0.5, ids=_ids(0, n=16))
        with torch.no_grad():
            error[method] = (model(held) - ref).pow(2).mean().item()
    assert error["sparsegpt"] < error["magnitude"] and error["wanda"] < error["magnitude"], error


def _zeroed(model, heads, channels, embed=None):
    """The full model with the heads / MLP channels / embedding channels not kept zeroed where they are read or
    written: what the smaller model must compute (for embedding channels, see the test below)."""
    full = M.Transformer(model.cfg).eval()
    full.load_state_dict(model.state_dict())
    hd = model.cfg.head_size
    with torch.no_grad():
        for i, block in enumerate(full.blocks):
            dead = [h for h in range(model.cfg.n_head) if h not in heads[i]]
            for h in dead:
                block.attn.o.weight[:, h * hd:(h + 1) * hd] = 0
            dead_ch = [c for c in range(model.cfg.d_ff) if c not in channels[i]]
            block.mlp.down.weight[:, dead_ch] = 0
        if embed is not None:
            gone = [c for c in range(model.cfg.d_model) if c not in embed]
            full.embed.weight[:, gone] = 0
    return full


@pytest.mark.parametrize("preset,n_kv", [("tiny", 2), ("tiny", 4)])
def test_width_pruned_model_is_the_full_one_with_units_zeroed(tmp_path, enc, preset, n_kv):
    model = _model(enc, preset, n_kv_head=n_kv)
    cfg, sd = model.cfg, M.plain_state_dict(model)
    g = torch.Generator().manual_seed(0)
    layers = [0, 1, 2]
    if n_kv == cfg.n_head:  # MHA: whole heads with K and V
        kv = [torch.randperm(4, generator=g)[:3].sort().values for _ in layers]
        heads = kv
    else:  # GQA: one query head of each group's two
        heads = [torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([0, 2])]
        kv = [torch.arange(2)] * 3
    channels = [torch.randperm(128, generator=g)[:80].sort().values for _ in layers]
    small_sd, small_cfg = P.prune_state_dict(sd, cfg, layers, heads, kv, channels, torch.arange(64))
    small = M.Transformer(small_cfg).eval()
    small.load_state_dict(small_sd)
    C.save_checkpoint(str(tmp_path / "s.pt"), small, enc)
    loaded = C.load_model(str(tmp_path / "s.pt"))[0].eval()
    assert loaded.cfg == small_cfg and loaded.cfg.d_ff == 80 and loaded.num_params() < model.num_params()
    reference = _zeroed(model, heads, channels) if n_kv != cfg.n_head else None
    if reference is None:  # MHA: a removed head's K and V go too, which zeroing its o columns already covers
        reference = _zeroed(model, heads, channels)
    x = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-5)


def test_embedding_channels_pruned_is_the_zeroed_model_with_its_norms_rescaled(enc):
    """Removing residual channels changes what RMSNorm averages over: the smaller model's norms divide by the RMS of
    d' channels. It equals the full model with those channels zeroed (embedding columns, and hence the residual
    stream, every branch's output rows zeroed) when the full model's norm weights are scaled by sqrt(d' / d) and
    its epsilon by d' / d: then sqrt(S / d + eps d'/d) = sqrt(d'/d) sqrt(S / d' + eps) exactly."""
    model = _model(enc)
    cfg = model.cfg
    keep = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40].sort().values
    every = [torch.arange(4)] * 3
    sd, small_cfg = P.prune_state_dict(M.plain_state_dict(model), cfg, [0, 1, 2], every, [torch.arange(2)] * 3,
                                       [torch.arange(128)] * 3, keep)
    small = M.Transformer(small_cfg).eval()
    small.load_state_dict(sd)
    assert small_cfg.d_model == 40 and small_cfg.head_dim == 16  # the heads keep their width
    ratio = 40 / 64
    reference = M.Transformer(dataclasses.replace(cfg, norm_eps=cfg.norm_eps * ratio)).eval()
    reference.load_state_dict(model.state_dict())
    gone = [c for c in range(64) if c not in keep]
    with torch.no_grad():
        reference.embed.weight[:, gone] = 0
        for block in reference.blocks:
            block.attn.o.weight[gone] = 0
            block.mlp.down.weight[gone] = 0
        for mod in reference.modules():
            if isinstance(mod, M.RMSNorm):
                mod.weight.mul_(ratio ** 0.5)
        x = _ids(4)
        torch.testing.assert_close(small(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_depth_pruned_model_skips_the_removed_blocks(enc, preset):
    model = _model(enc, preset, n_layer=4, n_kv_head=4 if preset == "tiny-gpt2" else 2)
    ids = _ids(0)
    small, report = P.minitron_prune(model, ids, "depth", 0.75)
    kept = report["layers_kept"]
    assert small.cfg.n_layer == len(kept) < 4 and report["params_after"] <= 0.75 * report["params_before"]
    # the blocks dropped are those whose skipping raises the loss least
    order = torch.tensor(report["block_importance"])
    assert set(kept) == set(order.argsort(descending=True)[:len(kept)].tolist())
    x = _ids(5)
    with torch.no_grad():
        h, rope = model.embed_positions(x, torch.arange(x.shape[1]).expand_as(x))
        for i in kept:
            h = model.blocks[i](h, rope, None, None)
        torch.testing.assert_close(small(x), model.lm_head(model.norm(h)), rtol=1e-5, atol=1e-5)


def test_block_importance_is_the_loss_increase_when_skipped(enc):
    model = _model(enc, n_layer=3)
    ids = _ids(0, n=4)
    imp = P.block_importance(model, ids, batch_size=3)

    def loss(m):
        with torch.no_grad():
            logits = m(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    full = loss(model)
    for i in range(3):
        skipped = _model(enc, n_layer=3)
        skipped.blocks[i] = torch.nn.Identity()
        skipped.blocks[i].forward = lambda x, *a: x
        assert imp[i].item() == pytest.approx(loss(skipped) - full, abs=1e-4)


@pytest.mark.parametrize("structure", ["width", "depth", "both"])
def test_minitron_meets_its_parameter_target(enc, structure):
    model = _model(enc, n_layer=4)
    small, report = P.minitron_prune(model, _ids(0), structure, 0.5)
    assert report["params_after"] == small.num_params() <= 0.5 * report["params_before"]
    if structure == "depth":  # one block more would be over the target
        bigger = dataclasses.replace(small.cfg, n_layer=small.cfg.n_layer + 1)
        assert P.count_params(bigger) > 0.5 * report["params_before"]
    else:
        assert report["params_after"] > 0.4 * report["params_before"]
    if structure != "width":
        assert small.cfg.n_layer < 4
    if structure != "depth":
        assert small.cfg.d_ff < 128 and small.cfg.d_model < 64


def test_minitron_width_on_a_shape_whose_heads_do_not_divide_the_new_width(enc):
    """SmolLM2's shape in small: 9 heads in 3 KV groups over d_model 72 (head_dim 8); 40% of the parameters keeps 6
    heads over d_model 40, which no head count divides: the head width is written out (head_dim) and it loads."""
    model = _model(enc, n_layer=2, n_head=9, n_kv_head=3, d_model=72, d_ff=192)
    small, report = P.minitron_prune(model, _ids(0), "width", 0.4)
    assert (small.cfg.n_head, small.cfg.head_dim, small.cfg.d_model) == (6, 8, 40)
    assert report["params_after"] <= 0.4 * report["params_before"]
    with torch.no_grad():
        assert torch.isfinite(small(_ids(1))).all()


def test_importance_ranks_a_silenced_unit_last(enc):
    """A head, an MLP channel and an embedding channel made silent have the lowest importance."""
    model = _model(enc, n_layer=2)
    with torch.no_grad():
        model.blocks[0].attn.v.weight[16:32] = 0  # kv head 1 feeds query heads 2, 3: silence head 2's values too
        model.blocks[1].mlp.up.weight[7] = 0
        model.embed.weight[:, 5] = 0
        for block in model.blocks:
            block.attn.o.weight[5] = 0
            block.mlp.down.weight[5] = 0
            block.norm1.weight[5] = block.norm2.weight[5] = 0
        model.norm.weight[5] = 0
    imp = P.unit_importance(model, _ids(0))
    assert imp["heads"][0, 2:].max() < imp["heads"][0, :2].min()
    assert imp["channels"][1].argmin() == 7 and imp["embed"].argmin() == 5


# ----------------------------------------------------------------------------- masks through training


def _sparse_ckpt(tmp_path, enc, pattern="2:4"):
    path = save_tiny(tmp_path / "fp.pt", enc, std=0.05)
    P.main(["--model", path, "--method", "magnitude", "--pattern", pattern, "--out", str(tmp_path / "sparse.pt")])
    return str(tmp_path / "sparse.pt")


def _zeros_kept(before, after):
    for name, mask in C.weight_masks(before).items():
        w_after = after.state_dict()[name]
        assert (w_after[~mask] == 0).all(), name
        assert torch.equal(C.weight_masks(after)[name], mask), name


@pytest.mark.parametrize("lora", [False, True])
def test_masks_survive_fine_tuning(tmp_path, enc, lora):
    sparse = _sparse_ckpt(tmp_path, enc)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join('{"messages": [{"role": "user", "content": "hi %d"}, {"role": "assistant", '
                             '"content": "hello there %d"}]}\n' % (i, i) for i in range(16)))
    args = ["--model", sparse, "--data", str(chats), "--out", str(tmp_path / "ft.pt"), "--steps", "3",
            "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--eval-every", "0"]
    sft.main([*args, *(["--lora-rank", "4"] if lora else [])])
    before, after = C.load_model(sparse)[0], C.load_model(str(tmp_path / "ft.pt"))[0]
    _zeros_kept(before, after)
    w0, w1 = before.state_dict()["blocks.0.mlp.up.weight"], after.state_dict()["blocks.0.mlp.up.weight"]
    assert not torch.equal(w0, w1)  # it did train


def test_distilling_into_a_sparse_model_keeps_its_zeros(tmp_path, enc):
    """Healing a pruned student from the dense teacher: distill.py trains through the same masked optimiser."""
    sparse = _sparse_ckpt(tmp_path, enc, "unstructured")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    distill.main(["--teacher", str(tmp_path / "fp.pt"), "--model", sparse, "--data", str(text), "--format", "text",
                  "--out", str(tmp_path / "kd.pt"), "--steps", "2", "--batch-size", "4", "--seq-len", "64", "--lr",
                  "1e-2", "--eval-every", "0", "--warmup", "0"])
    before, after = C.load_model(sparse)[0], C.load_model(str(tmp_path / "kd.pt"))[0]
    _zeros_kept(before, after)
    assert not torch.equal(before.state_dict()["blocks.1.attn.v.weight"], after.state_dict()["blocks.1.attn.v.weight"])


def test_dpo_on_a_sparse_model_keeps_its_zeros(tmp_path, enc):
    sparse = _sparse_ckpt(tmp_path, enc, "unstructured")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join('{"prompt": "q%d", "chosen": "good %d", "rejected": "bad"}\n' % (i, i)
                             for i in range(8)))
    dpo.main(["--model", sparse, "--data", str(prefs), "--out", str(tmp_path / "dpo.pt"), "--steps", "2",
              "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--eval-every", "0", "--kl-prompts", "0"])
    _zeros_kept(C.load_model(sparse)[0], C.load_model(str(tmp_path / "dpo.pt"))[0])


# ----------------------------------------------------------------------------- the CLI


def test_cli_prunes_and_reports(tmp_path, enc):
    path = save_tiny(tmp_path / "fp.pt", enc, std=0.05, n_layer=3)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    data = ["--data", str(text), "--calib-samples", "8", "--calib-len", "32", "--eval-samples", "4"]
    proc = run_script("prune.py", "--model", path, "--method", "sparsegpt", "--target", "0.5", *data,
                      "--out", str(tmp_path / "sgpt.pt"))
    assert "50.0% of the blocks' weights zero" in proc.stderr and "perplexity" in proc.stderr
    P.main(["--model", path, "--method", "minitron", "--structure", "both", "--target", "0.6", *data, "--out",
            str(tmp_path / "small.pt")])
    small, _, ckpt = C.load_model(str(tmp_path / "small.pt"))
    assert ckpt["metrics"]["params_after"] == small.num_params() < ckpt["metrics"]["params_before"]
    assert ckpt["lineage"][-1] == "prune:minitron:both"
    P.main(["--model", path, "--method", "minitron", "--n-layer", "2", "--heads", "1", "--d-ff", "64", "--d-model",
            "48", *data, "--out", str(tmp_path / "shaped.pt")])
    shaped = C.load_model(str(tmp_path / "shaped.pt"))[0]
    assert (shaped.cfg.n_layer, shaped.cfg.n_head, shaped.cfg.d_ff, shaped.cfg.d_model) == (2, 2, 64, 48)
    evaluate.main(["--model", f"{tmp_path / 'sgpt.pt'},{tmp_path / 'shaped.pt'}", "--text", str(text), "--seq-len",
                   "32", "--no-speed", "--out", str(tmp_path / "eval.json")])
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert len(rows) == 2 and all(r["ppl"] > 1 for r in rows), rows


REFUSALS = [
    (["--method", "nope"], "--method 'nope'"),
    (["--method", "wanda"], "needs calibration data"),
    (["--method", "magnitude", "--pattern", "4:2"], "--pattern '4:2'"),
    (["--method", "magnitude", "--pattern", "3:7"], "not a multiple of 7"),
    (["--method", "magnitude", "--target", "1.5"], "--target 1.5"),
    (["--method", "minitron", "--data", "x.txt", "--n-layer", "2"], "all four, or none"),
    (["--method", "minitron", "--data", "x.txt", "--structure", "deep"], "--structure 'deep'"),
    (["--method", "minitron", "--data", "x.txt", "--n-layer", "9", "--heads", "1", "--d-ff", "8", "--d-model", "8"],
     "at most the model's"),
]


def test_cli_refusals(tmp_path, enc):
    """Each impossible flag combination refused with its reason, before anything is written; the first as the
    script does it for a user: exit code 2 and one line."""
    path = save_tiny(tmp_path / "fp.pt", enc)
    out = ["--model", path, "--out", str(tmp_path / "o.pt")]
    assert_one_line_error(run_script("prune.py", *out, *REFUSALS[0][0], check=False), "", REFUSALS[0][1])
    for flags, message in REFUSALS:
        with pytest.raises(C.UserError, match=re.escape(message)):
            P.main([*out, *flags])
    assert not (tmp_path / "o.pt").exists()


def test_corrupt_masks_are_refused(tmp_path, enc):
    sparse = _sparse_ckpt(tmp_path, enc)
    ckpt = torch.load(sparse, weights_only=True)
    name = next(iter(ckpt["sparsity"]["masks"]))
    for bad, message in [({**ckpt["sparsity"]["masks"], "blocks.9.attn.q.weight": ckpt["sparsity"]["masks"][name]},
                          "names no linear weight"),
                         ({name: ckpt["sparsity"]["masks"][name][:, :1]}, "is not a uint8 tensor of shape"),
                         ({name: ckpt["sparsity"]["masks"][name].float()}, "is not a uint8 tensor")]:
        torch.save({**ckpt, "sparsity": {**ckpt["sparsity"], "masks": bad}}, str(tmp_path / "bad.pt"))
        with pytest.raises(C.UserError, match=message):
            C.load_model(str(tmp_path / "bad.pt"))
