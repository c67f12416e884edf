"""sft.py: the loss, packing, gradient accumulation, resume, DDP and bad input.

    python -m pytest tests/test_sft.py -q
"""
import json
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import common as C
import model as M
import sft
from conftest import (assert_one_line_error, assert_refused, assert_same_first_step, assert_same_training, ROOT,
                      run_script, save_tiny)


def write_chats(path, n=40, seed=0):
    import random
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(0, 99), r.randint(0, 99)
            msgs = [{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}."}]
            if r.random() < 0.3:
                msgs = [{"role": "system", "content": "Be brief."}] + msgs + [
                    {"role": "user", "content": "And add 5 to that?"},
                    {"role": "assistant", "content": f"That makes {a + b + 5}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def final_weights(path):
    return C.load_checkpoint(path)["model"]


# ----------------------------------------------------------------------------- the loss


def test_lm_loss_sum_matches_naive_loop(enc):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, enc.n_vocab)
    ids = torch.randint(0, 256, (2, 7))
    mask = torch.randint(0, 2, (2, 7))
    total, count = sft.lm_loss_sum(logits, ids, mask)
    naive, n = 0.0, 0
    for b in range(2):
        for t in range(1, 7):
            if mask[b, t]:
                naive -= torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item()
                n += 1
    assert count.item() == n
    assert total.item() == pytest.approx(naive, rel=1e-5, abs=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(2, 40), min_size=1, max_size=6), st.integers(0, 2**16))
def test_packed_loss_equals_padded_loss(lengths, seed):
    """Packing (block-diagonal mask, per-document positions) gives the same summed loss and token count as
    one padded example per row; so does each batch trimmed after its last supervised column (sft.batch_of)."""
    enc = C.get_tokenizer("byte")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = M.build_model("tiny", enc, n_layer=1, d_model=32, d_ff=64, max_seq_len=64).eval()
    examples = [(torch.randint(0, 256, (n,), generator=g).tolist(), torch.randint(0, 2, (n,), generator=g).tolist())
                for n in lengths]
    pad = C.special_id(enc, "<|pad|>")
    results = []
    for packing in (True, False):
        rows = sft.make_rows(examples, sft.Config(seq_len=48, packing=packing), pad)
        for trim in (False, True):
            ids, mask, doc = sft.batch_of(rows, slice(None), "cpu", trim=trim)
            assert ids.size(1) == 48 or trim
            with torch.no_grad():
                logits = model(ids, doc_ids=doc)
            results.append(sft.lm_loss_sum(logits, ids, mask))
    (s1, n1) = results[0]
    for s2, n2 in results[1:]:
        assert n1 == n2
        assert s1.item() == pytest.approx(s2.item(), rel=1e-5, abs=1e-5)


def test_chat_mask_never_covers_user_tokens_and_covers_each_im_end(enc, tmp_path):
    cfg = sft.Config(data=write_chats(tmp_path / "c.jsonl"), seq_len=256)
    examples, _ = sft.tokenize(cfg, enc)
    end = C.special_id(enc, "<|im_end|>")
    for ids, mask in examples:
        text = enc.decode(ids)
        n_assistant_turns = text.count("<|im_start|>assistant\n")
        assert sum(1 for t, m in zip(ids, mask) if t == end and m) == n_assistant_turns
        supervised = enc.decode([t for t, m in zip(ids, mask) if m])
        assert "What is" not in supervised and "Be brief" not in supervised and "user" not in supervised


def test_eval_loss_runs_without_autograd(enc):
    """The held-out loss builds no graph: every forward inside eval_loss sees grad mode off."""
    torch.manual_seed(0)
    model = M.build_model("tiny", enc, n_layer=1, d_model=32, d_ff=64, max_seq_len=64)
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    rows = sft.make_rows([([1, 2, 3, 4], [0, 1, 1, 1]), ([5, 6, 7], [0, 0, 1])], sft.Config(seq_len=16), 0)
    loss = sft.eval_loss(model, rows, sft.Config(batch_size=1), torch.device("cpu"))
    assert seen and not any(seen) and loss > 0


def test_row_indices_cover_every_row_each_epoch():
    seen = []
    for step in range(5):
        seen += C.step_indices(step, 10, 4, slice(0, 4), seed=3)
    assert sorted(seen[:10]) == list(range(10))  # first epoch is a permutation
    assert C.step_indices(7, 10, 4, slice(0, 4), 3) == C.step_indices(7, 10, 4, slice(0, 4), 3)


# ----------------------------------------------------------------------------- the loop


def test_grad_accum_equals_one_big_batch(tmp_path, tiny_ckpt):
    data = write_chats(tmp_path / "c.jsonl")
    common = ["--model", tiny_ckpt, "--data", data, "--steps", "3", "--seq-len", "64", "--eval-frac", "0",
              "--warmup", "0", "--eval-every", "0", "--lr", "1e-3"]
    sft.main(common + ["--out", str(tmp_path / "a.pt"), "--batch-size", "8", "--log", str(tmp_path / "a.jsonl")])
    sft.main(common + ["--out", str(tmp_path / "b.pt"), "--batch-size", "2", "--grad-accum", "4",
                       "--log", str(tmp_path / "b.jsonl")])
    a, b = final_weights(tmp_path / "a.pt"), final_weights(tmp_path / "b.pt")
    init = final_weights(tiny_ckpt)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    assert_same_first_step(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    assert_same_training(a, b, lr=1e-3, steps=3)


def test_same_training_check_catches_a_different_data_order(tmp_path, tiny_ckpt):
    """The tolerance of assert_same_training is not so loose that it passes two different computations: the
    same run with another data order (another --seed) fails it."""
    data = write_chats(tmp_path / "c.jsonl")
    common = ["--model", tiny_ckpt, "--data", data, "--steps", "2", "--seq-len", "64", "--eval-frac", "0",
              "--warmup", "0", "--eval-every", "0", "--lr", "1e-3", "--batch-size", "4"]
    sft.main(common + ["--out", str(tmp_path / "a.pt")])
    sft.main(common + ["--out", str(tmp_path / "b.pt"), "--seed", "1"])
    with pytest.raises(AssertionError, match="of weights differ"):
        assert_same_training(final_weights(tmp_path / "a.pt"), final_weights(tmp_path / "b.pt"), lr=1e-3, steps=2)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_equals_straight_run(tmp_path, tiny_ckpt, lora):
    data = write_chats(tmp_path / "c.jsonl")
    common = ["--model", tiny_ckpt, "--data", data, "--steps", "4", "--seq-len", "64", "--batch-size", "4",
              "--eval-every", "0", "--warmup", "1"] + (["--lora-rank", "4", "--lora-dropout", "0.1"] if lora else [])
    sft.main(common + ["--out", str(tmp_path / "straight.pt")])
    sft.main(common + ["--out", str(tmp_path / "part.pt"), "--stop-at", "2"])
    assert C.load_checkpoint(str(tmp_path / "part.pt"))["step"] == 2
    sft.main(common + ["--out", str(tmp_path / "resumed.pt"), "--resume", str(tmp_path / "part.pt")])
    a, b = final_weights(tmp_path / "straight.pt"), final_weights(tmp_path / "resumed.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact on CPU


def test_text_pretraining_smoke_and_log(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"Q: What is {i} + {i}? A: {2 * i}.\n" for i in range(200)))
    log = tmp_path / "log.jsonl"
    proc = run_script("sft.py", "--format", "text", "--init", "tiny", "--data", str(text), "--out",
                      str(tmp_path / "base.pt"), "--steps", "4", "--batch-size", "2", "--seq-len", "64",
                      "--eval-every", "2", "--log", str(log))
    assert "saved" in proc.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "eval_loss" in records[1] and all(r["loss"] > 0 for r in records)
    ckpt = C.load_checkpoint(str(tmp_path / "base.pt"))
    assert ckpt["lineage"] == ["init:tiny", "pretrain"] and ckpt["step"] == 4


def test_init_resized_preset(tmp_path):
    """--init PRESET:field=value,... pre-trains a resized preset (a quarter-size student of make demo)."""
    text = tmp_path / "t.txt"
    text.write_text("abc def ghi\n" * 50)
    run_script("sft.py", "--format", "text", "--init", "tiny:d_model=64,d_ff=192", "--data", str(text), "--out",
               str(tmp_path / "q.pt"), "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-frac", "0")
    model, _, ckpt = C.load_model(str(tmp_path / "q.pt"))
    assert (model.cfg.d_model, model.cfg.d_ff, model.cfg.n_layer) == (64, 192, 4)
    assert ckpt["lineage"] == ["init:tiny:d_model=64,d_ff=192", "pretrain"]


def test_ddp_two_processes_equal_one(tmp_path, tiny_ckpt):
    """torchrun --nproc_per_node=2 (gloo, CPU) with batch 4 per rank == one process with batch 8: the same first
    step to float precision, the same weights after two steps up to what reduction order can do through Adam."""
    data = write_chats(tmp_path / "c.jsonl")
    common = ["--model", tiny_ckpt, "--data", data, "--steps", "2", "--seq-len", "64", "--eval-frac", "0",
              "--eval-every", "0", "--warmup", "0", "--device", "cpu", "--lr", "1e-3"]
    run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "sft.py", "--", *common,
               "--out", str(tmp_path / "ddp.pt"), "--batch-size", "4", "--log", str(tmp_path / "ddp.jsonl"),
               env={"OMP_NUM_THREADS": "1"})
    sft.main(common + ["--out", str(tmp_path / "one.pt"), "--batch-size", "8", "--log", str(tmp_path / "one.jsonl")])
    assert_same_first_step(tmp_path / "ddp.jsonl", tmp_path / "one.jsonl")
    assert_same_training(final_weights(tmp_path / "ddp.pt"), final_weights(tmp_path / "one.pt"), lr=1e-3, steps=2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"text": "no messages"}', "missing field 'messages'"),
    ('{"messages": "oops"}', "wrong type"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "assistant"),
])
def test_malformed_jsonl_gives_file_and_line(tmp_path, tiny_ckpt, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + good + "\n" + line + "\n")
    proc = run_script("sft.py", "--model", tiny_ckpt, "--data", str(path), "--out", str(tmp_path / "o.pt"),
                      "--steps", "1", "--seq-len", "64", check=False)
    assert_one_line_error(proc, f"{path}:3:", message)
    assert not (tmp_path / "o.pt").exists()


def test_skip_bad_lines_counts(tmp_path, tiny_ckpt):
    path = tmp_path / "bad.jsonl"
    write_chats(path, n=10)
    with open(path, "a") as f:
        f.write("{broken\n")
    proc = run_script("sft.py", "--model", tiny_ckpt, "--data", str(path), "--out", str(tmp_path / "o.pt"),
                      "--steps", "1", "--seq-len", "64", "--skip-bad-lines")
    assert "skipped 1 bad lines" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--init", "tiny"], "--format text"),
    ([], "exactly one of --model"),
    (["--init", "huge", "--format", "text"], "unknown preset"),
    (["--init", "tiny", "--format", "text", "--template", "fancy"], "--template"),
    (["--model", "missing.pt"], "no such checkpoint"),
])
def test_impossible_flags_exit_2(tmp_path, args, message):
    assert_refused("sft.py", *args, "--data", os.path.join(ROOT, "README.md"), "--out", str(tmp_path / "o.pt"),
                   "--steps", "1", message=message)


def test_help_lists_every_field():
    proc = run_script("sft.py", "--help")
    for f in sft.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in proc.stdout
    assert "assistant-only loss" in proc.stdout or "supervised" in proc.stdout


@pytest.mark.slow
def test_compile_matches_eager(tmp_path, tiny_ckpt):
    """--compile (torch.compile, inductor on CPU) trains to the same weights as eager, within fp32 noise."""
    data = write_chats(tmp_path / "c.jsonl")
    common = ["--model", tiny_ckpt, "--data", data, "--steps", "2", "--seq-len", "64", "--batch-size", "4",
              "--eval-frac", "0", "--eval-every", "0", "--lr", "1e-3"]
    sft.main(common + ["--out", str(tmp_path / "eager.pt"), "--log", str(tmp_path / "eager.jsonl")])
    sft.main(common + ["--out", str(tmp_path / "compiled.pt"), "--compile", "--log", str(tmp_path / "compiled.jsonl")])
    assert_same_first_step(tmp_path / "eager.jsonl", tmp_path / "compiled.jsonl", rel=1e-4)  # fused kernels round
    assert_same_training(final_weights(tmp_path / "eager.pt"), final_weights(tmp_path / "compiled.pt"),
                         lr=1e-3, steps=2)


def test_template_follows_the_model_and_can_be_switched(tmp_path, tiny_ckpt):
    """--template auto trains in the checkpoint's own template (llama3 here), and the
    output keeps it; --template NAME switches and is kept; a template whose tokens the model lacks is one line."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i} + 1?"},
                                                     {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                            for i in range(40)))
    llama3 = save_tiny(tmp_path / "llama3.pt", C.get_tokenizer("byte", "llama3"))
    args = ["--data", str(data), "--steps", "2", "--batch-size", "2", "--seq-len", "128", "--eval-every", "0"]
    run_script("sft.py", "--model", llama3, "--out", str(tmp_path / "a.pt"), *args)
    assert C.load_checkpoint(str(tmp_path / "a.pt"))["chat_template"] == "llama3"
    run_script("sft.py", "--model", llama3, "--out", str(tmp_path / "b.pt"), "--template", "qwen2.5", *args)
    _, enc, _ = C.load_model(str(tmp_path / "b.pt"))
    ids, _ = C.render_chat(enc, [{"role": "user", "content": "x"}])
    assert enc.chat_template == "qwen2.5" and enc.decode(ids).startswith("<|im_start|>system\nYou are Qwen")
    proc = run_script("sft.py", "--model", tiny_ckpt, "--out", str(tmp_path / "c.pt"), "--template", "llama3",
                      *args, check=False)
    assert_one_line_error(proc, "", "--template llama3 needs 264 token ids")


def test_a_chat_with_nothing_supervised_in_seq_len_is_dropped(tmp_path, enc):
    """Its assistant turn beyond --seq-len (or weight 0): it would add a row that trains on nothing."""
    data = tmp_path / "c.jsonl"
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
             [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "late"}],
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    examples, truncated = sft.tokenize(sft.Config(data=str(data), seq_len=32), enc)
    assert len(examples) == 1 and truncated == 1 and all(any(m) for _, m in examples)
    assert enc.decode([t for t, k in zip(*examples[0]) if k]) == "ok<|im_end|>"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats[1:]))
    with pytest.raises(C.UserError, match="no chat has an assistant token within --seq-len 32"):
        sft.tokenize(sft.Config(data=str(data), seq_len=32), enc)
