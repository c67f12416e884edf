"""Llama-3.x attention details: an explicit head_dim (not d_model / n_head) and Llama-3 RoPE scaling
(rope_type "llama3"). A transformers Llama with both loads through load_hf_dir and exports through export_hf
with the same logits; the scaled frequencies obey their defining properties; other RoPE types are refused.

    python -m pytest -q tests/test_rope.py
"""
import dataclasses
import json
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import common as C
import formats
import model as M

# original_max 16 puts the scaling band inside a 40-token test; head_dim 32 != hidden 64 / 4 heads
ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
T = 40  # > original_max_position_embeddings: positions where the scaled frequencies matter


@pytest.fixture(scope="module")
def tf():
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    return tf


@pytest.fixture
def hf_dir(tf, tmp_path, enc):
    """A random transformers Llama-3-style model saved as an HF directory (byte tokenizer marker) -> (path, model)."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=enc.n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                         rope_parameters=dict(ROPE), tie_word_embeddings=False)
    theirs = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # sharp attention, so that a wrong frequency shows in the logits
            p.normal_(0.0, 0.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.1)
    path = str(tmp_path / "hf")
    theirs.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "tokenizer.json.posttrain"), "w") as f:
        json.dump({"tokenizer": "byte"}, f)
    return path, theirs


def random_ids(vocab):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))


def test_llama3_directory_matches_transformers(hf_dir):
    path, theirs = hf_dir
    ours, _, _ = C.load_model(path)
    assert (ours.cfg.head_dim, ours.cfg.rope_scaling_factor, ours.cfg.rope_original_max_len) == (32, 8.0, 16)
    idx = random_ids(ours.cfg.vocab_size)
    with torch.no_grad():
        want = theirs(idx).logits
        assert (ours(idx) - want).abs().max() < 1e-4
        # the scaling is what makes them agree, else this test would prove nothing about it
        unscaled = M.Transformer(dataclasses.replace(ours.cfg, rope_scaling_factor=1.0)).eval()
        unscaled.load_state_dict(ours.state_dict())
        assert (unscaled(idx) - want).abs().max() > 1e-3


def test_export_hf_of_llama3_model_matches_transformers(tf, hf_dir, tmp_path):
    ours, enc, _ = C.load_model(hf_dir[0])
    out = str(tmp_path / "export")
    formats.export_hf(ours, enc, out)
    theirs = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert theirs.config.head_dim == 32 and theirs.config.rope_parameters["rope_type"] == "llama3"
    idx = random_ids(ours.cfg.vocab_size)
    with torch.no_grad():
        want = ours(idx)
        assert (theirs(idx).logits - want).abs().max() < 1e-4
        back, _, _ = C.load_model(out)
        assert back.cfg == ours.cfg and (back(idx) - want).abs().max() < 1e-4


@settings(max_examples=200, deadline=None)
@given(head_dim=st.sampled_from([2, 8, 32, 64, 128]), theta=st.floats(2.0, 1e7), factor=st.floats(1.0, 64.0),
       low=st.floats(0.25, 4.0), gap=st.floats(0.25, 16.0), original=st.integers(1, 2**17))
def test_llama3_inv_freq_properties(head_dim, theta, factor, low, gap, original):
    high = low + gap
    inv = M.rope_inv_freq(head_dim, theta)  # (hd/2,)
    out = M.llama3_inv_freq(inv, factor, low, high, original)
    torch.testing.assert_close(M.llama3_inv_freq(inv, 1.0, low, high, original), inv, rtol=1e-6, atol=0)
    wavelen = 2 * math.pi / inv
    short, long = wavelen < original / high, wavelen > original / low  # short: many turns within the original
    torch.testing.assert_close(out[short], inv[short], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[long], inv[long] / factor, rtol=1e-5, atol=0)
    assert (out <= inv * (1 + 1e-6)).all() and (out >= inv / factor * (1 - 1e-6)).all()  # the band blends the two
    assert (out[1:] <= out[:-1]).all()


def test_other_rope_types_are_refused_by_name(hf_dir):
    path = hf_dir[0]
    with open(os.path.join(path, "config.json")) as f:
        hc = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**hc, "rope_parameters": {**ROPE, "rope_type": "yarn"}}, f)
    with pytest.raises(M.UserError) as e:
        C.load_model(path)
    message = str(e.value)
    assert message.startswith(path) and "\n" not in message and "'yarn'" in message, message


@pytest.mark.parametrize("key, value", [("head_dim", -1), ("head_dim", 2**16 + 1), ("head_dim", "32"),
                                        ("head_dim", 7), ("rope_scaling_factor", 0), ("rope_low_freq_factor", -1.0),
                                        ("rope_high_freq_factor", float("inf")), ("rope_original_max_len", 0),
                                        ("rope_high_freq_factor", 0.5)])  # 0.5 <= low 1: an empty band
def test_config_refuses_bad_head_dim_and_scaling(key, value):
    good = dict(d_model=64, n_head=4, n_kv_head=2, rope_scaling_factor=8.0)
    assert C.config_from_dict({**good, "head_dim": 32}, "f").head_size == 32
    with pytest.raises(M.UserError, match=r"^f: ") as e:
        C.config_from_dict({**good, key: value}, "f")
    assert "\n" not in str(e.value)
