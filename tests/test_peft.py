"""PEFT beyond LoRA (model.py's LoRALinear with DoRA / rsLoRA, Prefix and apply_prefix; common.resume_and_peft):
each adapter against an independent route to the same numbers, parameter counts against their formulas, the frozen
base untouched by training, the sampler == trainer contract through a prefix, and the --peft flags of the scripts.

    python -m pytest tests/test_peft.py -q
"""
import copy
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import common as C
import model as M
from conftest import assert_refused, run_script, save_tiny

PAD = 259  # <|pad|> of the byte tokenizer


@pytest.fixture(params=["tiny", "tiny-gpt2"])
def base(request, enc):
    torch.manual_seed(0)
    model = M.build_model(request.param, enc, n_layer=2, d_model=64, d_ff=128).eval()
    for p in model.parameters():  # larger weights than the init so differences would show
        torch.nn.init.normal_(p, std=0.1)
    return model


def ids_of(B=2, T=9, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_prefix_equals_the_plain_model_with_those_keys_and_values_in_its_cache(base):
    """A prefix-tuned forward (no cache given: the model makes one) against the plain model run on a cache filled
    by hand with the prefix's keys and values, slot by slot, and the tokens after them."""
    tuned = M.apply_prefix(copy.deepcopy(base), 5, "prefix")
    with torch.no_grad():
        for t in (tuned.prefix.keys, tuned.prefix.values):
            t.add_(torch.randn_like(t) * 0.3)  # not the initial keys: anything learned
        ids = ids_of()
        got = tuned(ids)
        cache = M.KVCache(base.cfg, 2, 5 + ids.shape[1], ids.device, torch.float32)
        for layer in range(base.cfg.n_layer):
            cache.k[layer][:, :, :5] = tuned.prefix.keys[layer]
            cache.v[layer][:, :, :5] = tuned.prefix.values[layer]
        cache.valid[:, :5] = True
        cache.seen += 5
        cache.pos += 5
        want = base(ids, cache=cache)
    assert (got - want).abs().max() < 1e-5


def test_prompt_tuning_equals_prepending_the_embeddings_by_hand(base):
    """Prompt tuning against a plain model whose vocabulary gains p rows holding the learned embeddings, run on
    those p ids followed by the tokens: the tokens' logits agree."""
    tuned = M.apply_prefix(copy.deepcopy(base), 4, "prompt")
    with torch.no_grad():
        tuned.prefix.embeds.add_(torch.randn_like(tuned.prefix.embeds) * 0.3)
        V = base.cfg.vocab_size
        wide = M.Transformer(M.Config(**{**base.cfg.__dict__, "vocab_size": V + 4})).eval()
        sd = base.state_dict()
        sd["embed.weight"] = torch.cat([sd["embed.weight"], tuned.prefix.embeds])
        sd["lm_head.weight"] = sd["embed.weight"]  # tied
        wide.load_state_dict(sd)
        ids = ids_of()
        got = tuned(ids)
        full = wide(torch.cat([torch.arange(V, V + 4).expand(2, 4), ids], 1))[:, 4:, :V]
    assert (got - full).abs().max() < 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_at_initialisation_is_the_base_exactly_and_merges_like_lora(base, rslora):
    ids = ids_of()
    with torch.no_grad():
        want = base(ids)
    for dora in (False, True):
        tuned = M.apply_lora(copy.deepcopy(base), 4, dora=dora, rslora=rslora)
        with torch.no_grad():
            assert torch.equal(tuned(ids), want)  # B = 0 (and DoRA's m = ||W||): bit for bit the base
            for m in M.lora_layers(tuned):
                torch.nn.init.normal_(m.lora_b, std=0.2)
                if dora:
                    m.lora_magnitude.mul_(1 + 0.1 * torch.randn_like(m.lora_magnitude))
            unmerged = tuned(ids)
            for m in M.lora_layers(tuned):
                m.merge()
            merged = tuned(ids)
            plain = M.Transformer(base.cfg).eval()
            plain.load_state_dict(M.plain_state_dict(tuned))
            for m in M.lora_layers(tuned):
                m.unmerge()
            back = tuned(ids)
        assert (merged - unmerged).abs().max() < 1e-4 and (plain(ids) - unmerged).abs().max() < 1e-4
        assert (unmerged - want).abs().max() > 1e-3  # the adapters do change the model
        assert torch.equal(back, unmerged) if dora else (back - unmerged).abs().max() < 1e-5


def test_rslora_scales_by_alpha_over_sqrt_rank(base):
    for rank in (1, 4, 16):
        lora = M.apply_lora(copy.deepcopy(base), rank, alpha=8)
        rs = M.apply_lora(copy.deepcopy(base), rank, alpha=8, rslora=True)
        assert all(m.scale == 8 / rank for m in M.lora_layers(lora))
        assert all(abs(m.scale - 8 / rank ** 0.5) < 1e-12 for m in M.lora_layers(rs))


def test_trainable_parameter_counts_equal_their_formulas(base):
    cfg = base.cfg
    L, d, hd, nkv, nh, ff = cfg.n_layer, cfg.d_model, cfg.head_size, cfg.n_kv_head, cfg.n_head, cfg.d_ff
    linears = [(d, nh * hd), (d, nkv * hd), (d, nkv * hd), (nh * hd, d), (d, ff), (ff, d)]  # q k v o up down
    if cfg.arch == "llama":
        linears.append((d, ff))  # gate
    r, p = 4, 6
    lora = L * sum(r * (i + o) for i, o in linears)
    want = {"lora": lora, "dora": lora + L * sum(o for _, o in linears), "prefix": L * 2 * nkv * p * hd,
            "prefix-mlp": p * d + (d * d + d) + (d * 2 * L * nkv * hd + 2 * L * nkv * hd), "prompt": p * d}
    for kind, n in want.items():
        model = copy.deepcopy(base)
        args = dict(resume="", lora_rank=r if kind in ("lora", "dora") else 0, lora_alpha=0.0, peft=kind, peft_len=p)
        C.resume_and_peft(model, type("Cfg", (), args))
        assert model.num_params(trainable=True) == n, kind


@pytest.mark.parametrize("kind", ["lora", "dora", "prefix", "prefix-mlp", "prompt"])
def test_training_an_adapter_leaves_the_base_bit_identical(base, kind):
    model = copy.deepcopy(base).train()
    args = dict(resume="", lora_rank=4 if kind in ("lora", "dora") else 0, lora_alpha=0.0, peft=kind, peft_len=4)
    C.resume_and_peft(model, type("Cfg", (), args))
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    adapter = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    opt = C.make_optimizer(model, 1e-2, weight_decay=0.1)
    for step in range(3):
        ids = ids_of(seed=step)
        loss = -M.token_logprobs(model(ids), ids).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert frozen and all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, dict(model.named_parameters())[k]) for k, v in adapter.items())


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_prefix_generate_logprobs_equal_the_trainer_and_disabling_gives_the_base(base, kind):
    tuned = M.apply_prefix(copy.deepcopy(base), 3, kind).eval()
    prompts = [[10, 11, 12, 13], [20], [30, 31]]
    tokens, logps, mask = M.generate(tuned, prompts, 8, 0.9, 20, 0.9, pad_id=PAD,
                                     generator=torch.Generator().manual_seed(0))
    prompt_ids, prompt_mask = M.pad_left(prompts, PAD)
    seq = torch.cat([prompt_ids, tokens], 1)
    banned = M.ban_mask(tuned.cfg.vocab_size, [PAD])
    with torch.no_grad():
        logits = tuned(seq, attention_mask=torch.cat([prompt_mask, mask], 1))
        want = M.token_logprobs(M.filter_logits(logits, 0.9, 20, 0.9, banned), seq)[:, prompt_ids.shape[1]:]
        assert ((want - logps) * mask).abs().max() < 1e-4
        with M.lora_disabled(tuned):
            assert torch.equal(tuned(seq), base(seq))


packable = st.integers(1, 10).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 255), min_size=n, max_size=n),
                                                          st.lists(st.integers(0, 1), min_size=n, max_size=n)))


@given(st.lists(packable, min_size=1, max_size=5), st.sampled_from(["prefix", "prompt"]))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_packed_rows_through_a_prefix_equal_each_example_alone(base, examples, kind):
    """Packed rows with a prefix take the cache path with doc_ids: every document sees the prefix, never another
    document, and counts its positions from the prefix's end."""
    tuned = M.apply_prefix(copy.deepcopy(base), 3, kind).eval()
    ids, mask, doc = C.pack(examples, 12, PAD)
    assume(ids.shape[0] > 0)
    with torch.no_grad():
        packed = tuned(ids, doc_ids=doc)
        for r in range(ids.shape[0]):
            for d in doc[r].unique():
                where = (doc[r] == d).nonzero()[:, 0]
                alone = tuned(ids[r, where][None])[0]
                assert (packed[r, where] - alone).abs().max() < 1e-4


def test_export_and_gguf_refuse_a_prefix_in_one_line(base, enc, tmp_path):
    import formats
    import gguf_file
    tuned = M.apply_prefix(copy.deepcopy(base), 3, "prompt")
    with pytest.raises(M.UserError, match="prompt adapter .3 learned slots. is a learned start of the KV cache"):
        formats.export_hf(tuned, enc, str(tmp_path / "hf"))
    with pytest.raises(M.UserError, match="GGUF: a prompt adapter"):
        gguf_file.write_gguf(str(tmp_path / "x.gguf"), M.plain_state_dict(tuned), tuned.cfg, enc, kind="f32")


def test_a_prefix_checkpoint_saves_folded_and_loads_with_the_same_outputs(base, enc, tmp_path):
    tuned = M.apply_prefix(copy.deepcopy(base), 4, "prefix", reparam=16)
    with torch.no_grad():
        for p in tuned.prefix.mlp.parameters():
            p.normal_(0, 0.1)
        ids = ids_of()
        want = tuned(ids)
    C.save_checkpoint(str(tmp_path / "p.pt"), tuned, enc)
    back = C.load_model(str(tmp_path / "p.pt"))[0].eval()
    assert back.prefix.mlp is None and back.cfg.prefix_len == 4
    with torch.no_grad():
        assert (back(ids) - want).abs().max() < 1e-5


# ----------------------------------------------------------------------------- the scripts


@pytest.mark.parametrize("peft", ["dora", "prefix", "prompt"])
def test_sft_trains_each_adapter_and_resumes(tmp_path, enc, toy_dir, peft):
    init = save_tiny(tmp_path / "init.pt", enc)
    args = ["--model", init, "--data", os.path.join(toy_dir, "sft.jsonl"), "--batch-size", "4", "--seq-len", "64",
            "--device", "cpu", "--peft", peft, "--peft-len", "4", "--lr", "1e-2"]
    if peft == "dora":
        args += ["--lora-rank", "4"]
    straight, first = str(tmp_path / "straight.pt"), str(tmp_path / "first.pt")
    run_script("sft.py", *args, "--steps", "4", "--out", straight)
    run_script("sft.py", *args, "--steps", "4", "--stop-at", "2", "--out", first)
    run_script("sft.py", *args, "--steps", "4", "--resume", first, "--out", str(tmp_path / "resumed.pt"))
    a, b = C.load_checkpoint(straight)["model"], C.load_checkpoint(str(tmp_path / "resumed.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # resume == straight run, bit for bit on CPU
    base = C.load_checkpoint(init)["model"]
    if peft != "dora":  # the base weights are saved as they were; the prefix beside them
        assert all(torch.equal(base[k], a[k]) for k in base) and any(k.startswith("prefix.") for k in a)


def test_dpo_and_ppo_train_a_prompt_adapter_over_a_frozen_base(tmp_path, enc, toy_dir):
    """The reference is the base with the adapter off (lora_disabled), so no second model; the base weights come
    out as they went in, the learned prompt beside them."""
    init = save_tiny(tmp_path / "init.pt", enc)
    common = ["--model", init, "--steps", "2", "--batch-size", "4", "--device", "cpu", "--peft", "prompt",
              "--peft-len", "4"]
    run_script("dpo.py", *common, "--data", os.path.join(toy_dir, "prefs.jsonl"), "--seq-len", "64",
               "--out", str(tmp_path / "dpo.pt"))
    run_script("ppo.py", *common, "--data", os.path.join(toy_dir, "prompts.jsonl"), "--advantage", "grpo",
               "--group-size", "2", "--max-new-tokens", "8", "--eval-every", "0",
               "--reward", "data/toyworld.py:gold_reward", "--out", str(tmp_path / "ppo.pt"))
    base = C.load_checkpoint(init)["model"]
    for name in ("dpo", "ppo"):
        got = C.load_checkpoint(str(tmp_path / f"{name}.pt"))["model"]
        assert all(torch.equal(base[k], got[k]) for k in base) and got["prefix.embeds"].shape == (4, 64)


def test_impossible_peft_flags_are_refused(tmp_path, enc, toy_dir):
    init = save_tiny(tmp_path / "init.pt", enc)
    base = ["--model", init, "--data", os.path.join(toy_dir, "sft.jsonl"), "--steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "o.pt"), "--seq-len", "64"]
    assert_refused("sft.py", *base, "--peft", "ia3", message="--peft ia3: choose from lora, dora, prefix")
    assert_refused("sft.py", *base, "--peft", "prefix", "--lora-rank", "4", message="leave out --lora-rank")
    assert_refused("sft.py", *base, "--peft", "prompt", "--peft-len", "0", message="needs --peft-len >= 1")
    assert_refused("sft.py", *base, "--peft", "prefix", "--rslora", message="--rslora scales LoRA / DoRA")
    assert_refused("sft.py", *base, "--peft", "dora", "--lora-dropout", "0.1", message="DoRA here takes no LoRA")
    assert_refused("sft.py", *base[:-2], "--seq-len", "128", "--peft", "prefix", message="together they exceed")


@pytest.mark.parametrize("peft", ["lora", "dora", "prefix-mlp", "prompt"])
def test_an_adapter_file_over_its_base_gives_the_trained_model_and_refuses_another_base(tmp_path, enc, toy_dir, peft):
    init = save_tiny(tmp_path / "init.pt", enc)
    out = str(tmp_path / "sft.pt")
    run_script("sft.py", "--model", init, "--data", os.path.join(toy_dir, "sft.jsonl"), "--batch-size", "4",
               "--seq-len", "64", "--device", "cpu", "--peft", peft, "--peft-len", "4", "--lora-rank",
               "4" if peft in ("lora", "dora") else "0", "--steps", "2", "--lr", "1e-2", "--out", out)
    adapter = str(tmp_path / "sft.adapter.pt")
    ckpt = C.load_checkpoint(adapter)
    assert ckpt["format"] == "adapter" and ckpt["base"]["path"] == os.path.abspath(init)
    assert os.path.getsize(adapter) < os.path.getsize(out)  # the adapter alone is the small file
    full, over = C.load_model(out)[0].eval(), C.load_model(adapter)[0].eval()
    ids = ids_of()
    with torch.no_grad():
        assert (full(ids) - over(ids)).abs().max() < 1e-5
    other = save_tiny(tmp_path / "other.pt", enc, std=0.05)  # the same shapes, other weights
    with pytest.raises(M.UserError, match=r"sft\.adapter\.pt: trained over another base than .*other\.pt"):
        C.load_adapter(ckpt, adapter, base=other)
    os.replace(other, init)  # another model at the path the adapter names
    assert_refused("evaluate.py", "--model", adapter, "--data", os.path.join(toy_dir, "eval.jsonl"),
                   message="trained over another base than")


# ----------------------------------------------------------------------------- forgetting: replay and KL-to-start


def sft_args(init, toy_dir, out, *extra):
    return ["--model", init, "--data", os.path.join(toy_dir, "sft.jsonl"), "--batch-size", "4", "--seq-len", "64",
            "--device", "cpu", "--steps", "4", "--warmup", "1", "--lr", "1e-2", "--eval-every", "0", "--out", out,
            *extra]


def test_replay_kl_at_zero_weight_is_plain_training_bit_for_bit(tmp_path, enc, toy_dir):
    """The KL-to-start term's extra forward changes nothing when its weight is 0: same data stream, same weights."""
    init = save_tiny(tmp_path / "init.pt", enc)
    plain, kl0 = str(tmp_path / "plain.pt"), str(tmp_path / "kl0.pt")
    run_script("sft.py", *sft_args(init, toy_dir, plain))
    run_script("sft.py", *sft_args(init, toy_dir, kl0, "--replay", os.path.join(toy_dir, "pretrain.txt") + ":0.5",
                                   "--replay-loss", "kl", "--kl-coef", "0"))
    a, b = C.load_checkpoint(plain)["model"], C.load_checkpoint(kl0)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora", [False, True])
def test_kl_to_start_is_zero_at_the_start_then_grows(tmp_path, enc, toy_dir, lora):
    init = save_tiny(tmp_path / "init.pt", enc)
    log = str(tmp_path / "log.jsonl")
    run_script("sft.py", *sft_args(init, toy_dir, str(tmp_path / "o.pt"), "--replay",
                                   os.path.join(toy_dir, "pretrain.txt") + ":0.5", "--replay-loss", "kl", "--log", log,
                                   *(["--lora-rank", "4"] if lora else [])))
    kl = [json.loads(line)["kl_start"] for line in open(log)]
    assert abs(kl[0]) < 1e-6 and kl[-1] > 1e-4  # the start is itself; training moves away from it


def test_replay_lm_loss_is_the_token_mean_over_data_and_replay_rows(tmp_path, enc, toy_dir):
    """The first step's logged loss (before any update) against the rows computed by hand: the data rows and the
    replay rows the step reads (their own stream, k = round(B f / (1 - f)) per micro-batch), one token mean."""
    import sft
    init = save_tiny(tmp_path / "init.pt", enc)
    log, replay = str(tmp_path / "log.jsonl"), os.path.join(toy_dir, "pretrain.txt")
    run_script("sft.py", *sft_args(init, toy_dir, str(tmp_path / "o.pt"), "--replay", replay + ":0.5", "--log", log))
    cfg = sft.Config(data=os.path.join(toy_dir, "sft.jsonl"), batch_size=4, seq_len=64, replay=replay + ":0.5")
    model = C.load_model(init)[0].eval()
    rows = sft.make_rows(sft.split(sft.tokenize(cfg, enc)[0], cfg.eval_frac, cfg.seed)[0], cfg, PAD)
    r_rows, k = sft.replay_rows(cfg, enc, PAD)
    assert k == 4
    data_b = C.step_indices(0, len(rows[0]), 4, slice(0, 4), cfg.seed)
    replay_b = C.step_indices(0, len(r_rows[0]), 4, slice(0, 4), cfg.seed + 1)
    nll, n = 0.0, 0
    with torch.no_grad():
        for table, b in ((rows, data_b), (r_rows, replay_b)):
            ids, mask, doc = sft.batch_of(table, b, "cpu")
            s, c = sft.lm_loss_sum(model(ids, doc_ids=doc), ids, mask)
            nll, n = nll + s.item(), n + c.item()
    assert abs(json.loads(open(log).readline())["loss"] - nll / n) < 1e-4


def test_bad_replay_flags_are_refused(tmp_path, enc, toy_dir):
    init = save_tiny(tmp_path / "init.pt", enc)
    args = sft_args(init, toy_dir, str(tmp_path / "o.pt"))
    text = os.path.join(toy_dir, "pretrain.txt")
    assert_refused("sft.py", *args, "--replay", text, message="expected FILE:FRACTION with 0 < FRACTION < 1")
    assert_refused("sft.py", *args, "--replay", text + ":1.5", message="expected FILE:FRACTION")
    assert_refused("sft.py", *args, "--replay", text + ":0.2", "--replay-loss", "l2", message="and lm or kl")
    assert_refused("sft.py", *args, "--replay-loss", "kl", message="give --replay FILE:FRACTION")
