"""
speculative.py: speculative decoding. A small draft model proposes k tokens, the target scores all of them in one
forward through its KV cache, and an acceptance rule keeps what comes out distributed exactly as the target's own
samples: the same distribution (the same tokens, greedy) for fewer target forwards.

The rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", Algorithm 1 and
Appendix A.1; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling", Algorithm 2),
p the target's and q the draft's next-token distributions:
  draft    x_1..x_k, x_i ~ q_i = q(. | context, x_<i): k one-token forwards of the draft through its cache
  verify   p_1..p_{k+1} from ONE target forward over [the last emitted token, x_1..x_k]
  accept   x_i with probability min(1, p_i(x_i) / q_i(x_i)), in order, up to the first rejection
  correct  at the first rejection, at i: one token from the residual norm(max(0, p_i - q_i))
  bonus    if all k are kept: one token from p_{k+1}
so a round emits 1 to k+1 tokens for one target forward. Exact because, for every token x,
  P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y))
       = min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x),
(1 - sum_y min = sum_y max(0, p - q), both the rejection probability), at every position given the tokens before.
A draft token is kept with probability sum_x min(p(x), q(x)) = 1 - TV(p, q) (Leviathan's alpha, Sec. 3.1): the
closer the draft's distributions to the target's, the more tokens a round, which is why DistillSpec (Zhou et al.
2024) distils the draft from the target; scripts/spec_real.sh measures a distilled against an undistilled draft.

p and q are the *filtered* distributions `model.generate` samples from: banned ids (pad_id always), temperature,
top-k, top-p (`model.filter_logits`), the same settings for both models. Temperature 0 makes both one-hot at their
argmax; the same rule then keeps a draft token exactly when it is the target's argmax and otherwise emits the
target's argmax, so greedy speculative decoding gives the target's greedy tokens (up to float ties: the target scores
k+1 tokens in one forward, where `model.generate` scores one, and the sums may round differently).

In reading order: `speculative_probs` and `speculative_accept`, the rule as pure functions (tensor in, tensor out);
`generate`, the loop, with `model.generate`'s arguments and contract (tokens, their log-probs under the target's
filtered distribution, mask), plus counts of drafted and accepted tokens; `main`, a speed measurement.

Batches: a KVCache has one slot counter (`pos`) for all its rows, so the batch moves together. Each round every
unfinished row emits its 1..k+1 tokens and the batch keeps the first m of each, m the fewest any unfinished row
emitted; a row that had more drops the rest. Exact still: the first m tokens of a speculative sample are distributed
as the target's first m, and the next round starts from them as from any context. The price is work thrown away
(none at batch 1, the latency setting the method is for). Both caches are then rolled back to the kept tokens by
moving `pos` and `seen` back (`KVCache.rewind`); the slots past `pos` still hold rejected keys, but every forward rewrites
its slots before it reads them and attends only to slots up to its own, so they are never seen.

Why a file of its own, and no `draft=` flag on `model.generate`: model.py is copied alone and is past its line
budget; a flag there would import this file. `speculative.generate(target, draft, prompts, ...)` takes
`model.generate`'s arguments after the draft.

The measurement (`main`): the same prompts decoded at batch 1 by `model.generate` and by speculative decoding with each
--draft at each --k and temperature, one sampling seed for all. No stop token, every special token banned
(`common.never_sampled`): every prompt gets --max-new-tokens. tokens/s is new tokens over the wall time of all prompts,
prefill included; acceptance is accepted / drafted tokens (vLLM's draft acceptance rate); alpha is accepted / examined
tokens, the drafts after a round's rejection not counted (Leviathan's alpha, the probability a draft token is kept:
tokens per round = (1 - alpha^(k+1)) / (1 - alpha) when it is the same everywhere); speed-up is against plain decoding
at the same temperature. Greedy runs also report whether the tokens equal plain decoding's. On a text --data it also
computes alpha exactly, `expected_alpha` averaged over --alpha-windows windows of 512 tokens of the text itself
(teacher-forced): no sampling noise, so two drafts compare on thousands of positions, not on a few prompts.

    python speculative.py --model target.pt --draft small.pt --data prompts.jsonl --k 2,4,8   # CPU (or --device cuda)
    python speculative.py --model target.pt --draft a.pt,b.pt --data text.txt --n-prompts 8 --prompt-len 64
    scripts/spec_real.sh out/spec   # SmolLM2-135M-Instruct, drafts pruned to half and healed with / without KD

Departures: the papers run batch 1; the batch rule above is ours. The draft drafts a fixed k per round (no adaptive
k, no tree of drafts). The draft/target tokenizer check is `common.tokenizers_differ`, distill.py's and qat.py's too.
"""

import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import common as C
import model as M
from model import UserError


# -----------------------------------------------------------------------------
# The acceptance rule. This block can be copied alone: torch only.


def speculative_probs(p, q, draft):
    """The rule's exact probabilities. p (B, k+1, V): the target's distributions at the k drafted positions and the
    one after them; q (B, k, V): the draft's at the k drafted positions; draft (B, k): the tokens drawn from q ->
      accept (B, k): min(1, p_i(x_i) / q_i(x_i)), the probability that draft token i is kept once those before it are
      fallback (B, k+1, V): what the emitted token is drawn from after the first rejection at i < k (the residual
        norm(max(0, p_i - q_i))) or after all k were kept (i = k: p_{k+1}, the bonus token)."""
    k = draft.shape[1]
    p_x = p[:, :k].gather(-1, draft[..., None]).squeeze(-1)  # (B, k)
    q_x = q.gather(-1, draft[..., None]).squeeze(-1)  # (B, k)
    accept = torch.where(q_x > 0, p_x / q_x, (p_x > 0).to(p.dtype)).clamp(max=1)
    residual = (p[:, :k] - q).clamp(min=0)  # (B, k, V)
    mass = residual.sum(-1, keepdim=True)  # the rejection probability; 0 where p == q, then p stands in (never used)
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(p.dtype).tiny), p[:, :k])
    return accept, torch.cat([residual, p[:, k:]], 1)


def speculative_accept(p, q, draft, generator=None):
    """One round of the rule, shapes as `speculative_probs` -> (n, token): n (B,) the draft tokens kept (0..k, the
    first n of each row), token (B,) the token emitted after them (the residual's at a rejection, else the bonus)."""
    accept, fallback = speculative_probs(p, q, draft)
    u = torch.rand(accept.shape, generator=generator, device=accept.device, dtype=accept.dtype)
    n = (u < accept).long().cumprod(1).sum(1)  # (B,) kept up to the first rejection
    after = fallback[torch.arange(len(n), device=n.device), n]  # (B, V)
    return n, torch.multinomial(after, 1, generator=generator).squeeze(-1)


def expected_alpha(p, q):
    """Leviathan's alpha at one position, computed rather than sampled: p, q (..., V) the target's and the draft's
    distributions -> (...,) sum_x min(p(x), q(x)) = 1 - TV(p, q), the probability that a token drawn from q is kept
    (E_{x~q} min(1, p(x) / q(x))). 1 when q == p; with one-hot (greedy) p and q, 1 where their argmaxes agree, else 0."""
    return torch.minimum(p, q).sum(-1)


# -----------------------------------------------------------------------------
# Decoding with a draft


def sampling_probs(logits, temperature, top_k, top_p, banned):
    """Logits (..., V) -> (probs, logp), (..., V) each: what `model.generate` draws from (one-hot at the argmax for
    temperature 0) and the log-probs it reports (log_softmax of `filter_logits`)."""
    logp = torch.log_softmax(M.filter_logits(logits, temperature, top_k, top_p, banned), dim=-1)
    probs = logp.exp() if temperature > 0 else F.one_hot(logp.argmax(-1), logp.shape[-1]).to(logp.dtype)
    return probs, logp


@torch.no_grad()
def generate(target, draft, prompts, max_new_tokens, k=4, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), pad_id=0,
             generator=None, banned_ids=()):
    """`model.generate(target, prompts, ...)` by speculative decoding with `draft` proposing k tokens a round.

    Returns (tokens, logprobs, mask), (B, N) each, N <= max_new_tokens, as `model.generate` does (logprobs under the
    target's filtered distribution), and counts {"drafted", "accepted", "rejected", "rounds"}, over the rows unfinished
    at each round: draft tokens proposed, draft tokens kept by the rule, rounds that ended in a rejection (the tokens
    drafted after one are never examined), and target forwards after the prefill."""
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UserError(f"the draft has {draft.cfg.vocab_size} token ids and the target {target.cfg.vocab_size}: "
                        "speculative decoding needs the same tokenizer for both")
    if k < 1 or not all(prompts):
        raise UserError(f"speculative decoding needs k >= 1 (got {k}) and at least one prompt token per row")
    device = next(target.parameters()).device
    banned = M.ban_mask(target.cfg.vocab_size, {pad_id, *banned_ids}, device)
    dist = functools.partial(sampling_probs, temperature=temperature, top_k=top_k, top_p=top_p, banned=banned)
    ids, mask = M.pad_left(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, P = ids.shape
    t_cache = target.new_cache(B, M.cache_length(P + max_new_tokens + k))
    d_cache = draft.new_cache(B, M.cache_length(P + max_new_tokens + k))
    if P > 1:  # each cache holds every token but the last one emitted (first: the prompt's last), which a round feeds
        target(ids[:, :-1], attention_mask=mask[:, :-1], cache=t_cache)
        draft(ids[:, :-1], attention_mask=mask[:, :-1], cache=d_cache)
    last = pending = ids[:, -1:]  # (B, 1) the last token emitted; (B, 1 or 2) the tokens the draft has not seen
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, masks = [], [], []
    counts = {"drafted": 0, "accepted": 0, "rejected": 0, "rounds": 0}
    while len(tokens) < max_new_tokens and not done.all():
        k_now = max(1, min(k, max_new_tokens - len(tokens) - 1))  # no more drafts than tokens still wanted
        x, xs, qs = pending, [], []
        for _ in range(k_now):
            q = dist(draft(x, cache=d_cache)[:, -1])[0]  # (B, V)
            x = torch.multinomial(q, 1, generator=generator)  # (B, 1); the argmax when q is one-hot (greedy)
            xs.append(x), qs.append(q)
        drafted = torch.cat(xs, 1)  # (B, k)
        logits = target(torch.cat([last, drafted], 1), cache=t_cache)  # (B, k+1, V)
        p, logp = dist(logits)
        n, token = speculative_accept(p, torch.stack(qs, 1), drafted, generator)
        emitted = F.pad(drafted, (0, 1)).scatter(1, n[:, None], token[:, None])  # (B, k+1): x_1..x_n, token, ...
        m = min(int((n[~done] + 1).min()), max_new_tokens - len(tokens))  # what every unfinished row has
        counts["drafted"] += k_now * int((~done).sum())
        counts["accepted"] += int(n[~done].sum())
        counts["rejected"] += int((n[~done] < k_now).sum())
        counts["rounds"] += 1
        emitted_logp = logp[:, :m].gather(-1, emitted[:, :m, None]).squeeze(-1)  # (B, m)
        for j in range(m):
            tokens.append(torch.where(done, pad_id, emitted[:, j]))
            logps.append(torch.where(done, 0.0, emitted_logp[:, j]))
            masks.append((~done).long())
            done = done | torch.isin(emitted[:, j], stop)
            if done.all():  # as model.generate: no columns after the last row's stop
                break
        # the target saw last, x_1..x_k: keep last, x_1..x_{m-1}; the draft saw pending, x_1..x_{k-1}: keep x_<=seen
        t_cache.rewind(k_now + 1 - m)
        seen = min(m - 1, k_now - 1)
        d_cache.rewind(k_now - 1 - seen)
        last, pending = emitted[:, m - 1:m], emitted[:, seen:m]
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(masks, 1), counts


# -----------------------------------------------------------------------------
# The measurement


@dataclass
class Config:
    model: str = ""  # the target: checkpoint, HF directory or GGUF
    draft: str = ""  # draft checkpoints, comma-separated: each measured alone; each must share the target's tokenizer
    data: str = ""  # prompts: a JSONL of {"prompt": str or messages} (chat template), or text (.txt: windows of it)
    n_prompts: int = 8  # prompts used (JSONL: the first ones; text: windows spread evenly over it)
    prompt_len: int = 64  # text: tokens per prompt window
    max_new_tokens: int = 64  # tokens generated per prompt (no stop token, so every run generates as many)
    k: str = "2,4,8"  # draft tokens per round, comma-separated: each measured
    temperatures: str = "0,1"  # comma-separated; 0 is greedy
    top_k: int = 0  # top-k filtering of both models' distributions (0: off)
    top_p: float = 1.0  # nucleus filtering of both models' distributions (1: off)
    seed: int = 0  # sampling seed (the same for every run)
    threads: int = 0  # torch CPU threads (0: torch's default)
    device: str = "cpu"  # auto | cpu | cuda | mps
    alpha_windows: int = 4  # text --data: also alpha computed exactly (`expected_alpha`) on this many windows of 512
    # tokens, teacher-forced (the text's own tokens as context, not sampled ones); 0: off
    out: str = "out/spec/spec.json"  # the results, JSON; a markdown table is printed


def parse_list(text, kind, flag):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"--{flag} {text!r}: expected comma-separated numbers, e.g. 2,4,8")
    return values


def read_prompts(cfg, enc):
    """--data -> list of id lists: chat prompts rendered with enc's template, or windows of a text."""
    if cfg.data.endswith(".jsonl"):
        rows = C.read_jsonl(cfg.data, "prompt")[:cfg.n_prompts]
        return [C.render_chat(enc, C.as_messages(r["prompt"], cfg.data), add_generation_prompt=True)[0] for r in rows]
    ids = enc.encode_ordinary("\n\n".join(C.read_text(cfg.data)))
    if len(ids) < cfg.n_prompts * cfg.prompt_len:
        raise UserError(f"{cfg.data}: {len(ids)} tokens, fewer than --n-prompts x --prompt-len")
    stride = len(ids) // cfg.n_prompts
    return [ids[i * stride:i * stride + cfg.prompt_len] for i in range(cfg.n_prompts)]


@torch.no_grad()
def exact_alphas(target, drafts, windows, temps, settings):
    """{draft: {temperature: alpha}}: `expected_alpha` of each draft against the target, averaged over every position
    of the windows (B, T), each distribution the filtered one both models sample from. No sampling noise: the
    steadier figure beside the sampled acceptance of a few prompts."""
    banned = M.ban_mask(target.cfg.vocab_size, settings["banned_ids"], windows.device)
    p_logits = target(windows)
    out = {}
    for path, draft in drafts.items():
        q_logits = draft(windows)
        out[path] = {str(t): expected_alpha(sampling_probs(p_logits, t, settings["top_k"], settings["top_p"], banned)[0],
                                            sampling_probs(q_logits, t, settings["top_k"], settings["top_p"], banned)[0]
                                            ).mean().item() for t in temps}
    return out


def timed_runs(fn, prompts):
    """fn(prompt) for each prompt at batch 1 -> (new tokens per second, the outputs)."""
    t0, outs = time.perf_counter(), [fn(p) for p in prompts]
    n = sum(int(out[2].sum()) for out in outs)
    return n / (time.perf_counter() - t0), outs


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    if not (cfg.model and cfg.draft and cfg.data):
        raise UserError("--model (the target), --draft (one or more, comma-separated) and --data (prompts) are needed")
    ks, temps = parse_list(cfg.k, int, "k"), parse_list(cfg.temperatures, float, "temperatures")
    if min(ks) < 1 or min(temps) < 0 or cfg.max_new_tokens < 1 or cfg.n_prompts < 1:
        raise UserError("--k must be >= 1, --temperatures >= 0, --max-new-tokens and --n-prompts >= 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = C.pick_device(cfg.device)
    target, enc, _ = C.load_model(cfg.model, device)
    drafts = {}
    for path in cfg.draft.split(","):
        drafts[path], d_enc, _ = C.load_model(path, device)
        why = C.tokenizers_differ(enc, d_enc)
        if why or drafts[path].cfg.vocab_size != target.cfg.vocab_size:
            raise UserError(f"draft {path} and target {cfg.model} do not share a tokenizer "
                            f"({why or 'different vocabulary sizes'}): the rule compares their distributions id by id")
    prompts = read_prompts(cfg, enc)
    banned = C.never_sampled(enc, target.cfg.vocab_size, [])  # no stop: every prompt gets max_new_tokens
    settings = dict(top_k=cfg.top_k, top_p=cfg.top_p, banned_ids=banned)
    for m in (target, *drafts.values()):
        m.eval()
    M.generate(target, prompts[:1], 4, **settings)  # warm-up: the first forwards pay one-off allocation
    results = {"config": asdict(cfg), "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                                                  "load_avg": os.getloadavg(), "platform": platform.platform()},
               "plain": {}, "runs": []}
    for temp in temps:
        g = torch.Generator(device).manual_seed(cfg.seed)
        tok_s, plain = timed_runs(lambda p: M.generate(target, [p], cfg.max_new_tokens, temp, generator=g,
                                                       **settings), prompts)
        results["plain"][str(temp)] = tok_s
        print(f"plain T={temp}: {tok_s:.1f} tok/s", flush=True)
        for path, draft in drafts.items():
            for k in ks:
                g = torch.Generator(device).manual_seed(cfg.seed)
                spec_tok_s, outs = timed_runs(lambda p: generate(target, draft, [p], cfg.max_new_tokens, k, temp,
                                                                 generator=g, **settings), prompts)
                drafted, accepted, rejected, rounds = (sum(o[3][key] for o in outs)
                                                       for key in ("drafted", "accepted", "rejected", "rounds"))
                run = {"draft": path, "k": k, "temperature": temp, "acceptance": accepted / drafted,
                       "alpha": accepted / max(1, accepted + rejected),
                       "tokens_per_round": sum(int(o[2].sum()) for o in outs) / rounds, "tok_s": spec_tok_s,
                       "speedup": spec_tok_s / tok_s}
                if temp == 0:
                    run["same_as_plain"] = all(torch.equal(o[0], q[0]) for o, q in zip(outs, plain))
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
    if cfg.alpha_windows and not cfg.data.endswith(".jsonl"):
        ids = enc.encode_ordinary("\n\n".join(C.read_text(cfg.data)))
        L = min(512, target.cfg.max_seq_len)
        stride = max(L, len(ids) // cfg.alpha_windows)
        windows = torch.tensor([ids[i:i + L] for i in range(0, len(ids) - L + 1, stride)][:cfg.alpha_windows],
                               device=device)  # (W, L)
        results["alpha_exact"] = exact_alphas(target, drafts, windows, temps, settings)
        results["alpha_exact_positions"] = windows.numel()
        print(json.dumps({"alpha_exact": results["alpha_exact"], "positions": windows.numel()}), flush=True)
    results["machine"]["load_avg_after"] = os.getloadavg()
    C.atomic_write(cfg.out, lambda f: f.write(json.dumps(results, indent=1).encode()))
    head = "| draft | T | k | acceptance | alpha | tokens/round | tok/s | plain tok/s | speed-up |"
    print(f"\n{head}\n" + "|---" * 9 + "|")
    for r in results["runs"]:
        print(f"| {os.path.basename(r['draft'])} | {r['temperature']:g} | {r['k']} | {r['acceptance']:.3f} | "
              f"{r['alpha']:.3f} | {r['tokens_per_round']:.2f} | {r['tok_s']:.1f} | "
              f"{results['plain'][str(r['temperature'])]:.1f} | {r['speedup']:.2f}x |")
    for path, by_t in results.get("alpha_exact", {}).items():
        print(f"alpha computed exactly over {results['alpha_exact_positions']} text positions, "
              f"{os.path.basename(path)}: " + ", ".join(f"T={float(t):g} {a:.3f}" for t, a in by_t.items()))


if __name__ == "__main__":
    C.run(main)
