"""Scoring primitives on the model: continuation log-likelihoods, rolling document log-likelihoods, generation.

- `loglikelihood`: for (context, continuation) token lists, the summed log-probability of the continuation, whether
  every continuation token is the greedy (argmax) one, and the number of tokens. Requests whose context is shared
  by several continuations (multiple choice) compute the context once: the contexts run in one forward that fills
  the model's KV cache, whose rows are then repeated for each continuation. The other requests run in batches
  sorted by length, right-padded (a causal model's real tokens never see the padding after them, and padding is
  masked out of every attention row), so padding and batching never change a score. The head runs only on the
  positions that predict continuation tokens, and log-probabilities are over the model's whole head (as
  lm-evaluation-harness's `hf` model computes them).
- `rolling_loglikelihood`: documents longer than the context, split into windows (lm-evaluation-harness's rolling
  windows): every token is predicted exactly once, the first from the end-of-text token, the others with up to
  max_seq_len tokens of preceding context (windows overlap for context).
- `generate_until`: greedy (or sampled) generation until stop strings, through the serving engine's continuous
  batching (`dbrx.serve.engine.Engine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from dbrx.tokens import EOS_ID

ProgressFn = Callable[[int], None]  # called with the number of requests just finished


class Score(NamedTuple):
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the argmax of its prediction
    n_tokens: int  # continuation tokens scored


# ---- continuation log-likelihoods -----------------------------------------------------------------------------
def _blocked_head(weight: torch.Tensor, x: torch.Tensor, t: torch.Tensor, block: int = 4096):
    """log_softmax(x @ weight.T)[t] and argmax == t for rows x (n, D), the vocabulary in blocks of `block` rows of
    the weight with a running max and sum of exponentials: no (n, V) tensor exists, and each block's logits stay
    in the caches through its max, exp and sum (on the CPU ~1.7x faster than log_softmax and argmax over the full
    row with a 100k vocabulary)."""
    n = x.shape[0]
    m = torch.full((n,), -torch.inf, dtype=torch.float32)
    s = torch.zeros(n, dtype=torch.float32)
    arg = torch.zeros(n, dtype=torch.long)
    tl = torch.zeros(n, dtype=torch.float32)
    for v0 in range(0, weight.shape[0], block):
        lg = x @ weight[v0 : v0 + block].T  # (n, b)
        bm, bi = lg.max(-1)
        better = bm > m
        arg = torch.where(better, bi + v0, arg)
        nm = torch.maximum(m, bm)
        s = s * torch.exp(m - nm) + torch.exp(lg - nm[:, None]).sum(-1)
        m = nm
        inside = (t >= v0) & (t < v0 + lg.shape[1])
        tl = torch.where(inside, lg.gather(1, (t - v0).clamp(0, lg.shape[1] - 1)[:, None])[:, 0], tl)
    return tl - (m + s.log()), arg == t


def _head_scores(model: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int | None = None):
    """h (N, D) hidden states, targets (N,) -> log-probabilities (N,) fp32 and is-argmax (N,) bool, the head run
    in chunks so that no (N, V) fp32 tensor larger than `chunk` rows exists. On the CPU with a plain fp32 head,
    64 rows at a time through `_blocked_head`; elsewhere (GPU, quantized or adapted heads) 1024 rows of full
    logits at a time."""
    head = model.lm_head
    if h.device.type == "cpu" and type(head) is nn.Linear and head.bias is None and \
            head.weight.dtype == torch.float32 and h.dtype == torch.float32:
        chunk = chunk or 64
        parts = [_blocked_head(head.weight, h[i : i + chunk], targets[i : i + chunk])
                 for i in range(0, h.shape[0], chunk)]
    else:
        chunk = chunk or 1024
        parts = []
        for i in range(0, h.shape[0], chunk):
            logits = head(h[i : i + chunk]).float()  # (n, V)
            t = targets[i : i + chunk]
            parts.append((torch.log_softmax(logits, -1).gather(1, t[:, None])[:, 0], logits.argmax(-1) == t))
    if not parts:
        return h.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=h.device)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _fit(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The context cut from the left so that context + continuation[:-1] fits max_len; an empty context becomes
    the end-of-text token (what a document starts after)."""
    ctx, cont = tuple(int(t) for t in context), tuple(int(t) for t in continuation)
    if len(cont) > max_len:
        raise ValueError(f"a continuation of {len(cont)} tokens exceeds the model's max_seq_len ({max_len})")
    ctx = ctx or (EOS_ID,)
    return ctx[max(0, len(ctx) - (max_len + 1 - len(cont))) :], cont


def _score_rows(model, rows: list[tuple[tuple[int, ...], tuple[int, ...]]], device) -> list[Score]:
    """One right-padded forward: each row is context + continuation[:-1], scored on the continuation."""
    T = max(len(c) + len(x) - 1 for c, x in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    b_idx, t_idx, targets = [], [], []
    for r, (c, x) in enumerate(rows):
        seq = c + x[:-1]
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        b_idx += [r] * len(x)
        t_idx += range(len(c) - 1, len(c) - 1 + len(x))
        targets += x
    padded = bool((mask == 0).any())
    h, _ = model.hidden_states(ids.to(device), attention_mask=mask.to(device) if padded else None)  # (B, T, D)
    lp, hit = _head_scores(model, h[torch.tensor(b_idx), torch.tensor(t_idx)], torch.tensor(targets, device=device))
    return _split(lp, hit, [len(x) for _, x in rows])


def _split(lp: torch.Tensor, hit: torch.Tensor, lengths: list[int]) -> list[Score]:
    lp, hit = lp.double().cpu(), hit.cpu()
    out, i = [], 0
    for n in lengths:
        out.append(Score(float(lp[i : i + n].sum()), bool(hit[i : i + n].all()), n))
        i += n
    return out


def _kv_caches(model: nn.Module) -> list[nn.Module]:
    from dbrx.model import KVCache

    return [m for m in model.modules() if isinstance(m, KVCache)]


def _score_groups(model, groups: list[tuple[tuple[int, ...], list[tuple[int, ...]]]], device) -> list[list[Score]]:
    """Groups of continuations sharing one context: the contexts (left-padded to a common end, with their own
    positions) fill the KV cache in one forward, whose last position predicts every continuation's first token;
    the cache rows are then repeated per continuation and the continuations (right-padded) run against them."""
    M = max(len(c) for c, _ in groups)
    N = max(len(x) - 1 for _, conts in groups for x in conts)
    G = len(groups)
    ids = torch.zeros(G, M, dtype=torch.long)
    slot_mask = torch.zeros(G, M + N, dtype=torch.long)  # over the cache slots: 1 = a real token
    pos = torch.zeros(G, M, dtype=torch.long)
    for g, (c, _) in enumerate(groups):
        ids[g, M - len(c) :] = torch.tensor(c)
        slot_mask[g, M - len(c) : M] = 1
        pos[g, M - len(c) :] = torch.arange(len(c))
    model.setup_cache(G, M + N)
    try:
        h, _ = model.hidden_states(ids.to(device), slot_mask.to(device), pos.to(device),
                                   cache_pos=torch.arange(M, device=device))  # (G, M, D)
        rows = [(g, x) for g, (_, conts) in enumerate(groups) for x in conts]
        first_lp, first_hit = _head_scores(model, h[torch.tensor([g for g, _ in rows]), M - 1],
                                           torch.tensor([x[0] for _, x in rows], device=device))  # (R,)
        if N > 0:
            sel = torch.tensor([g for g, _ in rows], device=device)
            for cache in _kv_caches(model):  # (G, ...) -> (R, ...): each continuation continues its context
                cache.k, cache.v = cache.k[sel], cache.v[sel]
            R = len(rows)
            ids = torch.zeros(R, N, dtype=torch.long)
            cont_mask = slot_mask[sel.cpu()].clone()  # (R, M + N)
            pos = torch.zeros(R, N, dtype=torch.long)
            b_idx, t_idx, targets = [], [], []
            for r, (g, x) in enumerate(rows):
                n = len(x) - 1
                ids[r, :n] = torch.tensor(x[:-1])
                cont_mask[r, M : M + n] = 1
                pos[r] = len(groups[g][0]) + torch.arange(N)
                b_idx += [r] * n
                t_idx += range(n)
                targets += x[1:]
            h, _ = model.hidden_states(ids.to(device), cont_mask.to(device), pos.to(device),
                                       cache_pos=torch.arange(M, M + N, device=device))  # (R, N, D)
            rest_lp, rest_hit = _head_scores(model, h[torch.tensor(b_idx), torch.tensor(t_idx)],
                                             torch.tensor(targets, device=device))
        else:
            rest_lp, rest_hit = first_lp[:0], first_hit[:0]
    finally:
        model.clear_cache()
    # per continuation: its first token (from the context pass), then its others (in order) from the second pass
    first_lp, first_hit, rest_lp, rest_hit = first_lp.double().cpu(), first_hit.cpu(), rest_lp.double().cpu(), \
        rest_hit.cpu()
    out: list[list[Score]] = [[] for _ in groups]
    i = 0
    for r, (g, x) in enumerate(rows):
        n = len(x) - 1
        lp = float(first_lp[r] + rest_lp[i : i + n].sum())
        out[g].append(Score(lp, bool(first_hit[r]) and bool(rest_hit[i : i + n].all()), len(x)))
        i += n
    return out


@torch.inference_mode()
def loglikelihood(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_tokens: int = 4096,
    max_batch: int = 64,
    share_contexts: bool = True,
    progress: ProgressFn | None = None,
) -> list[Score]:
    """(context ids, continuation ids) pairs -> a Score per request, in order.

    A context too long for max_seq_len is cut from the left; an empty context is the end-of-text token; an empty
    continuation scores (0.0, True, 0). Batches hold at most `batch_tokens` padded tokens and `max_batch` rows.
    share_contexts=False scores every request separately (a reference for the grouped path)."""
    if batch_tokens < 1 or max_batch < 1:
        raise ValueError(f"batch_tokens and max_batch must be >= 1, got {batch_tokens}, {max_batch}")
    was_training = model.training
    model.eval()
    max_len = model.config.max_seq_len
    device = next(model.parameters()).device
    out: list[Score | None] = [None] * len(requests)
    unique: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}  # identical requests are scored once
    for i, (c, x) in enumerate(requests):
        if len(x) == 0:
            out[i] = Score(0.0, True, 0)
        else:
            unique.setdefault(_fit(c, x, max_len), []).append(i)
    by_context: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for c, x in unique:
        by_context.setdefault(c, []).append(x)

    def done(key, score):
        for i in unique[key]:
            out[i] = score
        if progress is not None:
            progress(len(unique[key]))

    try:
        # contexts shared by several continuations: one pass of the context, longest contexts first
        groups = sorted(((c, xs) for c, xs in by_context.items() if share_contexts and len(xs) > 1),
                        key=lambda g: -len(g[0]))
        while groups:
            M, N, rows, batch = len(groups[0][0]), 0, 0, []
            for c, xs in groups:
                n = max(max(len(x) for x in xs) - 1, N)
                cost = (len(batch) + 1) * M + (rows + len(xs)) * n
                if batch and (cost > batch_tokens or rows + len(xs) > max_batch or M + n > max_len):
                    break
                batch.append((c, xs))
                N, rows = n, rows + len(xs)
            groups = groups[len(batch) :]
            for (c, xs), scores in zip(batch, _score_groups(model, batch, device)):
                for x, s in zip(xs, scores):
                    done((c, x), s)
        # the others: one row each, longest first, right-padded
        singles = sorted(((c, x) for c, xs in by_context.items() if not (share_contexts and len(xs) > 1)
                          for x in xs), key=lambda r: -(len(r[0]) + len(r[1])))
        while singles:
            T = len(singles[0][0]) + len(singles[0][1]) - 1
            n = max(1, min(max_batch, batch_tokens // T, len(singles)))
            batch, singles = singles[:n], singles[n:]
            for key, s in zip(batch, _score_rows(model, batch, device)):
                done(key, s)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


# ---- rolling log-likelihood -----------------------------------------------------------------------------------
def rolling_windows(tokens: Sequence[int], max_len: int, context_len: int = 1,
                    prefix_token: int = EOS_ID) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token of `tokens` exactly once.

    The first window predicts up to max_len tokens from `prefix_token`; each later one predicts up to
    max_len - context_len + 1 new tokens with the max_len - 1 tokens before its last one as input, so every
    prediction sees at least context_len tokens (lm-evaluation-harness's rolling windows, made disjoint)."""
    if not 1 <= context_len <= max_len:
        raise ValueError(f"context_len must be in [1, max_len={max_len}], got {context_len}")
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_len - context_len + 1
    first = min(max_len, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        inp = tokens[max(0, end - max_len - 1) : end - 1]  # the model's input: ends just before the last target
        windows.append((inp[: len(inp) - (n - 1)], tokens[done:end]))
        done = end
    return windows


def rolling_loglikelihood(model: nn.Module, documents: Sequence[Sequence[int]], context_len: int = 1,
                          prefix_token: int = EOS_ID, **kwargs) -> list[Score]:
    """Each document's total log-likelihood (every token predicted once; see rolling_windows), its greediness and
    its token count. kwargs go to `loglikelihood`."""
    max_len = model.config.max_seq_len
    windows, owner = [], []
    for d, doc in enumerate(documents):
        for w in rolling_windows(doc, max_len, context_len, prefix_token):
            windows.append(w)
            owner.append(d)
    scores = loglikelihood(model, windows, **kwargs)
    lp, greedy, n = [0.0] * len(documents), [True] * len(documents), [0] * len(documents)
    for d, s in zip(owner, scores):
        lp[d] += s.logprob
        greedy[d] = greedy[d] and s.greedy
        n[d] += s.n_tokens
    return [Score(a, b, c) for a, b, c in zip(lp, greedy, n)]


# ---- generation -----------------------------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    prompt_ids: Sequence[int]
    stop: Sequence[str] = ()  # the text ends before the first of these
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


@torch.inference_mode()
def generate_until(model: nn.Module, tokenizer, requests: Sequence[GenerationRequest],
                   max_num_seqs: int = 32, kv_memory_bytes: int = 256 << 20,
                   progress: ProgressFn | None = None) -> list[str]:
    """The generated text of each request, cut before its first stop string; all requests run together through
    the serving engine (continuous batching over a paged KV cache). A request stops at a stop string, an
    end-of-text id or max_new_tokens; a prompt too long for max_seq_len - max_new_tokens is cut from the left."""
    from dbrx.sampling import SamplingParams
    from dbrx.serve.engine import Engine, EngineConfig

    if not requests:
        return []
    cfg, block = model.config, 16
    max_len = cfg.max_seq_len
    prompts, news = [], []
    for r in requests:
        new = min(r.max_new_tokens, max_len - 1)
        prompts.append(list(r.prompt_ids)[-(max_len - new):] or [EOS_ID])
        news.append(new)
    # KV blocks for the longest requests that can run at once (or kv_memory_bytes, when that is less)
    longest = sorted((len(p) + n for p, n in zip(prompts, news)), reverse=True)[:max_num_seqs]
    blocks = sum(-(-n // block) for n in longest) + 1
    per_block = 2 * cfg.n_layers * block * cfg.attn_config.kv_n_heads * cfg.head_dim * \
        next(model.parameters()).element_size()
    was_training = model.training
    try:
        engine = Engine(model, EngineConfig(block_size=block, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
                                            num_blocks=max(2, min(blocks, kv_memory_bytes // per_block)),
                                            max_waiting=len(requests) + 1))  # (puts the model in eval mode)
        ids: dict[str, list[int]] = {}
        for i, (r, prompt, new) in enumerate(zip(requests, prompts, news)):
            engine.add_request(str(i), prompt, SamplingParams(temperature=r.temperature, max_new_tokens=new,
                                                              seed=r.seed))
            ids[str(i)] = []
        texts: dict[str, str] = {}
        while engine.has_unfinished():
            for out in engine.step():
                rid = out.request_id
                ids[rid] += out.new_token_ids
                stops = requests[int(rid)].stop
                text = tokenizer.decode(ids[rid], skip_special=True)
                cut = _first_stop(text, stops) if stops else None
                if cut is not None or out.finished:
                    if not out.finished:
                        engine.abort(rid)
                    texts[rid] = text if cut is None else text[:cut]
                    if progress is not None:
                        progress(1)
    finally:
        model.train(was_training)
    return [texts[str(i)] for i in range(len(requests))]


__all__ = ["GenerationRequest", "Score", "generate_until", "loglikelihood", "rolling_loglikelihood",
           "rolling_windows"]
