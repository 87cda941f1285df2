"""Text generation for Python callers, the CLI and the trainer: a client of the serving engine.

There is one generation path. Each call builds a `dbrx.serve.engine.Engine` sized for that call (KV blocks for
every prompt + max_new_tokens, block-rounded, so no request ever waits or is preempted), adds one request per
prompt and steps the engine until every request has finished, collecting or streaming its outputs.
  generate_ids     a batch of prompts (any lengths) -> new ids per prompt
  stream_ids       one prompt -> an iterator of new ids
  stream_text      text or chat messages -> an iterator of text pieces (whole UTF-8 characters, stop strings cut)
  generate_text    the joined text of stream_text

Output conventions: the stop id that ends a sequence is not included in its output, and a stop string is not
included in the text (generation ends at its first occurrence). Ids at or above `vocab_limit` (the padding rows
of DBRX's 100352-row head: real ids are < REAL_VOCAB_SIZE) are never sampled, nor are the ids below it that are
no token (`UNUSED_IDS`). Seeds: row i of a batch draws from its own generator seeded with `seed + i`, so it gets
the tokens that prompt would get alone with that seed, whatever else is in the batch.

Imports: dbrx.sampling, dbrx.serve.engine, dbrx.tokenizer, dbrx.tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from .sampling import SamplingParams
from .serve.engine import Engine, EngineConfig, RequestOutput
from .tokenizer import DEFAULT_SYSTEM_PROMPT
from .tokens import REAL_VOCAB_SIZE

BLOCK_SIZE = 16  # tokens per KV block of the per-call engine
MAX_BATCHED_TOKENS = 2048  # tokens per engine step at most (more prompt tokens are prefilled in chunks)


# ---- token ids ----------------------------------------------------------------------------------------------
def _check_prompts(cfg, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
    """ValueError when the prompts are not a non-empty list of non-empty id lists, or do not fit in the model's
    context with max_new_tokens (checked before any KV memory is sized from them). The engine checks the ids."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or isinstance(prompts, str) \
            or not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or not p:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids")
    params.validate()
    P = max(len(p) for p in prompts)
    if P + params.max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"longest prompt ({P} tokens) + max_new_tokens ({params.max_new_tokens}) = {P + params.max_new_tokens} "
            f"exceeds the model's max_seq_len {cfg.max_seq_len}"
        )


def _start(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams,
           vocab_limit: int | None) -> Engine:
    """An engine sized for these prompts with one request per prompt queued (request id = the prompt's index).

    Every request runs from the first step: seats for all, and KV blocks for each prompt + max_new_tokens.
    """
    _check_prompts(model.config, prompts, params)
    lengths = [len(p) for p in prompts]
    blocks = 1 + sum(-(-(n + params.max_new_tokens) // BLOCK_SIZE) for n in lengths)  # + the null block
    config = EngineConfig(block_size=BLOCK_SIZE, num_blocks=blocks, max_num_seqs=len(prompts),
                          max_num_batched_tokens=max(len(prompts), min(sum(lengths), MAX_BATCHED_TOKENS)),
                          max_waiting=len(prompts), vocab_limit=vocab_limit)
    was_training = model.training
    try:
        engine = Engine(model, config)  # (sets eval mode: _outputs does that while it runs)
    finally:
        model.train(was_training)
    for i, p in enumerate(prompts):
        row = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
        try:
            engine.add_request(str(i), p, row)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
    return engine


def _nan_guard(model: nn.Module):
    """A hook on the head that raises ValueError if the first logits computed hold a NaN (NaN weights would
    otherwise yield garbage tokens); it removes itself after that one check (one host sync per call)."""
    head = getattr(model, "lm_head", None)
    if head is None:
        return None

    def check(module, args, logits):
        if logits.numel():  # (a step of prefill chunks only computes no logits)
            handle.remove()
            if bool(torch.isnan(logits).any()):
                raise ValueError("the model produced NaN logits for the prompt: its weights or activations hold "
                                 "non-finite values (check the checkpoint, or use fp32/bf16)")

    handle = head.register_forward_hook(check)
    return handle


def _outputs(model: nn.Module, engine: Engine) -> Iterator[RequestOutput]:
    """Step the engine until every request has finished, yielding its outputs; the model is in eval mode meanwhile
    (its mode is restored at the end, also when the caller stops early). Each step runs under inference_mode."""
    was_training = model.training
    model.eval()
    guard = _nan_guard(model)
    try:
        while engine.has_unfinished():
            yield from engine.step()
    finally:
        if guard is not None:
            guard.remove()
        model.train(was_training)


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Generate for a batch of token-id prompts of any lengths; returns the new ids of each prompt.

    A row ends on one of params.stop_ids (not included in its output) or after max_new_tokens; a finished row
    leaves the batch at once. params.stop_strings are not applied here (they need text: see stream_text).
    vocab_limit: ids at or above it, and UNUSED_IDS, are never sampled (default: min(model vocab, REAL_VOCAB_SIZE)).
    With a seed, row i uses seed + i.
    """
    params = params or SamplingParams()
    engine = _start(model, prompts, params, vocab_limit)
    out: list[list[int]] = [[] for _ in prompts]
    for o in _outputs(model, engine):
        out[int(o.request_id)] += o.new_token_ids
    return out


def stream_ids(
    model: nn.Module,
    prompt: Sequence[int],
    params: SamplingParams | None = None,
    vocab_limit: int | None = None,
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (the stop id is not yielded; see generate_ids).

    The request is checked now (ValueError), not at the first next()."""
    params = params or SamplingParams()
    engine = _start(model, [prompt], params, vocab_limit)

    def ids() -> Iterator[int]:
        for o in _outputs(model, engine):
            yield from o.new_token_ids

    return ids()


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
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> Iterator[str]:
    """Yield the reply's text as it is produced: whole UTF-8 characters only, ending before any stop string.

    `prompt` is text, or a list of {"role", "content"} messages rendered with the chat template (as is a string
    when `chat`; `system_prompt` as in encode_prompt). Ids the tokenizer cannot decode (padding rows) are never
    sampled. The request is checked now (ValueError), not at the first next(): callers may print the prompt after.
    """
    params = params or SamplingParams()
    ids = encode_prompt(tokenizer, prompt, chat, system_prompt)
    limit = min(model.config.vocab_size, getattr(tokenizer, "n_words", REAL_VOCAB_SIZE))
    return stream_pieces(stream_ids(model, ids, params, limit), tokenizer, params.stop_strings)


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[Mapping[str, str]],
    params: SamplingParams | None = None,
    chat: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """The whole reply as one string (see stream_text)."""
    return "".join(stream_text(model, tokenizer, prompt, params, chat, system_prompt))


__all__ = ["generate_ids", "stream_ids", "stream_text", "generate_text", "stream_pieces", "encode_prompt"]
