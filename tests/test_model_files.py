"""Any file given as --model that is not a usable checkpoint is one UserError whose message starts with the
file's path and fits on one line: never another exception, a traceback, or an attempt to build a model the size
of a corrupt config (issue "Reliability", item 2).

Families, fed to C.load_model in-process (hypothesis derandomized, or fixed seeds, so every run tries the same
inputs): empty, text and random files; a real ckpt.pt / .safetensors / Hugging Face directory truncated at every
10% and with bytes flipped; .safetensors headers that lie; configs (ckpt.pt "config", the .safetensors' .json,
a directory's config.json) with absurd sizes, wrong types or missing keys; GGUF files; pickled Python objects;
checkpoints of the wrong structure. A guard replaces M.Transformer: building a real (not meta-device) model
above MAX_PARAMS fails the test. A few subprocess runs of the scripts show exit code 2, one stderr line naming
the file, and no --out. With -s the inputs tried per family and their outcomes are printed at the end.

    python -m pytest -q tests/test_model_files.py
    python -m pytest -q -s tests/test_model_files.py    # also print the counts per family
"""
import collections
import json
import os
import pickle
import random
import signal
import struct
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import common as C
import formats
import model as M
from conftest import assert_one_line_error, run_script

MAX_PARAMS = 10**8  # the test models have ~10**5; a corrupt config asks for 10**12 and more
SLOW_S = 10.0  # one input taking longer is doing work proportional to a corrupt size (10**6 layers)
TALLY = collections.defaultdict(collections.Counter)  # family -> Counter(outcome)


class HugeAllocation(BaseException):
    """Raised by the guard instead of building the model; a BaseException, so no `except Exception` in the code
    under test can turn it into a UserError and hide the attempt."""


class TooSlow(BaseException):
    """Raised by an alarm after SLOW_S: an input that loops over a corrupt size fails instead of hanging."""


def too_slow(signum, frame):
    raise TooSlow(f"over {SLOW_S:.0f} s")


def approx_params(cfg):
    return (2 * cfg.vocab_size * cfg.d_model + (cfg.max_seq_len * cfg.d_model if cfg.arch == "gpt2" else 0)
            + cfg.n_layer * (4 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.d_ff))


@pytest.fixture(scope="module", autouse=True)
def guard_and_report():
    """M.Transformer refuses real (non-meta) models above MAX_PARAMS; at the end, the tally of every family."""
    real = M.Transformer

    class Guarded(real):
        def __init__(self, cfg):
            try:
                n = approx_params(cfg)
            except TypeError:  # a size that is no number: let the real constructor fail on it as it would
                n = 0
            if torch.get_default_device().type != "meta" and n > MAX_PARAMS:
                raise HugeAllocation(f"a real model of ~{n:.2e} parameters")
            super().__init__(cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "Transformer", Guarded)
        yield
    print("\n\ninputs tried per family -> outcomes")
    for family, outcomes in TALLY.items():
        print(f"  {family:<34} {sum(outcomes.values()):>4}  " + ", ".join(f"{k}: {v}" for k, v in outcomes.items()))


def attempt(family, path, allow_load=False, **kw):
    """C.load_model(path) -> (outcome, message). outcome "UserError" only for a one-line message that starts
    with the path; anything else is recorded under what it was. Asserts unless the outcome is clean."""
    path = str(path)
    message = ""
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, SLOW_S)
    try:
        C.load_model(path, **kw)
        outcome = "loaded"
    except M.UserError as e:
        message = str(e)
        clean = message.startswith(path) and "\n" not in message and len(message) < 400
        outcome = "UserError" if clean else "UserError, badly worded"
    except (HugeAllocation, TooSlow) as e:
        outcome, message = type(e).__name__, str(e)
    except Exception as e:
        outcome, message = type(e).__name__, str(e)[:200]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    TALLY[family][outcome] += 1
    ok = outcome == "UserError" or (allow_load and outcome == "loaded")
    assert ok, f"{family}: {path}: {outcome}: {message[:300]!r}"
    return outcome, message


# ----------------------------------------------------------------------------- fixtures: real files to break


def tiny(enc, arch="tiny"):
    torch.manual_seed(0)
    return M.build_model(arch, enc, n_layer=2, d_model=64, d_ff=128, max_seq_len=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory, enc):
    """One good file of every format, written once: the tests copy and break them."""
    d = tmp_path_factory.mktemp("good")
    model = tiny(enc)
    out = {"pt": str(d / "ckpt.pt"), "st": str(d / "w.safetensors"), "hf": str(d / "hf-llama"),
           "hf_gpt2": str(d / "hf-gpt2"), "dir": d}
    C.save_checkpoint(out["pt"], model, enc)
    formats.save_safetensors(out["st"], model, enc)
    formats.export_hf(model, enc, out["hf"])
    formats.export_hf(tiny(enc, "tiny-gpt2"), enc, out["hf_gpt2"])
    for p in (out["pt"], out["st"], out["hf"], out["hf_gpt2"]):
        C.load_model(p)  # the originals are usable: every failure below comes from the damage
    out["config"] = asdict(model.cfg)
    out["sd"] = C.load_checkpoint(out["pt"])["model"]
    return out


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return path


def copy_hf(src, dst, config=None, raw_config=None):
    """A copy of a Hugging Face directory, its config.json replaced by `config` (a dict) or `raw_config` bytes."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        write(os.path.join(dst, name), read(os.path.join(src, name)))
    if config is not None:
        write(os.path.join(dst, "config.json"), json.dumps(config))
    if raw_config is not None:
        write(os.path.join(dst, "config.json"), raw_config)
    return dst


def st_split(data):
    """.safetensors bytes -> (header dict, tensor bytes): an 8-byte little-endian header length, JSON, data."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_join(header, body, length=None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + body


# ----------------------------------------------------------------------------- 1. empty, text, random bytes

TEXTS = {
    "hello.txt": "hello world\n",
    "json.pt": '{"model": 1, "config": {}}',
    "chats.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n',
    "table.csv": "a,b,c\n1,2,3\n",
    "script.py": "import os\nprint(1)\n",
    "starts-with-c.pt": "config\nfoo\n",  # 'c' is pickle's GLOBAL opcode: the unpickler reads a module name
    "unicode.pt": "日本語のテキスト\n" * 20,
    "README.md": "# model\n\nSome *markdown*.\n",
    "model": "no suffix at all\n",
    "text.safetensors": "not a safetensors file\n",
}


def test_empty_and_text_files(tmp_path, files):
    attempt("empty / text", write(tmp_path / "empty.pt", b""))
    attempt("empty / text", write(tmp_path / "empty.safetensors", b""))
    write(tmp_path / "text.json", json.dumps({"config": files["config"], "tokenizer": "byte"}))
    for name, text in TEXTS.items():
        _, message = attempt("empty / text", write(tmp_path / name, text))
        assert "Python objects" not in message, message  # text is no pickle: saying so would mislead


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600),
       prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"GGUF", b"GGUF\x03\x00\x00\x00",
                               struct.pack("<Q", 40) + b'{"', b"\x08" + b"\x00" * 7 + b"{}"]),
       suffix=st.sampled_from([".pt", ".safetensors", ".gguf", ""]))
def test_random_bytes(files, data, prefix, suffix):
    d = files["dir"] / "random"
    write(d / "junk.json", json.dumps({"config": files["config"], "tokenizer": "byte"}))  # so .safetensors is read
    attempt("random bytes", write(d / f"junk{suffix}", prefix + data))


# ----------------------------------------------------------------------------- 2. truncated and bit-flipped


def test_truncated_at_every_tenth(tmp_path, files):
    hf_weights = os.path.join(files["hf"], "model.safetensors")
    for kind, src in [("ckpt.pt", files["pt"]), (".safetensors", files["st"]), ("HF model.safetensors", hf_weights)]:
        data = read(src)
        for cut in [len(data) * k // 10 for k in range(1, 10)] + [len(data) - 1]:
            if kind == "HF model.safetensors":
                path = copy_hf(files["hf"], tmp_path / f"hf{cut}")
                write(os.path.join(path, "model.safetensors"), data[:cut])
            else:
                path = write(tmp_path / f"cut{cut}{os.path.splitext(src)[1]}", data[:cut])
                if kind == ".safetensors":
                    write(path[:-len(".safetensors")] + ".json", read(src[:-len(".safetensors")] + ".json"))
            attempt(f"truncated {kind}", path)


def flip(data, rng, head):
    """A few bytes XORed with random non-zero values: half the time anywhere, else in the first / last `head`
    bytes (a torch zip's data.pkl and central directory, a safetensors header), where most damage is caught."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        where = rng.random()
        i = (rng.randrange(len(data)) if where < 0.5 else rng.randrange(min(head, len(data))) if where < 0.8
             else len(data) - 1 - rng.randrange(min(head, len(data))))
        data[i] ^= rng.randint(1, 255)
    return bytes(data)


def test_bit_flipped_files_load_or_are_user_errors(tmp_path, files):
    """A flip in the tensor bytes still loads (nothing can tell); elsewhere it is a UserError, never else."""
    for kind, src, n, head in [("ckpt.pt", files["pt"], 150, 3000), (".safetensors", files["st"], 100, 2000)]:
        data = read(src)
        for seed in range(n):
            path = write(tmp_path / f"flip{seed}{os.path.splitext(src)[1]}", flip(data, random.Random(seed), head))
            if kind == ".safetensors":
                write(path[:-len(".safetensors")] + ".json", read(src[:-len(".safetensors")] + ".json"))
            attempt(f"bit-flipped {kind}", path, allow_load=True)


# ----------------------------------------------------------------------------- 3. safetensors that lie


def test_safetensors_headers_that_lie(tmp_path, files):
    header, body = st_split(read(files["st"]))
    name = "embed.weight"
    start, end = header[name]["data_offsets"]
    shape = header[name]["shape"]

    def with_entry(**entry):
        return st_join({**header, name: {**header[name], **entry}}, body)

    cases = {
        "length 10**12": st_join(header, body, length=10**12),
        "length 2**64 - 1": st_join(header, body, length=2**64 - 1),
        "length past the end": st_join(header, body, length=len(json.dumps(header)) + len(body) + 1),
        "length 0": st_join(header, body, length=0),
        "length cuts the JSON": st_join(header, body, length=10),
        "offsets past the end": with_entry(data_offsets=[len(body), len(body) + end - start]),
        "end offset past the end": with_entry(data_offsets=[start, len(body) + 4096]),
        "offsets reversed": with_entry(data_offsets=[end, start]),
        "offsets negative": with_entry(data_offsets=[-8, end]),
        "offset beyond u64": with_entry(data_offsets=[start, 2**70]),
        "dtype F33": with_entry(dtype="F33"),
        "dtype float32": with_entry(dtype="float32"),
        "dtype empty": with_entry(dtype=""),
        "dtype a number": with_entry(dtype=5),
        "dtype null": with_entry(dtype=None),
        "dtype I32 (no floats)": with_entry(dtype="I32"),
        "dtype BOOL": with_entry(dtype="BOOL", shape=[(end - start)]),
        "shape product too big": with_entry(shape=[shape[0] + 1, shape[1]]),
        "shape product too small": with_entry(shape=[shape[0] - 1, shape[1]]),
        "shape negative": with_entry(shape=[-1, shape[1]]),
        "shape overflows": with_entry(shape=[2**40, 2**40]),
        "shape of strings": with_entry(shape=["a"]),
        "not JSON": st_join(b"this is not json at all", body),
        "JSON list": st_join(b"[1, 2, 3]", body),
        "JSON not UTF-8": st_join(b'{"\xff\xfe": 1}', body),
        "trailing garbage in header": st_join(json.dumps(header).encode() + b"}}garbage", body),
        "__metadata__ not strings": st_join({**header, "__metadata__": {"a": 1}}, body),
        "no tensors": st_join({}, b""),
        "tensor renamed": st_join({("embed.wieght" if k == name else k): v for k, v in header.items()}, body),
        "tensor dropped": st_join({k: v for k, v in header.items() if k != "norm.weight"}, body),
        "extra bytes appended": st_join(header, body + b"\0" * 64),
        "body missing": st_join(header, b""),
    }
    sibling = read(files["st"][:-len(".safetensors")] + ".json")
    for i, (case, data) in enumerate(cases.items()):
        path = write(tmp_path / f"lie{i}.safetensors", data)
        write(tmp_path / f"lie{i}.json", sibling)
        attempt("safetensors header lies", path)


# absurd, zero, negative and wrong-typed values for our Config's fields; each replaces one field of a good config
CONFIG_CASES = [
    *[("vocab_size", v) for v in (10**12, 2**22 + 1, 0, -1, 259, "260", 260.0, True, None, [260])],
    *[("d_model", v) for v in (10**9, 2**16 + 1, 0, -64, 32, "64", 64.5, None)],
    *[("n_layer", v) for v in (10**6, 1025, 0, -2, 1, 3, "2", True, None)],
    *[("n_head", v) for v in (0, -4, 3, 64, 10**6, "4", 4.0)],  # 64: head size 1, odd for RoPE
    *[("n_kv_head", v) for v in (0, 3, 10**6, "2")],
    *[("d_ff", v) for v in (10**9, 0, -1, "128", 64)],
    *[("max_seq_len", v) for v in (10**12, 10**30, 0, -1, "64")],
    *[("norm_eps", v) for v in ("x", None, -1.0, float("nan"), float("inf"))],
    *[("rope_theta", v) for v in (0, -1.0, "x", float("inf"), None)],
    *[("qkv_bias", v) for v in ("yes", 1, None)],
    *[("tie_embeddings", v) for v in ("no", None)],
    *[("dropout", v) for v in (5, -0.5, 1.0, "x")],
    *[("arch", v) for v in ("bert", 5, None, ["llama"])],
    *[("head", v) for v in ("value", None)],
    ("n_experts", 8),  # a field this project does not have
]


def test_safetensors_json_with_absurd_config(tmp_path, files):
    data = read(files["st"])
    raw = {
        "missing": None, "not JSON": "{nope", "a list": "[]", "null": "null", "not UTF-8": b"\xff\xfe{}",
        "deeply nested": "[" * 100000 + "]" * 100000, "a 5000-digit number": '{"config": ' + "9" * 5000 + "}",
        "no config": json.dumps({"tokenizer": "byte"}), "config null": json.dumps({"config": None}),
        "config a list": json.dumps({"config": [1, 2]}),
        "unknown tokenizer": json.dumps({"config": files["config"], "tokenizer": "nope"}),
        "tokenizer a number": json.dumps({"config": files["config"], "tokenizer": 5}),
    }
    cases = [(k, v) for k, v in raw.items()] + [
        (f"{key}={value!r}", json.dumps({"config": {**files["config"], key: value}, "tokenizer": "byte"}))
        for key, value in CONFIG_CASES]
    for i, (case, meta) in enumerate(cases):
        path = write(tmp_path / f"c{i}.safetensors", data)
        if meta is not None:
            write(tmp_path / f"c{i}.json", meta)
        attempt("safetensors .json config", path)
    path = write(tmp_path / "dirjson.safetensors", data)
    os.makedirs(tmp_path / "dirjson.json")  # the .json is a directory
    attempt("safetensors .json config", path)


# ----------------------------------------------------------------------------- 4. configs with absurd sizes

HF_SIZES = {
    "hf-llama": ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "head_dim"],
    "hf-gpt2": ["vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions"],
}
HF_REQUIRED = {
    "hf-llama": ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"],
    "hf-gpt2": ["vocab_size", "n_embd", "n_layer", "n_head", "n_positions"],
}
HF_OPTIONAL = {"num_key_value_heads", "head_dim", "n_inner", "max_position_embeddings"}  # None = the default
BAD_SIZES = [10**12, 10**9, 10**6, 2**40, 0, -1, "64", 64.0, True, None, [64]]


def hf_cases(arch, good):
    """(name, config dict or raw bytes, may it load) for one architecture's config.json."""
    # None for an optional key means its default, and a million positions costs a Llama nothing (RoPE has no
    # table): those two may load
    may_load = lambda k, v: (v is None and k in HF_OPTIONAL) or (k == "max_position_embeddings" and v == 10**6)
    cases = [(f"{k}={v!r}", {**good, k: v}, may_load(k, v)) for k in HF_SIZES[arch] for v in BAD_SIZES]
    cases += [(f"no {k}", {c: v for c, v in good.items() if c != k}, False) for k in HF_REQUIRED[arch]]
    big = {"hf-llama": {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**20,
                        "num_attention_heads": 1024, "num_key_value_heads": 1024},
           "hf-gpt2": {"vocab_size": 2**22, "n_embd": 2**16, "n_inner": 2**20, "n_positions": 2**24, "n_head": 1024}}
    cases += [("every size at its limit, weights tiny", {**good, **big[arch]}, False),
              ("1024 layers, weights have 2", {**good, HF_SIZES[arch][3 if arch == "hf-llama" else 2]: 1024}, False),
              ("vocab one short", {**good, "vocab_size": good["vocab_size"] - 1}, False),
              ("model_type missing", {k: v for k, v in good.items() if k != "model_type"}, False),
              ("model_type a list", {**good, "model_type": [good["model_type"]]}, False),
              ("model_type bert", {**good, "model_type": "bert"}, False)]
    if arch == "hf-llama":
        cases += [(f"rope {v!r}", {**good, "rope_parameters": v}, False)
                  for v in ("x", 5, [1], {"rope_type": "yarn"}, {"rope_theta": "x"}, {"rope_theta": -1.0},
                            {"rope_type": "default", "rope_theta": None})]
        cases += [("rms_norm_eps 'x'", {**good, "rms_norm_eps": "x"}, False),
                  ("rms_norm_eps -1", {**good, "rms_norm_eps": -1}, False),
                  ("head_dim 7", {**good, "head_dim": 7}, False),
                  ("attention_bias", {**good, "attention_bias": True}, False),
                  ("heads do not divide", {**good, "num_attention_heads": 3}, False),
                  ("kv heads do not divide", {**good, "num_key_value_heads": 3}, False)]
    else:
        cases += [("activation relu", {**good, "activation_function": "relu"}, False),
                  ("activation a list", {**good, "activation_function": ["gelu"]}, False),
                  ("layer_norm_epsilon 'x'", {**good, "layer_norm_epsilon": "x"}, False)]
    cases += [(name, raw, False) for name, raw in [
        ("config.json a list", b"[]"), ("config.json null", b"null"), ("config.json 5", b"5"),
        ("config.json not UTF-8", b"\xff\xfe\x00{"), ("config.json not JSON", b"{nope"),
        ("config.json nested 10**5 deep", b"[" * 100000 + b"]" * 100000),
        ("config.json 5000-digit size", b'{"model_type": "llama", "hidden_size": ' + b"9" * 5000 + b"}")]]
    return cases


@pytest.mark.parametrize("arch", ["hf-llama", "hf-gpt2"])
def test_hf_directory_with_absurd_config(tmp_path, files, arch):
    src = files["hf"] if arch == "hf-llama" else files["hf_gpt2"]
    good = json.loads(read(os.path.join(src, "config.json")))
    for i, (case, config, may_load) in enumerate(hf_cases(arch, good)):
        raw = config if isinstance(config, bytes) else None
        path = copy_hf(src, tmp_path / f"d{i}", config=None if raw else config, raw_config=raw)
        _, message = attempt(f"HF config.json ({arch[3:]})", path, allow_load=may_load)
        if case.startswith("no "):
            assert f"config.json: missing '{case[3:]}'" in message, message


def test_hf_directory_structure(tmp_path, files):
    src = files["hf"]
    empty = tmp_path / "empty"
    os.makedirs(empty)
    attempt("HF directory structure", empty)
    only_weights = copy_hf(src, tmp_path / "only-weights")
    os.remove(os.path.join(only_weights, "config.json"))
    _, message = attempt("HF directory structure", only_weights)
    assert "config.json" in message
    no_weights = copy_hf(src, tmp_path / "no-weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    attempt("HF directory structure", no_weights)
    weights_dir = copy_hf(src, tmp_path / "weights-dir")
    os.remove(os.path.join(weights_dir, "model.safetensors"))
    os.makedirs(os.path.join(weights_dir, "model.safetensors"))
    attempt("HF directory structure", weights_dir)
    config_dir = copy_hf(src, tmp_path / "config-dir")
    os.remove(os.path.join(config_dir, "config.json"))
    os.makedirs(os.path.join(config_dir, "config.json"))
    attempt("HF directory structure", config_dir)
    header, body = st_split(read(os.path.join(src, "model.safetensors")))
    for i, damage in enumerate([
            lambda h: {k: v for k, v in h.items() if k != "model.norm.weight"},  # a weight missing
            lambda h: {k: (v if k != "model.norm.weight" else {**v, "dtype": "I32"}) for k, v in h.items()}]):
        path = copy_hf(src, tmp_path / f"weights{i}")
        write(os.path.join(path, "model.safetensors"), st_join(damage(header), body))
        attempt("HF directory structure", path)
    for i, tok in enumerate([b'{"tokenizer": "nope"}', b"{}", b"[]", b"{nope", b'{"tokenizer": 5}',
                             b'{"tokenizer": null}']):
        path = copy_hf(src, tmp_path / f"tok{i}")
        write(os.path.join(path, "tokenizer.json.posttrain"), tok)
        attempt("HF directory structure", path)


def test_ckpt_pt_with_absurd_config(tmp_path, files):
    sd = files["sd"]
    cases = [(f"{k}={v!r}", {**files["config"], k: v}) for k, v in CONFIG_CASES]
    cases += [("vocab_size 10**5000", {**files["config"], "vocab_size": 10**5000}),
              ("an int key", {**files["config"], 5: 1}),
              ("config None", None), ("config a list", [1]), ("config a string", "llama")]
    for i, (case, config) in enumerate(cases):
        path = str(tmp_path / f"c{i}.pt")
        torch.save({"model": sd, "config": config, "tokenizer": "byte"}, path)
        attempt("ckpt.pt config", path)


# ----------------------------------------------------------------------------- 5. GGUF


def test_gguf_is_named_not_misreported(tmp_path, files):
    rng = random.Random(0)
    for i in range(20):
        body = b"GGUF" + struct.pack("<I", rng.choice([1, 2, 3, 2**32 - 1])) + rng.randbytes(rng.randrange(200))
        path = write(tmp_path / f"m{i}{['.gguf', '.pt', '', '.bin'][i % 4]}", body)
        _, message = attempt("GGUF", path)  # read by formats.read_gguf: what is wrong with it, in one line
        assert "GGUF" in message, message
    for i, body in enumerate([b"hello\n", read(files["pt"]), b"GGU", b"ggufGGUF", b"\x00" * 64]):
        _, message = attempt("GGUF", write(tmp_path / f"fake{i}.gguf", body))
        assert "not a GGUF file (bad magic" in message, message


# ----------------------------------------------------------------------------- 6. pickled Python objects


class Opens:
    """Unpickling this would call open(marker, "w"): the marker file shows whether any code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


class Plain:
    pass


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notes the unusual pickle protocols
def test_pickled_python_objects_are_refused(tmp_path):
    marker = str(tmp_path / "ran")
    payloads = [{"model": Opens(marker), "config": {}}, {"model": {"w": Plain()}, "config": {}}, Plain(),
                {"model": {}, "config": {}, "args": Plain()}]
    i = 0
    for payload in payloads:
        for how in ["torch.save", "pickle0", "pickle2", "pickle4", "pickle5"]:
            path = str(tmp_path / f"p{i}.pt")
            i += 1
            with open(path, "wb") as f:
                torch.save(payload, f) if how == "torch.save" else pickle.dump(payload, f, protocol=int(how[-1]))
            _, message = attempt("pickled Python objects", path)
            assert "refusing to load" in message and "Python objects" in message, (how, message)
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------- 7. the wrong structure


def test_wrong_structure(tmp_path, files):
    sd, config = files["sd"], files["config"]
    good = {"model": sd, "config": config, "tokenizer": "byte"}
    not_ranks = write(tmp_path / "not-ranks.tiktoken", "just text\n")
    cases = {
        "a list": [1, 2], "a tensor": torch.zeros(3), "an int": 5, "a string": "ckpt",
        "no model": {"config": config}, "no config": {"model": sd},
        "model a list": {**good, "model": [1]}, "model a tensor": {**good, "model": torch.zeros(3)},
        "model a string": {**good, "model": "weights"}, "model None": {**good, "model": None},
        "model empty": {**good, "model": {}},
        **{f"weight a {type(v).__name__}": {**good, "model": {**sd, "norm.weight": v}}
           for v in ([1.0] * 64, 1, "w", None, {"a": torch.zeros(1)})},
        "an int key": {**good, "model": {**sd, 5: torch.zeros(1)}},
        "int64 weight": {**good, "model": {**sd, "norm.weight": torch.ones(64, dtype=torch.long)}},
        "bool weight": {**good, "model": {**sd, "norm.weight": torch.ones(64, dtype=torch.bool)}},
        "complex weight": {**good, "model": {**sd, "norm.weight": torch.ones(64, dtype=torch.complex64)}},
        "sparse weight": {**good, "model": {**sd, "norm.weight": torch.ones(64).to_sparse()}},
        "meta weight": {**good, "model": {**sd, "norm.weight": torch.empty(64, device="meta")}},
        "a weight of the wrong shape": {**good, "model": {**sd, "norm.weight": torch.ones(65)}},
        "an extra weight": {**good, "model": {**sd, "blocks.9.x": torch.ones(1)}},
        "an odd weight name": {**good, "model": {**sd, "blocks": torch.ones(1)}},
        "tokenizer unknown": {**good, "tokenizer": "nope"}, "tokenizer a number": {**good, "tokenizer": 5},
        "tokenizer None": {**good, "tokenizer": None}, "tokenizer a list": {**good, "tokenizer": ["byte"]},
        "tokenizer not a ranks file": {**good, "tokenizer": not_ranks},
        "tokenizer too big for the model": {**good, "tokenizer": "gpt2"},
        "format unknown": {**good, "format": "int3"}, "format a list": {**good, "format": ["fp32"]},
        "format None": {**good, "format": None},
    }
    for i, (case, ckpt) in enumerate(cases.items()):
        path = str(tmp_path / f"s{i}.pt")
        torch.save(ckpt, path)
        attempt("wrong structure", path)
    attempt("wrong structure", tmp_path / "missing.pt")
    os.makedirs(tmp_path / "a-dir")
    attempt("wrong structure", tmp_path / "a-dir")


def test_load_model_dispatches_on_the_weight_format(tmp_path, files, monkeypatch):
    """A checkpoint's "format" picks its loader from C.WEIGHT_FORMATS: a function, or a "module:function" imported
    only then (how quantize.py's formats plug in); an unknown format is one line naming the file and the format."""
    ckpt = {**C.load_checkpoint(files["pt"]), "format": "toy-int4"}
    path = str(tmp_path / "q.pt")
    torch.save(ckpt, path)
    with pytest.raises(M.UserError, match=r"q\.pt: weight format 'toy-int4' is not one this project reads"):
        C.load_model(path)
    seen = []
    monkeypatch.setitem(C.WEIGHT_FORMATS, "toy-int4", lambda c, p, d, h: seen.append((c["format"], p, h)) or "m")
    assert C.load_model(path, head="scalar") == "m" and seen == [("toy-int4", path, "scalar")]
    monkeypatch.setitem(C.WEIGHT_FORMATS, "toy-int4", "common:load_dense")  # by name: the dense loader again
    model, _, _ = C.load_model(path)
    want = C.load_model(files["pt"])[0].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_resume_of_another_head_is_one_line(tmp_path, files):
    """--resume of a checkpoint whose head is not the one being trained (an LM into reward.py) is refused by name,
    before any weights are copied (a LoRA resume would otherwise load it with strict=False and a fresh head)."""
    model = C.load_model(files["pt"], head="scalar")[0]
    lm = C.load_checkpoint(files["pt"])
    path = str(tmp_path / "lm-resume.pt")
    torch.save({**lm, "step": 3, "train_state": {"optimizer": {}, "rng": {}}}, path)
    with pytest.raises(M.UserError, match=r"lm-resume\.pt: a checkpoint with head 'lm', but this run trains a "
                                          r"'scalar' head"):
        C.resume_and_peft(model, SimpleNamespace(resume=path, lora_rank=4, lora_alpha=0.0))


# ----------------------------------------------------------------------------- the scripts, as a user runs them


def test_scripts_exit_2_with_one_line_naming_the_file(tmp_path, files):
    chats = write(tmp_path / "chats.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    prefs = write(tmp_path / "prefs.jsonl", json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    tasks = write(tmp_path / "eval.jsonl", json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    gguf = write(tmp_path / "m.gguf", b"GGUF" + struct.pack("<I", 3) + b"\0" * 64)
    cut = write(tmp_path / "cut.pt", read(files["pt"])[:len(read(files["pt"])) // 3])
    hf = copy_hf(files["hf"], tmp_path / "hf", config={
        **json.loads(read(os.path.join(files["hf"], "config.json"))), "vocab_size": 10**12})
    out = str(tmp_path / "o.pt")
    runs = [
        (["sft.py", "--model", gguf, "--data", chats, "--out", out, "--steps", "1", "--seq-len", "64"],
         gguf, "GGUF architecture None is not one we load"),
        (["sft.py", "--model", hf, "--data", chats, "--out", out, "--steps", "1", "--seq-len", "64"],
         os.path.join(hf, "config.json"), "vocab_size"),
        (["reward.py", "--model", cut, "--data", prefs, "--out", out, "--steps", "1", "--seq-len", "64"],
         cut, "corrupt or truncated"),
        (["evaluate.py", "--model", chats, "--data", tasks, "--no-speed", "--out", str(tmp_path / "r.json")],
         chats, "not a checkpoint"),
    ]
    for args, where, message in runs:
        proc = run_script(*args, check=False)
        assert_one_line_error(proc, where, message)
        assert proc.stderr.startswith(f"error: {where}")
        assert not os.path.exists(out) and not os.path.exists(tmp_path / "r.json")
        TALLY["scripts (subprocess)"]["UserError, exit 2"] += 1
