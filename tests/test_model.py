"""model.py: the transformer against transformers' GPT-2 / Llama / Qwen2, the KV cache, packing, sampling,
tokenizer and chat mask, LoRA, checkpoints (round trips, crashes, malicious and corrupt files), data loading,
the CLI helper, DDP gradients and the preset table.

    python -m pytest tests/test_model.py -q -x
"""
import base64
import copy
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

import common as C
import formats
import model as M
from conftest import ROOT, run_script

SMALL = dict(vocab_size=260, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64)
PAD = 259  # <|pad|> of the byte tokenizer
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand_model(seed=0, **overrides):
    """A small model with std-0.1 weights (norm gains 1 +- 0.1) so that any mismatch shows in the logits."""
    torch.manual_seed(seed)
    model = M.Transformer(M.Config(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model


GPT2 = dict(arch="gpt2", n_kv_head=4)


@pytest.fixture(scope="module")
def models():
    """One small model per arch, shared by the hypothesis tests (never modified)."""
    return {"llama": rand_model(), "gpt2": rand_model(**GPT2)}


@pytest.fixture(scope="module")
def gpt2_enc():
    return C.get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def tf():
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


# ----------------------------------------------------------------------------- transformers cross-check


EXPORTS = {
    "gpt2-tied": (GPT2, "GPT2LMHeadModel"),
    "gpt2-untied": ({**GPT2, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "llama-gqa-untied-theta": (dict(n_kv_head=2, tie_embeddings=False, rope_theta=5e5), "LlamaForCausalLM"),
    "llama-mha-tied": (dict(n_kv_head=4), "LlamaForCausalLM"),
    "qwen2-qkv-bias": (dict(n_kv_head=1, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6), "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_hf_matches_transformers(tf, enc, tmp_path, name):
    overrides, cls = EXPORTS[name]
    ours = rand_model(**overrides)
    formats.export_hf(ours, enc, str(tmp_path))
    theirs = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(theirs).__name__ == cls
    idx = torch.randint(0, 260, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(idx)
        assert (theirs(idx).logits - want).abs().max() < 1e-4
        back, _, _ = C.load_model(str(tmp_path))  # and our own reader of the directory we wrote
        assert back.cfg == ours.cfg
        assert (back(idx) - want).abs().max() < 1e-4


def write_byte_ranks(path):
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))


HF_DIRS = {
    # real GPT-2's vocabulary (50257 ids): load_model adds rows for our ChatML tokens
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, rope_theta=5e5, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", HF_DIRS)
def test_load_model_of_transformers_directory(tf, tmp_path, name):
    config_cls, model_cls, kw = HF_DIRS[name]
    torch.manual_seed(0)
    theirs = getattr(tf, model_cls)(getattr(tf, config_cls)(**kw)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.1)
    theirs.save_pretrained(str(tmp_path))
    if name != "gpt2":
        write_byte_ranks(tmp_path / "tokenizer.tiktoken")
    ours, enc, _ = C.load_model(str(tmp_path))
    V = kw["vocab_size"]
    assert ours.cfg.vocab_size == enc.n_vocab >= V
    assert ours.cfg.qkv_bias == (name == "qwen2") and ours.cfg.tie_embeddings == (name != "llama")
    idx = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[..., :V] - theirs(idx).logits).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_matches_transformers(tf, enc, tmp_path, arch):
    ours = rand_model(**(GPT2 if arch == "gpt2" else dict(n_kv_head=2, rope_theta=5e5)))
    formats.export_hf(ours, enc, str(tmp_path))
    theirs = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = M.pad_left([[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]], PAD)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # HF does not derive positions from the mask in forward
    with torch.no_grad():
        want = theirs(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 1e-4


# ----------------------------------------------------------------------------- padding, KV cache, packing


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_padded_rows_equal_rows_alone(tiny_model, padding):
    seqs = [[1, 2, 3, 4, 5, 6, 7, 8], [40, 41, 42], [90, 91, 92, 93, 94]]
    if padding == "none":
        seqs = [s[:3] for s in seqs]
    if padding == "right":
        ids, mask = C.pad_right(seqs, PAD), C.pad_right([[1] * len(s) for s in seqs], 0)
    else:
        ids, mask = M.pad_left(seqs, PAD)
    with torch.no_grad():
        batch = tiny_model(ids, attention_mask=mask)
        for b, s in enumerate(seqs):
            alone = tiny_model(torch.tensor([s]))[0]
            assert (batch[b][mask[b].bool()] - alone).abs().max() < 1e-4


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_equals_full_recompute(tiny_model, padded):
    g = torch.Generator().manual_seed(2)
    B, T, P = 3, 13, 6
    ids = torch.randint(0, 256, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:  # left padding inside the prefill, every row keeps at least one real prompt token
        mask[1, :3], mask[2, :5] = 0, 0
    am = mask if padded else None
    with torch.no_grad():
        full = tiny_model(ids, attention_mask=am)
        cache = tiny_model.new_cache(B, T)
        chunks = [tiny_model(ids[:, :P], attention_mask=None if am is None else am[:, :P], cache=cache)]
        for a, b in [(6, 7), (7, 10), (10, 11), (11, 13)]:  # single tokens and several at once
            chunks.append(tiny_model(ids[:, a:b], cache=cache))
    got = torch.cat(chunks, 1)  # (B, T, V)
    real = mask.bool()
    assert cache.pos == T
    assert (got[real] - full[real]).abs().max() < 1e-4


def naive_positions(doc_ids):
    out = []
    for row in doc_ids:
        pos = []
        for t, d in enumerate(row):
            pos.append(0 if t == 0 or d != row[t - 1] else pos[-1] + 1)
        out.append(pos)
    return out


@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=20), min_size=1, max_size=4)
       .filter(lambda rows: len({len(r) for r in rows}) == 1))
@settings(max_examples=100, deadline=None)
def test_positions_from_docs_matches_naive_loop(rows):
    assert M.positions_from_docs(torch.tensor(rows)).tolist() == naive_positions(rows)


packable = st.integers(0, 14).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 255), min_size=n, max_size=n),
                                                          st.lists(st.integers(0, 1), min_size=n, max_size=n)))


@given(st.lists(packable, min_size=1, max_size=6), st.sampled_from(["llama", "gpt2"]))
@example([([7] * 12, [1] * 12), ([], [])], "llama")  # an empty example after a full row
@example([([1, 2, 3] * 6, [1] * 18), ([4, 5], [0, 1])], "gpt2")  # longer than seq_len: cut
@FAST
def test_pack_equals_examples_one_by_one(models, examples, arch):
    seq_len = 12
    ids, mask, doc = C.pack(examples, seq_len, PAD)
    model = models[arch]
    with torch.no_grad():
        packed = model(ids, doc_ids=doc)
    todo = [(i[:seq_len], m[:seq_len]) for i, m in examples if i]  # cut to seq_len, empty ones vanish
    filled = sum(len(i) for i, _ in todo)
    assert (ids != PAD).sum() <= filled and ids.shape[0] <= len(todo)
    for r in range(ids.shape[0]):
        t = 0
        while t < seq_len:
            run = int((doc[r, t:] == doc[r, t]).long().cumprod(0).sum())  # length of this document
            # pack reorders examples (best-fit decreasing): find this document among those still to place
            match = [k for k, (i, m) in enumerate(todo)
                     if i == ids[r, t:t + run].tolist() and mask[r, t:t + run].tolist() == [0] + m[1:]]
            if match:  # ids match and the first token is never a target
                ex_ids, ex_mask = todo.pop(match[0])
                with torch.no_grad():
                    alone = model(torch.tensor([ex_ids]))[0]
                assert (packed[r, t:t + run] - alone).abs().max() < 1e-4
            else:  # the padding tail: the row's last document, pads only, never a target
                assert t + run == seq_len and ids[r, t:].eq(PAD).all() and mask[r, t:].eq(0).all()
            t += run
    assert todo == []


@given(st.lists(packable, min_size=1, max_size=6), st.sampled_from(["llama", "gpt2"]), st.booleans())
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_packed_flex_attention_equals_dense_mask(models, monkeypatch, examples, arch, with_valid):
    """On CUDA packed rows take flex_attention with a document BlockMask: the same logits as the dense-mask path
    (here flex_attention's eager form on the CPU, forward only: it has no CPU backward), with and without a pad
    mask beside the documents."""
    ids, mask, doc = C.pack(examples, 12, PAD)
    assume(ids.shape[0] > 0)  # every example empty: no rows
    valid = (ids != PAD).long() if with_valid else None
    model = models[arch]
    with torch.no_grad():
        dense = model(ids, doc_ids=doc, attention_mask=valid)
        monkeypatch.setattr(M, "FLEX_DEVICES", {"cpu"})
        flex = model(ids, doc_ids=doc, attention_mask=valid)
        monkeypatch.undo()
    assert (flex - dense).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grad_checkpointing_gives_the_same_gradients(models, arch):
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for on in (False, True):
        model = copy.deepcopy(models[arch]).train()
        model.grad_checkpointing = on
        M.token_logprobs(model(idx), idx).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):  # the same ops recomputed in the same order: equal up to float noise of the scale
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


# ----------------------------------------------------------------------------- sampling


def naive_token_logprobs(logits, ids, mask):
    out = torch.zeros(ids.shape)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            out[b, t] = torch.log_softmax(logits[b, t - 1].double(), -1)[ids[b, t]] * mask[b, t]
    return out


@given(st.integers(1, 3), st.integers(1, 8), st.integers(2, 9), st.integers(0, 2**31))
@settings(max_examples=30, deadline=None)
def test_token_logprobs_matches_naive_loop(B, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.randint(0, 2, (B, T), generator=g)
    got = M.token_logprobs(logits, ids, mask)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    assert torch.allclose(got, naive_token_logprobs(logits, ids, mask), atol=1e-5)
    assert torch.equal(M.token_logprobs(logits, ids)[:, 0], torch.zeros(B))


distinct_logits = st.lists(st.integers(-800, 800), min_size=2, max_size=30, unique=True).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32) / 100)


@given(distinct_logits, st.floats(0.2, 3.0), st.integers(1, 40))
@settings(max_examples=100, deadline=None)
def test_top_k_keeps_exactly_k_largest(logits, temperature, k):
    out = M.filter_logits(logits[None], temperature, top_k=k)[0]
    kept = torch.isfinite(out)
    assert kept.sum() == min(k, len(logits))
    if (~kept).any():
        assert logits[kept].min() > logits[~kept].max()
    assert torch.equal(out[kept], (logits / temperature)[kept])


@given(st.lists(st.floats(-8, 8), min_size=1, max_size=30).map(torch.tensor), st.floats(0.2, 3.0),
       st.floats(0.0, 0.999), st.integers(0, 5))
@settings(max_examples=150, deadline=None)
def test_top_p_keeps_minimal_prefix_reaching_p(logits, temperature, top_p, top_k):
    scaled = M.filter_logits(logits[None], temperature, top_k=top_k)[0]  # top-p acts after temperature, top-k
    out = M.filter_logits(logits[None], temperature, top_k=top_k, top_p=top_p)[0]
    probs = scaled.double().softmax(-1)
    kept = torch.isfinite(out)
    assert kept.any()  # always at least one token
    assert torch.equal(out[kept], scaled[kept])
    if (~kept).any():
        assert scaled[kept].min() >= scaled[~kept].max()  # the most likely tokens, a prefix of the sorted order
        assert probs[kept].sum() >= top_p - 1e-5  # reaches top_p
    assert probs[kept].sum() - probs[kept].min() < top_p + 1e-5  # and is minimal: the smallest kept one is needed


def test_top_p_boundary_and_greedy():
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isfinite(M.filter_logits(logits, 1.0, 0, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(M.filter_logits(logits, 1.0, 0, 0.0)).tolist() == [[True, False, False]]
    assert torch.equal(M.filter_logits(logits, 0.0), logits)  # temperature 0: greedy, logits untouched


SAMPLERS = {"plain": (1.0, 0, 1.0), "temperature": (0.7, 0, 1.0), "top_k": (1.2, 5, 1.0), "top_p": (1.3, 0, 0.8),
            "top_k+top_p": (0.9, 20, 0.9), "greedy": (0.0, 0, 1.0)}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_generate_logprobs_equal_forward_over_sampled_sequence(tiny_model, sampler):
    temperature, top_k, top_p = SAMPLERS[sampler]
    prompts = [[10, 11, 12, 13, 14], [20], [30, 31, 32]]
    g = torch.Generator().manual_seed(3)
    tokens, logps, mask = M.generate(tiny_model, prompts, 10, temperature, top_k, top_p, pad_id=PAD, generator=g)
    assert tokens.shape == logps.shape == mask.shape == (3, 10) and mask.all()
    prompt_ids, prompt_mask = M.pad_left(prompts, PAD)
    seq = torch.cat([prompt_ids, tokens], 1)  # (B, P + N)
    with torch.no_grad():
        logits = tiny_model(seq, attention_mask=torch.cat([prompt_mask, mask], 1))
    banned = M.ban_mask(tiny_model.cfg.vocab_size, [PAD])  # generate never emits pad_id
    want = M.token_logprobs(M.filter_logits(logits, temperature, top_k, top_p, banned), seq)[:, prompt_ids.shape[1]:]
    assert (want - logps).abs().max() < 1e-4 and not (tokens == PAD).any()
    if temperature == 0:
        P = prompt_ids.shape[1]
        assert torch.equal(tokens, logits[:, P - 1:-1].masked_fill(banned, float("-inf")).argmax(-1))


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="torch.compile needs a C++ compiler")
def test_compiled_generate_equals_eager_and_the_trainer(tiny_model):
    """compile=True: the one-token step through torch.compile (one compile: same batch and cache length throughout).
    Sampled with the same seed it draws the same tokens as eager with the same log-probs, and those equal a full
    forward over the sequence (the KV-cache == full-recompute and sampler == trainer contracts); greedy it is the
    argmax of that full forward."""
    prompts = [[10, 11, 12, 13, 14], [20], [30, 31, 32]]
    prompt_ids, prompt_mask = M.pad_left(prompts, PAD)
    P = prompt_ids.shape[1]
    banned = M.ban_mask(tiny_model.cfg.vocab_size, [PAD])
    for temperature, top_k, top_p in [SAMPLERS["top_k+top_p"], SAMPLERS["greedy"]]:
        runs = [M.generate(tiny_model, prompts, 12, temperature, top_k, top_p, pad_id=PAD, compile=compile,
                           generator=torch.Generator().manual_seed(5)) for compile in (False, True)]
        (eager_tokens, eager_logps, _), (tokens, logps, mask) = runs
        assert torch.equal(tokens, eager_tokens) and (logps - eager_logps).abs().max() < 1e-5
        seq = torch.cat([prompt_ids, tokens], 1)
        with torch.no_grad():
            logits = tiny_model(seq, attention_mask=torch.cat([prompt_mask, mask], 1))
        want = M.token_logprobs(M.filter_logits(logits, temperature, top_k, top_p, banned), seq)[:, P:]
        assert (want - logps).abs().max() < 1e-4
        if temperature == 0:
            assert torch.equal(tokens, logits[:, P - 1:-1].masked_fill(banned, float("-inf")).argmax(-1))


def test_generate_stops_at_stop_ids_and_pads_after(tiny_model):
    prompts = [[10, 11, 12], [50, 51], [70]]
    free, _, _ = M.generate(tiny_model, prompts, 12, temperature=0, pad_id=PAD)
    stop = {free[0, 2].item(), free[1, 0].item()}  # row 0 stops by step 2 at the latest, row 1 at once
    tokens, logps, mask = M.generate(tiny_model, prompts, 12, temperature=0, stop_ids=stop, pad_id=PAD)
    assert tokens.shape[1] <= 12
    for b in range(3):
        hits = [t for t in range(12) if free[b, t].item() in stop]
        n = hits[0] + 1 if hits else 12  # tokens up to and including the first stop token
        assert torch.equal(tokens[b, :n], free[b, :n]) and mask[b, :n].all()
        assert tokens[b, n:].eq(PAD).all() and mask[b, n:].eq(0).all() and logps[b, n:].eq(0).all()
    if all(any(t.item() in stop for t in row) for row in free):  # every row stopped: no wasted columns
        assert tokens.shape[1] == max(mask.sum(1)).item()


def test_last_token_index_and_score_responses(enc):
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert M.last_token_index(mask).tolist() == [2, 3, 0]
    rm = rand_model(head="scalar")
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.1)
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question?"}]]
    responses = ["hello there", "no"]
    scores = C.score_responses(rm, enc, prompts, responses)
    for i in range(2):  # each pair alone, read at its closing <|im_end|>
        ids, _ = C.render_chat(enc, prompts[i] + [{"role": "assistant", "content": responses[i]}])
        assert ids[-2] == C.special_id(enc, "<|im_end|>")
        with torch.no_grad():
            assert abs(rm(torch.tensor([ids[:-1]]))[0, -1].item() - scores[i].item()) < 1e-4


# ----------------------------------------------------------------------------- tokenizer and chat template


def test_gpt2_encoding_matches_gpt2_ids(gpt2_enc):
    known = {"Hello world": [15496, 995], " the": [262], "hello world": [31373, 995], "The": [464], "!": [0],
             '"': [1], ",": [11], ".": [13], "\n": [198], " ": [220]}
    for text, ids in known.items():
        assert gpt2_enc.encode_ordinary(text) == ids, text
        assert gpt2_enc.decode(ids) == text
    assert gpt2_enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2_enc.encode_ordinary("<|endoftext|>") != [50256]  # as text it is ordinary tokens
    assert [C.special_id(gpt2_enc, t) for t in C.SPECIAL_TOKENS] == [50256, 50257, 50258, 50259]
    assert C.get_tokenizer(gpt2_enc.name).n_vocab == gpt2_enc.n_vocab == 50260


def test_bad_tokenizer_spec_and_ranks_file(tmp_path):
    with pytest.raises(M.UserError, match="unknown tokenizer"):
        C.get_tokenizer("nope")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x08\x05hello\x12\x03 junk\n")  # e.g. a SentencePiece model
    with pytest.raises(M.UserError, match=re.escape(f"{bad}:1:")):
        C.get_tokenizer(str(bad))


SPECIAL_TEXT = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|pad|>", "assistant\n", "\n"]
content = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TEXT)), max_size=4).map("".join)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": content})


def check_chat(enc, messages):
    ids, mask = C.render_chat(enc, messages)
    assert len(ids) == len(mask)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert enc.decode_bytes(ids) == text.encode()
    start, end = C.special_id(enc, "<|im_start|>"), C.special_id(enc, "<|im_end|>")
    specials = {C.special_id(enc, t) for t in C.SPECIAL_TOKENS}
    turns = [i for i, t in enumerate(ids) if t == start]
    assert len(turns) == len(messages)  # content that spells a special token stays text
    assert sum(t in specials for t in ids) == 2 * len(messages)
    for m, a, b in zip(messages, turns, turns[1:] + [len(ids)]):
        close = ids.index(end, a)
        inner, inner_mask = ids[a + 1:close], mask[a + 1:close]
        assert mask[a] == 0 and mask[close] == (m["role"] == "assistant") and not any(mask[close + 1:b])
        if m["role"] != "assistant":
            assert not any(inner_mask)  # never a user or system token
            continue
        h = inner_mask.index(1) if 1 in inner_mask else len(inner_mask)
        # the content: the role header off, every token from the first that reaches into the content on (a
        # tokenizer may merge the header's "\n" with a "\n" that opens the content, as the model's own does)
        assert all(inner_mask[h:])
        head = enc.decode_bytes(inner[:h])
        assert head + enc.decode_bytes(inner[h:]) == b"assistant\n" + m["content"].encode()
        assert b"assistant\n".startswith(head) and (len(head) == len(b"assistant\n") or m["content"].startswith("\n"))


@given(st.lists(message, max_size=5))
@settings(max_examples=150, deadline=None)
def test_render_chat_masks_exactly_assistant_content(enc, messages):
    check_chat(enc, messages)


@given(st.lists(message, max_size=4))
@settings(max_examples=40, deadline=None)
def test_render_chat_masks_exactly_assistant_content_gpt2(gpt2_enc, messages):
    check_chat(gpt2_enc, messages)


def test_render_chat_generation_prompt_and_im_end_in_user_text(enc):
    msgs = [{"role": "user", "content": "say <|im_end|> please"}]
    ids, mask = C.render_chat(enc, msgs, add_generation_prompt=True)
    end = C.special_id(enc, "<|im_end|>")
    assert ids.count(end) == 1  # only the structural one closing the user turn
    assert enc.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n") and not any(mask)
    shown = C.show_mask(enc, *C.render_chat(enc, msgs + [{"role": "assistant", "content": "ok"}]), color=False)
    assert shown.endswith("assistant\n[[ok<|im_end|>]]\n")


# ----------------------------------------------------------------------------- LoRA


def perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in M.lora_layers(model):
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_merge_disable_and_plain_state_dict(models, arch):
    base = models[arch]
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_base = base(idx)
        lora = M.apply_lora(copy.deepcopy(base), rank=4)
        assert len(M.lora_layers(lora)) == 2 * (7 if arch == "llama" else 6)  # q k v o (gate) up down per block
        assert torch.equal(lora(idx), want_base)  # lora_b starts at zero: the wrapped model is the base
        trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_" in n for n in trainable)
        assert set(M.lora_state_dict(lora)) == trainable
        perturb_lora(lora)
        tuned = lora(idx)
        assert (tuned - want_base).abs().max() > 1e-2
        with M.lora_disabled(lora):
            assert torch.equal(lora(idx), want_base)  # the reference model for free
        plain = M.Transformer(base.cfg).eval()
        plain.load_state_dict(M.plain_state_dict(lora), strict=True)
        assert (plain(idx) - tuned).abs().max() < 1e-4
        for layer in M.lora_layers(lora):
            layer.merge()
        assert (lora(idx) - tuned).abs().max() < 1e-4  # merged equals unmerged
        with M.lora_disabled(lora):  # merged deltas are taken out too
            assert (lora(idx) - want_base).abs().max() < 1e-4
        assert (lora(idx) - tuned).abs().max() < 1e-4
        plain.load_state_dict(M.plain_state_dict(lora), strict=True)
        assert (plain(idx) - tuned).abs().max() < 1e-4
        for layer in M.lora_layers(lora):
            layer.unmerge()
        assert (lora(idx) - tuned).abs().max() < 1e-4


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_round_trip_is_bit_exact(enc, tmp_path, arch, tied, fmt):
    model = rand_model(**(GPT2 if arch == "gpt2" else {}), tie_embeddings=tied)
    path = str(tmp_path / f"ckpt.{fmt}")
    if fmt == "pt":
        opt = torch.optim.AdamW(model.parameters())
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        opt.step()
        state = {"optimizer": opt.state_dict(), "rng": C.rng_state(), "position": 7}
        C.save_checkpoint(path, model, enc, step=5, args={"lr": 0.1}, metrics={"loss": 1.5}, lineage=["a"],
                          train_state=state)
    else:
        formats.save_safetensors(path, model, enc)
    back, enc2, ckpt = C.load_model(path)
    assert back.cfg == model.cfg and enc2.name == enc.name
    want = model.state_dict()
    assert set(back.state_dict()) == set(want)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in want.items())
    assert (back.lm_head.weight is back.embed.weight) == tied
    idx = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(back.eval()(idx), model(idx))
    if fmt == "pt":
        assert (ckpt["step"], ckpt["args"], ckpt["metrics"], ckpt["lineage"]) == (5, {"lr": 0.1}, {"loss": 1.5}, ["a"])
        assert ckpt["format"] == "fp32" and ckpt["train_state"]["position"] == 7
        assert ("lm_head.weight" in ckpt["model"]) == (not tied)  # a tied head is the embedding: saved once
        opt2 = torch.optim.AdamW(back.parameters())
        opt2.load_state_dict(ckpt["train_state"]["optimizer"])


def test_load_model_as_reward_model(enc, tmp_path):
    model = rand_model()
    path = str(tmp_path / "lm.pt")
    C.save_checkpoint(path, model, enc)
    rm, _, _ = C.load_model(path, head="scalar")
    assert rm.cfg.head == "scalar" and torch.equal(rm.blocks[0].attn.q.weight, model.blocks[0].attn.q.weight)
    with torch.no_grad():
        assert torch.equal(rm(torch.tensor([[1, 2, 3]])), torch.zeros(1, 3))  # a fresh value head is neutral


def test_failed_save_keeps_previous_checkpoint(enc, tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    old = rand_model(seed=1)
    C.save_checkpoint(path, old, enc, step=1)

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(M.UserError, match="No space left on device.*earlier version is left intact"):
        C.save_checkpoint(path, rand_model(seed=2), enc, step=2)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temp file is cleaned up
    back, _, ckpt = C.load_model(path)
    assert ckpt["step"] == 1 and torch.equal(back.embed.weight, old.embed.weight)


def test_killed_save_keeps_previous_checkpoint(enc, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    C.save_checkpoint(path, rand_model(seed=1), enc, step=1)
    before = open(path, "rb").read()
    writer = ("import sys, time\nimport common as C\n"
              "def write(f):\n"
              "    f.write(b'x' * 4_000_000)\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(60)\n"
              f"C.atomic_write({path!r}, write)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)  # no Python cleanup runs: only the rename protects the old file
    proc.wait()
    proc.stdout.close()
    assert open(path, "rb").read() == before
    assert C.load_checkpoint(path)["step"] == 1
    C.save_checkpoint(path, rand_model(seed=2), enc, step=2)  # a leftover temp file does not get in the way
    assert C.load_checkpoint(path)["step"] == 2


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notes the unusual pickle protocol
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": Evil(marker), "config": {}}
    with open(path, "wb") as f:
        pickle.dump(payload, f) if writer == "pickle" else torch.save(payload, f)
    with pytest.raises(M.UserError, match="refusing to load"):
        C.load_model(str(path))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
@given(st.binary(max_size=400), st.sampled_from([b"", b"\x80\x02", b"PK\x03\x04"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_are_a_user_error(tmp_path, data, prefix):
    path = tmp_path / "junk.pt"
    path.write_bytes(prefix + data)
    with pytest.raises(M.UserError):
        C.load_model(str(path))


def test_truncated_and_bad_files_are_user_errors(enc, tmp_path):
    model = rand_model()
    pt, st_path = str(tmp_path / "c.pt"), str(tmp_path / "c.safetensors")
    C.save_checkpoint(pt, model, enc)
    formats.save_safetensors(st_path, model, enc)
    for path in (pt, st_path):
        data = open(path, "rb").read()
        for n in (0, 10, len(data) // 2, len(data) - 1):
            with open(path, "wb") as f:
                f.write(data[:n])
            with pytest.raises(M.UserError, match=re.escape(path)):
                C.load_model(path)
    with pytest.raises(M.UserError, match="no such checkpoint"):
        C.load_model(str(tmp_path / "missing.pt"))
    torch.save({"weights": {}}, pt)
    with pytest.raises(M.UserError, match="not a checkpoint of this project"):
        C.load_model(pt)
    sd = model.state_dict()
    torch.save({"model": sd, "config": {**asdict(model.cfg), "d_model": 64}}, pt)
    with pytest.raises(M.UserError, match="do not match"):
        C.load_model(pt)
    torch.save({"model": sd, "config": {**asdict(model.cfg), "n_experts": 8}}, pt)
    with pytest.raises(M.UserError, match="unknown config fields"):
        C.load_model(pt)


def test_hf_directory_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(M.UserError, match="unknown architecture 'bert'"):
        C.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32,
                                                      "num_attention_heads": 4, "rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(M.UserError, match="RoPE scaling"):
        C.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(M.UserError, match=re.escape(str(tmp_path / "config.json")) + ":1:"):
        C.load_model(str(tmp_path))


def test_run_prints_one_line_and_exits_2(enc, tmp_path):
    C.save_checkpoint(str(tmp_path / "bad.pt"), rand_model(), enc)
    data = (tmp_path / "bad.pt").read_bytes()
    (tmp_path / "bad.pt").write_bytes(data[:len(data) // 2])  # a save that died halfway on another machine
    proc = subprocess.run([sys.executable, "-c", "import common; common.run(lambda: common.load_model('bad.pt'))"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: bad.pt: corrupt or truncated checkpoint")


# ----------------------------------------------------------------------------- data


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_LINES = {
    "malformed JSON": ("chat", '{"messages": [', "invalid JSON"),
    "not an object": ("text", '["a"]', "expected a JSON object"),
    "missing field": ("pref", json.dumps({"prompt": "q", "chosen": "a"}), "missing field 'rejected'"),
    "wrong type": ("kto", json.dumps({"prompt": "q", "completion": "a", "label": "yes"}),
                   "field 'label' has the wrong type"),
    "bad role": ("chat", json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "role must be system"),
    "no assistant": ("chat", json.dumps({"messages": [{"role": "user", "content": "x"}]}), "at least one assistant"),
    "gold out of range": ("mc", json.dumps({"prompt": "q", "choices": ["a", "b"], "gold": 2}), "out of range"),
    "bad answer": ("prompt", json.dumps({"prompt": "q", "answer": 3}), "'answer' must be a string"),
}
GOOD = {"chat": CHAT, "text": {"text": "abc"}, "pref": {"prompt": "q", "chosen": "a", "rejected": "b"},
        "kto": {"prompt": [{"role": "user", "content": "q"}], "completion": "a", "label": True},
        "mc": {"prompt": "q", "choices": ["a", "b"], "gold": 1}, "prompt": {"prompt": "q", "answer": None}}


@pytest.mark.parametrize("case", BAD_LINES)
def test_read_jsonl_names_the_bad_line(tmp_path, case):
    kind, bad, why = BAD_LINES[case]
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD[kind])
    path.write_text("\n".join([good, "", bad, good]) + "\n")  # the blank line still counts
    with pytest.raises(M.UserError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(why)):
        C.read_jsonl(str(path), kind)
    assert len(C.read_jsonl(str(path), kind, skip_bad_lines=True)) == 2


def test_read_jsonl_good_records_and_skip_count(tmp_path, capsys):
    for kind, rec in GOOD.items():
        path = tmp_path / f"{kind}.jsonl"
        path.write_text(json.dumps(rec) + "\n")
        out = C.read_jsonl(str(path), kind)
        if "prompt" in rec and kind != "mc":
            assert out[0]["prompt"] == C.as_messages(rec["prompt"], "x") and out[0]["prompt"][0]["role"] == "user"
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(CHAT), "nope", json.dumps(CHAT), "{}", json.dumps({"messages": 3})]))
    assert len(C.read_jsonl(str(path), "chat", skip_bad_lines=True)) == 2
    assert "skipped 3 bad lines" in capsys.readouterr().err
    path.write_text("nope\n")
    with pytest.raises(M.UserError, match="no usable records"):
        C.read_jsonl(str(path), "chat", skip_bad_lines=True)
    path.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(M.UserError, match="not UTF-8"):
        C.read_jsonl(str(path), "text")
    with pytest.raises(M.UserError, match="no such data file"):
        C.read_jsonl(str(tmp_path / "missing.jsonl"), "text")


@given(st.lists(st.integers(0, 9), max_size=40), st.lists(st.integers(10, 19), max_size=40), st.integers(0, 60))
@settings(max_examples=300, deadline=None)
def test_truncate_fits_and_keeps_prompt_end_and_response_start(prompt, response, max_len):
    p, r, cut = C.truncate(prompt, response, max_len)
    assert cut == (len(prompt) + len(response) > max_len)
    if not cut:
        assert (p, r) == (prompt, response)
        return
    assert len(p) + len(r) == max_len
    assert p == prompt[len(prompt) - len(p):]  # the prompt keeps its end, nearest the reply
    assert r == response[:len(r)]  # the response keeps its start
    assert len(p) >= min(len(prompt), max_len // 2)


def test_pad_left_and_pad_right():
    ids, mask = M.pad_left([[1, 2], [3], []], 0)
    assert ids.tolist() == [[1, 2], [0, 3], [0, 0]] and mask.tolist() == [[1, 1], [0, 1], [0, 0]]
    assert C.pad_right([[1, 2], [3]], -100).tolist() == [[1, 2], [3, -100]]
    assert C.pad_right([[1, 2, 3], [4]], 0, length=2).tolist() == [[1, 2], [4, 0]]


# ----------------------------------------------------------------------------- CLI, DDP, presets


@dataclass
class Flags:
    steps: int = 10  # optimiser steps
    lr: float = 3e-4  # peak learning rate, after 10% warmup
    name: str = "run"  # a name for the log
    compile: bool = False  # torch.compile the model
    shuffle: bool = True  # reshuffle the data every epoch
    max_len: Optional[int] = None  # cut sequences to this many tokens (none: no limit)
    init: Optional[str] = "base.pt"  # checkpoint to start from (none: random init)


def test_parse_config_flags_bools_and_none():
    assert C.parse_config(Flags, []) == Flags()
    got = C.parse_config(Flags, ["--steps", "5", "--lr", "1e-3", "--name", "x", "--compile", "--no-shuffle",
                                 "--max-len", "7", "--init", "none"])
    assert got == Flags(steps=5, lr=1e-3, name="x", compile=True, shuffle=False, max_len=7, init=None)
    assert C.parse_config(Flags, ["--max-len", "none"]).max_len is None
    with pytest.raises(SystemExit):
        C.parse_config(Flags, ["--steps", "many"])


@pytest.mark.parametrize("cls", [Flags, M.Config])
def test_parse_config_help_lists_every_field_with_its_comment(cls, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping
    docs = C.field_docs(cls)
    assert set(docs) == {f.name for f in fields(cls)} and all(docs.values())
    with pytest.raises(SystemExit) as exit_:
        C.parse_config(cls, ["--help"], description="what the script does")
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "what the script does" in out
    for f in fields(cls):
        assert "--" + f.name.replace("_", "-") in out and docs[f.name] in out, f.name
    if cls is Flags:
        assert "--no-shuffle" in out


def test_ddp_gradients_match_one_process(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    run_script("tests/ddp_worker.py", str(tmp_path / "one.pt"), env=env, timeout=300)
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/ddp_worker.py",
               str(tmp_path / "two.pt"), env=env, timeout=300)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert set(one) == set(two) and len(one) > 10
    for name in one:  # the same sums in another order: equal to float precision relative to the tensor's scale
        scale = one[name].abs().max()
        assert scale > 0, name
        assert (one[name] - two[name]).abs().max() <= 1e-4 * scale, name


def test_presets_table():
    out = run_script("model.py", timeout=120).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == set(M.PRESETS)
    assert rows["gpt2"][-1] == "124,439,808"
    with torch.device("meta"):
        n = M.Transformer(M.Config(**{**M.PRESETS["tiny"], "vocab_size": 260})).num_params()
    assert rows["tiny"][-1] == f"{n:,}"
