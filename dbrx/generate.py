"""Text generation with the preallocated KV cache: sampling, batched id generation, token and text streaming.

Plain functions in the gpt-fast style. The layers:
  sample_next      logits (B, V) -> next ids (B,): repetition penalty, temperature, top-k, top-p
  generate_ids     a batch of prompts (left padded) -> new ids per prompt; one prefill, then one token per step
  stream_ids       one prompt -> an iterator of new ids
  stream_text      text or chat messages -> an iterator of text pieces (whole UTF-8 characters, stop strings cut)
  generate_text    the joined text of stream_text

Output conventions: the stop id that ends a sequence is not included in its output, and a stop string is not
included in the text (generation ends at its first occurrence). Ids at or above `vocab_limit` (the padding rows
of DBRX's 100352-row head: real ids are < 100280) are never sampled, nor are the ids below it that are no token
(`UNUSED_IDS`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .model import KVCache
from .tokenizer import DEFAULT_SYSTEM_PROMPT
from .tokens import REAL_VOCAB_SIZE, STOP_IDS, UNUSED_IDS

DBRX_STOP_IDS = STOP_IDS  # <|endoftext|>, <|im_end|>


# ---- sampling -----------------------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (top_k, top_p and seed are then unused).

    repetition_penalty follows transformers: logits of tokens already seen (prompt included) are divided by the
    penalty when positive, multiplied by it when negative. seed None uses torch's global generator.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = DBRX_STOP_IDS
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_ids = tuple(self.stop_ids)
        self.stop_strings = tuple(self.stop_strings)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if any(not isinstance(i, int) or i < 0 for i in self.stop_ids):
            raise ValueError(f"stop_ids must be non-negative integers, got {self.stop_ids!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with params.seed on `device`, or None (torch's global generator) when seed is None."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def seen_mask(seen_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, S) ids (negative = none) -> (B, V) bool, True where the id occurs in the row."""
    mask = torch.zeros(seen_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=seen_ids.device)
    idx = torch.where(seen_ids < 0, vocab_size, seen_ids).long()  # negatives go to a spare last column
    return mask.scatter_(1, idx, True)[:, :vocab_size]


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen_ids: torch.Tensor | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """(B, V) logits -> fp32 logits after the vocab limit, repetition penalty, temperature, top-k and top-p.

    Removed tokens are -inf. With temperature 0 only the limit and the penalty are applied.
    seen_ids: (B, V) bool mask of tokens seen so far, or (B, S) integer ids (negative entries ignored).
    """
    logits = logits.float().clone()  # (B, V)
    V = logits.shape[-1]
    if vocab_limit is not None and vocab_limit < V:
        logits[:, vocab_limit:] = -math.inf
    if params.repetition_penalty != 1.0 and seen_ids is not None:
        seen = seen_ids if seen_ids.dtype == torch.bool else seen_mask(seen_ids, V)  # (B, V)
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < V:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the better tokens
        drop = mass_before >= params.top_p  # keeps the smallest prefix reaching top_p, and always the best token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -math.inf))
    return logits


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen_ids: torch.Tensor | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Pick the next token of each row: logits (B, V) -> ids (B,) int64. See process_logits for the steps."""
    logits = process_logits(logits, params, seen_ids, vocab_limit)
    if params.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- the decode loop ----------------------------------------------------------------------------------------
def _decode_step(model: nn.Module, ids, slot_mask, position_ids, cache_pos) -> torch.Tensor:
    """One token per row: ids (B, 1) -> logits (B, V) of the next token."""
    return model(ids, attention_mask=slot_mask, position_ids=position_ids, cache_pos=cache_pos)[:, -1]


def _make_step(model: nn.Module, device: torch.device, compile: bool):
    """The decode step, under torch.compile with CUDA graphs ("reduce-overhead") when `compile` and on CUDA.

    Elsewhere `compile` is ignored with a warning: on the CPU, tracing the fp32 grouped-mm expert kernel fails
    (its meta function only accepts bf16), and CUDA graphs are what the flag is for.
    """
    if not compile:
        return lambda *args: _decode_step(model, *args)
    if device.type != "cuda":
        warnings.warn(f"compile=True only applies on CUDA; decoding on {device.type} runs eagerly", stacklevel=3)
        return lambda *args: _decode_step(model, *args)
    step = torch.compile(_decode_step, mode="reduce-overhead", dynamic=False)

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return step(model, *args).clone()  # the graph's output buffer is reused by the next replay

    return run


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or not p:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids that are not ints in [0, {vocab_size}): {bad[:5]}")


def check_request(cfg, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
    """ValueError when the prompts are malformed or do not fit in the model's context with max_new_tokens."""
    _check_prompts(prompts, cfg.vocab_size)
    params.validate()
    P = max(len(p) for p in prompts)
    needed = P + params.max_new_tokens
    if needed > cfg.max_seq_len:
        raise ValueError(
            f"longest prompt ({P} tokens) + max_new_tokens ({params.max_new_tokens}) = {needed} exceeds the "
            f"model's max_seq_len {cfg.max_seq_len}"
        )


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _setup_cache(model: nn.Module, batch: int, max_len: int, device: torch.device) -> None:
    """Reuse the model's KV cache when it already has this shape (so compiled decode graphs stay valid).

    Stale entries are harmless: a slot is written before the mask lets any query see it.
    """
    dtype = next(model.parameters()).dtype
    caches = [m for m in model.modules() if isinstance(m, KVCache)]
    if caches and all(c.k.shape[0] == batch and c.k.shape[2] == max_len and c.k.device == device
                      and c.k.dtype == dtype for c in caches):
        return
    model.setup_cache(batch, max_len, dtype=dtype, device=device)


def _decode_loop(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    vocab_limit: int | None = None,
    compile: bool = False,
    cache_len: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (ids (B,), live (B,) bool) per step; `live` is False for rows already finished before this token
    or ending on it with a stop id. Ends when every row has stopped or after max_new_tokens steps."""
    cfg = model.config
    check_request(cfg, prompts, params)
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    needed = P + params.max_new_tokens
    max_len = needed if cache_len is None else cache_len
    if not needed <= max_len <= cfg.max_seq_len:
        raise ValueError(
            f"cache_len {cache_len} must be at least longest prompt + max_new_tokens ({needed}) and at most "
            f"max_seq_len {cfg.max_seq_len}"
        )
    limit = min(cfg.vocab_size, REAL_VOCAB_SIZE) if vocab_limit is None else vocab_limit
    if limit < 1:
        raise ValueError(f"vocab_limit must be >= 1, got {vocab_limit}")
    device = _model_device(model)
    unused = torch.tensor([i for i in UNUSED_IDS if i < limit], dtype=torch.long, device=device)

    tokens = torch.zeros(B, P, dtype=torch.long)  # (B, P) left padded with id 0 (masked out)
    slot_mask = torch.zeros(B, max_len, dtype=torch.long)  # (B, Tmax) 1 = a real token is in this cache slot
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p)
        slot_mask[i, P - len(p):P] = 1
    tokens, slot_mask = tokens.to(device), slot_mask.to(device)
    position_ids = (slot_mask[:, :P].cumsum(-1) - 1).clamp_min(0)  # (B, P) counted over real tokens
    next_pos = torch.tensor(lengths, device=device)[:, None]  # (B, 1) position of each row's next token
    stop_ids = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    seen = seen_mask(torch.where(slot_mask[:, :P].bool(), tokens, -1), cfg.vocab_size)  # (B, V)
    generator = make_generator(params, device)

    _setup_cache(model, B, max_len, device)
    step = _make_step(model, device, compile)
    slots = torch.arange(P, device=device)
    logits = model(tokens, attention_mask=slot_mask, position_ids=position_ids, cache_pos=slots)[:, -1]  # (B, V)
    if bool(torch.isnan(logits).any()):  # once, after the prefill: NaN weights would crash the sampler's draw
        raise ValueError("the model produced NaN logits for the prompt: its weights or activations hold non-finite "
                         "values (check the checkpoint, or use fp32/bf16)")
    live = torch.ones(B, dtype=torch.bool, device=device)
    for t in range(params.max_new_tokens):
        if len(unused):
            logits = logits.index_fill(1, unused, -math.inf)
        ids = sample_next(logits, params, generator, seen, limit)  # (B,)
        live = live & ~torch.isin(ids, stop_ids)
        yield ids, live
        if t == params.max_new_tokens - 1 or not bool(live.any()):
            return
        seen.scatter_(1, ids[:, None], True)
        slot = P + t
        slot_mask[:, slot] = 1
        logits = step(ids[:, None], slot_mask, next_pos, torch.tensor([slot], device=device))
        next_pos = next_pos + 1


@torch.inference_mode()  # on a generator: entered around each step only, so the caller's code is unaffected
def _in_eval_mode(model: nn.Module, loop: Iterator) -> Iterator:
    """Run `loop` under inference_mode with the model in eval mode, restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield from loop
    finally:
        model.train(was_training)


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    vocab_limit: int | None = None,
    compile: bool = False,
    cache_len: int | None = None,
) -> list[list[int]]:
    """Generate for a batch of token-id prompts of any lengths; returns the new ids of each prompt.

    Prompts are left padded into one batch: one prefill, then one token per step through the KV cache of
    `cache_len` slots (default longest prompt + max_new_tokens; the cache stays allocated afterwards and is reused
    by a call with the same batch size and cache_len: keep cache_len fixed with `compile`). A row ends on
    one of params.stop_ids (not included in its output) or after max_new_tokens; finished rows keep being computed
    but their tokens are dropped, and the loop ends as soon as every row has finished. params.stop_strings are
    not applied here (they need text: see stream_text). vocab_limit: ids at or above it, and UNUSED_IDS, are
    never sampled (default: min(model vocab, 100280)). compile: on CUDA, run the decode step under
    torch.compile with CUDA graphs (elsewhere it is ignored with a warning).
    """
    params = params or SamplingParams()
    out: list[list[int]] = [[] for _ in prompts]
    loop = _decode_loop(model, prompts, params, vocab_limit, compile, cache_len)
    for ids, live in _in_eval_mode(model, loop):
        for i, (tok, ok) in enumerate(zip(ids.tolist(), live.tolist())):
            if ok:
                out[i].append(tok)
    return out


def stream_ids(
    model: nn.Module,
    prompt: Sequence[int],
    params: SamplingParams | None = None,
    vocab_limit: int | None = None,
    compile: bool = False,
    cache_len: int | None = None,
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (the stop id is not yielded; see generate_ids)."""
    params = params or SamplingParams()
    loop = _decode_loop(model, [prompt], params, vocab_limit, compile, cache_len)
    for ids, live in _in_eval_mode(model, loop):
        if not live[0]:
            return
        yield int(ids[0])


# ---- text ---------------------------------------------------------------------------------------------------
def encode_prompt(tokenizer, prompt: str | Sequence[Mapping[str, str]], chat: bool = False,
                  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """A string (plain, or one user turn when `chat`) or a list of chat messages -> prompt ids.

    system_prompt: used by the chat template when the messages have no system message (None: no system turn).
    """
    if isinstance(prompt, str):
        if not chat:
            return tokenizer.encode(prompt)
        prompt = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                         system_prompt=system_prompt)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def stream_pieces(tokens: Iterable[int], tokenizer, stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Token ids -> non-empty text pieces made only of whole characters, ending before the first stop string.

    Text that could be the start of a stop string is held back until the next tokens settle it. Stopping
    closes the token iterator (which ends generation).
    """
    from .tokenizer import StreamDecoder

    decoder = StreamDecoder(tokenizer)
    pending = ""
    tokens = iter(tokens)
    try:
        for tok in tokens:
            pending += decoder.push(tok)
            hits = [i for i in (pending.find(s) for s in stop_strings) if i >= 0]
            if hits:
                if min(hits):
                    yield pending[: min(hits)]
                return
            keep = _stop_prefix_len(pending, stop_strings)
            if len(pending) > keep:
                yield pending[: len(pending) - keep]
                pending = pending[len(pending) - keep:]
        pending += decoder.flush()
        hits = [i for i in (pending.find(s) for s in stop_strings) if i >= 0]
        pending = pending[: min(hits)] if hits else pending
        if pending:
            yield pending
    finally:
        if hasattr(tokens, "close"):
            tokens.close()


def stream_text(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[Mapping[str, str]],
    params: SamplingParams | None = None,
    chat: bool = False,
    compile: bool = False,
    cache_len: int | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> Iterator[str]:
    """Yield the reply's text as it is produced: whole UTF-8 characters only, ending before any stop string.

    `prompt` is text, or a list of {"role", "content"} messages rendered with the chat template (as is a string
    when `chat`; `system_prompt` as in encode_prompt). Ids the tokenizer cannot decode (padding rows) are never
    sampled. compile, cache_len: see generate_ids.
    """
    params = params or SamplingParams()
    ids = encode_prompt(tokenizer, prompt, chat, system_prompt)
    check_request(model.config, [ids], params)  # now, not at the first next(): callers may print the prompt after
    limit = min(model.config.vocab_size, getattr(tokenizer, "n_words", REAL_VOCAB_SIZE))
    return stream_pieces(stream_ids(model, ids, params, limit, compile, cache_len), tokenizer, params.stop_strings)


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[Mapping[str, str]],
    params: SamplingParams | None = None,
    chat: bool = False,
    compile: bool = False,
    cache_len: int | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """The whole reply as one string (see stream_text)."""
    return "".join(stream_text(model, tokenizer, prompt, params, chat, compile, cache_len, system_prompt))


__all__ = [
    "SamplingParams", "process_logits", "sample_next", "make_generator", "seen_mask", "generate_ids",
    "stream_ids", "stream_text", "generate_text", "stream_pieces", "encode_prompt", "DBRX_STOP_IDS",
    "REAL_VOCAB_SIZE", "UNUSED_IDS",
]
