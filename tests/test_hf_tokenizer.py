"""Tokenizers and chat templates of real models against transformers (a test-only dependency) as the oracle:
a tokenizer.json that transformers makes from data/gpt2.tiktoken, read by us, encodes as transformers does; every
chat template we claim renders the ids apply_chat_template makes; export_hf writes a directory whose
AutoTokenizer encodes as we do and whose AutoModelForCausalLM decodes the same greedy tokens; tokenizers we do not
read are one line.

    python -m pytest -q tests/test_hf_tokenizer.py
"""
import json

import pytest
from hypothesis import example, given, settings, strategies as st

import common as C
import formats
import model as M

transformers = pytest.importorskip("transformers", reason="transformers is not installed (requirements-test.txt)")
from transformers.convert_slow_tokenizer import TikTokenConverter  # noqa: E402

TEXT = (st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
        | st.text(alphabet=" \t\n\r0123456789abc'sé日\u0301", max_size=40)
        | st.lists(st.sampled_from(["<|endoftext|>", "<|im_start|>", "<|eot_id|>", " ", "  ", "\n", "\n\n", "12",
                                    "2024", "'s", "a", "é", "e\u0301"]), max_size=8).map("".join))


def gpt2_tokenizer_json(path, specials=C.SPECIAL_TOKENS, normalizer=None):
    """transformers' own tokenizer.json for data/gpt2.tiktoken (TikTokenConverter, which writes tiktoken's
    split regex and every split of a token into two as a merge), the special tokens after GPT-2's 50256 ids
    (<|endoftext|> first, at GPT-2's 50256), and optionally a normalizer."""
    conv = TikTokenConverter(vocab_file=f"{C.HERE}/data/gpt2.tiktoken", pattern=C.GPT2_PATTERN,
                             extra_special_tokens=specials)
    obj = json.loads(conv.converted().to_str())
    obj["normalizer"] = normalizer
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture(scope="module")
def tiktoken_json(tmp_path_factory):
    """(our Encoding, transformers' tokenizer) of one tokenizer.json that transformers made."""
    path = gpt2_tokenizer_json(tmp_path_factory.mktemp("tj") / "tokenizer.json")
    return C.get_tokenizer(path), transformers.PreTrainedTokenizerFast(tokenizer_file=path)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(TEXT)
def test_tokenizer_json_encodes_as_transformers(tiktoken_json, text):
    """Random text (any unicode, whitespace runs, digits, text that spells special tokens): our reading of the
    tokenizer.json gives transformers' ids, and GPT-2's own (the ranks file it was made from); with specials
    allowed, a special token's spelling is that token in both."""
    ours, theirs = tiktoken_json
    ids = ours.encode_ordinary(text)
    assert ids == theirs.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ids == C.get_tokenizer("gpt2").encode_ordinary(text)
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text


VARIANTS = {  # tokenizer.json pre-tokenizers / normalizers of the families we claim, on GPT-2's vocabulary
    "nfc": {"normalizer": {"type": "NFC"}},  # Qwen2
    "digits": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [  # SmolLM
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}},
    "bytelevel": {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                    "use_regex": True}},  # GPT-2's own tokenizer.json
    "cl100k": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [  # Llama-3
        {"type": "Split", "pattern": {"Regex": C.CL100K_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}},
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    out = {}
    for name, change in VARIANTS.items():
        path = tmp_path_factory.mktemp(name) / "tokenizer.json"
        obj = {**json.loads(open(gpt2_tokenizer_json(path)).read()), **change}
        path.write_text(json.dumps(obj))
        out[name] = C.get_tokenizer(str(path)), transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    return out


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(VARIANTS)), TEXT)
def test_pre_tokenizers_and_nfc_as_transformers(variants, name, text):
    """Each pre-tokenizer form we read (ByteLevel; Digits + ByteLevel, emulated by one regex; Split + ByteLevel)
    and the NFC normalizer (e + combining acute is é) encode as transformers does."""
    ours, theirs = variants[name]
    assert ours.encode_ordinary(text) == theirs.encode(text, add_special_tokens=False, split_special_tokens=True)


# -----------------------------------------------------------------------------
# Chat templates

ROLES = st.sampled_from(["system", "user", "assistant"])
CONTENT = st.text(alphabet=" \t\n0123456789abcXYZ'é日.,!?", max_size=20)
CHATS = st.lists(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}), min_size=1, max_size=5)


@pytest.fixture(scope="module")
def template_tokenizers(tmp_path_factory):
    """Per chat template: our Encoding and a transformers tokenizer of the same tokenizer.json (every template's
    special tokens), the template's Jinja text set as its chat_template."""
    specials = C.SPECIAL_TOKENS + [t for ts in C.TEMPLATE_TOKENS.values() for t in ts if t not in C.SPECIAL_TOKENS]
    path = gpt2_tokenizer_json(tmp_path_factory.mktemp("tpl") / "tokenizer.json", specials)
    out = {}
    for name in C.CHAT_TEMPLATES:
        theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|begin_of_text|>")
        theirs.chat_template = formats.TEMPLATE_JINJA[name]
        out[name] = C.get_tokenizer(path, name), theirs
    return out


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(C.CHAT_TEMPLATES)), CHATS, st.booleans())
def test_render_chat_equals_apply_chat_template(template_tokenizers, name, chat, gen):
    """Random conversations (any role order, multi-turn, whitespace and digits at the edges of content): our ids
    are apply_chat_template's, and the mask is on exactly the assistant content and its end token."""
    ours, theirs = template_tokenizers[name]
    ids, mask = C.render_chat(ours, chat, add_generation_prompt=gen)
    assert ids == theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
    runs = []  # the supervised spans, one per assistant turn (each has at least its end token)
    for i, (t, m) in enumerate(zip(ids, mask)):
        if m and (i == 0 or not mask[i - 1]):
            runs.append([])
        if m:
            runs[-1].append(t)
    turns = [m["content"].strip() if name == "llama3" else m["content"] for m in chat if m["role"] == "assistant"]
    assert len(runs) == len(turns)
    end = ours.decode([C.end_id(ours)])
    for run, content in zip(runs, turns):  # a "\n\n" token may carry the header's "\n" into the content
        assert ours.decode(run) in (content + end, "\n" + content + end if content.startswith("\n") else None)


def test_templates_recognised_from_their_text(capsys):
    """Each template's Jinja text is recognised as itself; no template is ChatML; an unknown one is ChatML with a
    one-line note that says how to pick another."""
    for name, text in formats.TEMPLATE_JINJA.items():
        assert C.recognise_template(text) == name
    assert C.recognise_template(None) == "chatml" and capsys.readouterr().err == ""
    mistral = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    assert C.recognise_template(mistral) == "chatml"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--template" in err


def test_llama3_template_tokens_are_added_to_our_tokenizers():
    """--template llama3 on the byte tokenizer: its header and end tokens follow ours, the stop is <|eot_id|>."""
    enc = C.get_tokenizer("byte", "llama3")
    assert enc.n_vocab == 256 + len(C.SPECIAL_TOKENS) + 4 and C.end_id(enc) == enc.encode_single_token("<|eot_id|>")
    ids, _ = C.render_chat(enc, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert enc.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert C.get_tokenizer("byte").chat_template == "chatml"


# -----------------------------------------------------------------------------
# Export: what transformers loads


def low_specials_json(path, n_merges=300):
    """A tokenizer.json laid out as SmolLM2's is: its special tokens first (ids 0-2), then the 256 bytes, then the
    tokens of GPT-2's first n_merges merges, in merge order."""
    gpt2 = json.loads(open(gpt2_tokenizer_json(path)).read())
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    for ch in formats._byte_encoder().values():
        vocab[ch] = len(vocab)
    merges = []
    for a, b in gpt2["model"]["merges"][:n_merges]:
        if a in vocab and b in vocab:  # GPT-2's list has every split of a token; keep those already reachable
            merges.append([a, b])
            vocab.setdefault(a + b, len(vocab))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in list(vocab.items())[:3]]
    path.write_text(json.dumps({**gpt2, "added_tokens": added,
                                "model": {**gpt2["model"], "vocab": vocab, "merges": merges}}))
    return str(path)


def test_low_special_ids_read_as_transformers(tmp_path):
    path = low_specials_json(tmp_path / "tokenizer.json")
    ours, theirs = C.get_tokenizer(path), transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    assert C.special_id(ours, "<|im_start|>") == 1 and C.special_id(ours, "<|pad|>") == ours.n_vocab - 1
    for text in ["Hello there, the 12 cats<|im_end|>", " the  the\n\nthe", "日本 é"]:
        assert ours.encode(text, allowed_special="all") == theirs.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module", params=["byte", "gpt2-json", "low-specials", "smollm2", "llama3"])
def exported(request, tmp_path_factory):
    """A tiny random model exported by export_hf with one tokenizer / template, and what transformers loads."""
    tmp = tmp_path_factory.mktemp("export")
    if request.param == "byte":
        enc = C.get_tokenizer("byte")
    elif request.param == "low-specials":
        enc = C.get_tokenizer(low_specials_json(tmp / "tokenizer.json"))
    else:
        path = gpt2_tokenizer_json(tmp / "tokenizer.json")
        enc = C.get_tokenizer(path, None if request.param == "gpt2-json" else request.param)
    M.torch.manual_seed(0)
    model = M.build_model("tiny", enc, n_layer=2, d_model=64, d_ff=128).eval()
    out = str(tmp / "hf")
    formats.export_hf(model, enc, out)
    return model, enc, out


@settings(max_examples=60, deadline=None, derandomize=True)
@given(TEXT)
@example("<|endoftext|>")  # one pre-token under the byte tokenizer's split: must stay text
def test_export_tokenizer_encodes_as_ours(exported, text):
    """AutoTokenizer on export_hf's directory: the same ids as our Encoding, special tokens as specials."""
    _, enc, out = exported
    theirs = _auto_tokenizer(out)
    assert theirs.encode(text, add_special_tokens=False, split_special_tokens=True) == enc.encode_ordinary(text)
    assert theirs.encode(text, add_special_tokens=False) == enc.encode(text, allowed_special="all")


def _auto_tokenizer(out, cache={}):
    if out not in cache:
        cache[out] = transformers.AutoTokenizer.from_pretrained(out)
    return cache[out]


def test_export_chat_and_greedy_tokens_equal_ours(exported):
    """The export's chat template renders our ids; AutoModelForCausalLM's greedy decoding (never sampling the
    ids ours never samples) gives our tokens; the export loads back as the same model and tokenizer."""
    model, enc, out = exported
    theirs = _auto_tokenizer(out)
    chat = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": " 42\n"},
            {"role": "user", "content": "And 2 + 2?"}]
    ids, _ = C.render_chat(enc, chat, add_generation_prompt=True)
    assert theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    gen = json.load(open(f"{out}/generation_config.json"))
    assert gen["eos_token_id"] == C.end_id(enc) == theirs.convert_tokens_to_ids(theirs.eos_token)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    banned = C.never_sampled(enc, model.cfg.vocab_size, [C.end_id(enc)])
    prompt = M.torch.tensor([ids])
    with M.torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, suppress_tokens=banned,
                           eos_token_id=C.end_id(enc), pad_token_id=C.special_id(enc, "<|pad|>"))[0, len(ids):]
        got, _, got_mask = M.generate(model, [ids], 12, temperature=0.0, stop_ids=[C.end_id(enc)],
                                      pad_id=C.special_id(enc, "<|pad|>"), banned_ids=banned)
    assert got[0][got_mask[0].bool()].tolist() == want.tolist()
    back, enc_back, ckpt = C.load_model(out)
    assert enc_back.chat_template == enc.chat_template and enc_back.encode_ordinary("a 12 b") == \
        enc.encode_ordinary("a 12 b")
    M.torch.testing.assert_close(back(prompt), model(prompt), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# What we refuse


def test_tokenizers_we_do_not_read_are_one_line(tmp_path):
    """A SentencePiece tokenizer.model, a WordPiece or Unigram tokenizer.json, an unknown pre-tokenizer, ids out of
    merge order: a UserError naming the file and what is not implemented."""
    base = json.loads(open(gpt2_tokenizer_json(tmp_path / "tokenizer.json")).read())
    cases = [
        ({**base, "model": {"type": "Unigram", "vocab": [["a", 0.0]]}}, "Unigram"),
        ({**base, "model": {**base["model"], "byte_fallback": True}}, "SentencePiece"),
        ({**base, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, "Metaspace"),
        ({**base, "normalizer": {"type": "Lowercase"}}, "Lowercase"),
        ({**base, "model": {**base["model"], "merges": base["model"]["merges"][::-1]}}, "merge order"),
    ]
    for i, (obj, words) in enumerate(cases):
        path = tmp_path / str(i) / "tokenizer.json"
        path.parent.mkdir()
        path.write_text(json.dumps(obj))
        with pytest.raises(M.UserError, match=words) as e:
            C.get_tokenizer(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(M.UserError, match="unknown chat template"):
        C.get_tokenizer("byte", "vicuna")
