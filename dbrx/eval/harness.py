"""lm-evaluation-harness adapter: any lm-eval task on a dbrx model.

`DbrxLM` is an lm-eval `LM` registered as model ``"dbrx"``; importing this module registers it, after which lm-eval's
Python API takes it by name::

    import dbrx.eval.harness  # noqa: F401  (registers "dbrx")
    lm_eval.simple_evaluate(model="dbrx", model_args="pretrained=DIR,dtype=fp32", tasks=[...])

or as an object (`simple_evaluate(model=DbrxLM(model=model), ...)`, e.g. a model in training). `run_lm_eval` is the
one call behind ``dbrx eval --harness lm-eval``. Tasks with local data files (lm-eval's ``dataset_path: json`` and
``dataset_kwargs: {data_files: ...}``) run offline.

The adapter tokenizes with the project's cl100k tokenizer (special-token text is a special token, as a transformers
tokenizer reads it), splits context and continuation as lm-eval's `TemplateLM` does, and scores through
`dbrx.eval.scoring`: batched log-likelihoods (sorted by length, right-padded, shared contexts run once) over the
model's whole head (as lm-eval's ``hf`` model computes them), rolling windows for perplexity, and generation through
the serving engine (which, unlike ``hf``, never picks a padding row of the head or an id that is no token).
`transformers_tokenizer` builds the same tokenizer as a transformers object, so that lm-eval's ``hf`` model can run
the same checkpoint for comparison.

Imports: lm_eval, dbrx.eval.scoring, dbrx.model, dbrx.devices, dbrx.tokenizer, dbrx.tokens; transformers only in
`transformers_tokenizer`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from dbrx.eval.scoring import GenerationRequest, generate_until, loglikelihood, rolling_loglikelihood
from dbrx.tokens import EOS_ID, IM_END

logger = logging.getLogger(__name__)


def _positive_int(name: str, value, default: int) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default  # lm-eval's "auto" batch size: ours is bounded by batch_tokens instead
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise ValueError(f"{name} must be a positive integer (or 'auto'), got {value!r}")
    return n


@register_model("dbrx")
class DbrxLM(TemplateLM):
    """lm-eval model ``dbrx``: a dbrx checkpoint directory (``pretrained``) or a loaded `DbrxForCausalLM` (``model``).
    ``adapter=DIR`` (with ``pretrained``): a PEFT LoRA adapter applied unmerged (model_args "pretrained=A,adapter=B").

    batch_size: rows per scoring batch at most ("auto": 64); batch_tokens: padded tokens per scoring batch at most;
    max_num_seqs: requests generated together by the engine; max_gen_toks: the default generation length (as hf)."""

    def __init__(self, pretrained: str | os.PathLike | None = None, model: torch.nn.Module | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, batch_tokens: int = 4096, max_gen_toks: int = 256,
                 max_num_seqs: int = 32, allow_nonfinite: bool = False, tokenizer=None,
                 adapter: str | os.PathLike | None = None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"dbrx model: unknown argument(s) {sorted(kwargs)}")
        if (pretrained is None) == (model is None):
            raise ValueError("dbrx model: give exactly one of pretrained=DIR (a checkpoint) or model=OBJECT")
        if adapter is not None and model is not None:
            raise ValueError("dbrx model: adapter=DIR applies to pretrained=DIR (a loaded model already has its own)")
        if model is None:
            from dbrx.loading import load_pretrained

            if not Path(pretrained).is_dir():
                raise ValueError(f"dbrx model: pretrained={pretrained} is not a checkpoint directory")
            model = load_pretrained(pretrained, device=device, dtype=dtype,  # float or quantized
                                    allow_nonfinite=bool(allow_nonfinite), adapter=adapter or None)
        if tokenizer is None:
            from dbrx.tokenizer import get_tokenizer

            tokenizer = get_tokenizer()
        self._model = model.eval()
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = _positive_int("batch_size", batch_size, 64)
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, _positive_int("max_batch_size", max_batch_size, self.batch_size))
        self.batch_tokens = _positive_int("batch_tokens", batch_tokens, 4096)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks, 256)
        self.max_num_seqs = _positive_int("max_num_seqs", max_num_seqs, 32)
        self._warned = False

    # ---- what TemplateLM needs --------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def max_length(self) -> int:
        return self._model.config.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "dbrx-cl100k_base"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string` (never a bos token: DBRX has none); special-token text becomes the special id."""
        return self.tokenizer.encode(string, allow_special=True)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special=True)

    def _bar(self, total: int, disable: bool, desc: str) -> tqdm:
        return tqdm(total=total, disable=disable or self.rank != 0, desc=desc)

    # ---- requests ---------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log-prob, is greedy)."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        with self._bar(len(pairs), disable_tqdm, "Running loglikelihood requests") as bar:
            scores = loglikelihood(self._model, pairs, batch_tokens=self.batch_tokens, max_batch=self.batch_size,
                                   progress=bar.update)
        out = []
        for (key, _, _), s in zip(requests, scores):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-likelihood, every token predicted once from the end-of-text token on (windows of
        max_length tokens, each with as much preceding context as fits)."""
        strings = [req.args[0] for req in requests]
        docs = [self.tok_encode(s) for s in strings]
        with self._bar(len(docs), disable_tqdm, "Running loglikelihood_rolling requests") as bar:
            scores = rolling_loglikelihood(self._model, docs, context_len=1, batch_tokens=self.batch_tokens,
                                           max_batch=self.batch_size)
            bar.update(len(docs))
        out = []
        for s, score in zip(strings, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", (s,), score.logprob)
            out.append(score.logprob)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) generation until a stop string, the end-of-text token or max_gen_toks;
        the context is cut from the left to leave room for max_gen_toks (as lm-eval's hf model does)."""
        eos = self.tokenizer.decode([self.eot_token_id])
        batch = []
        for context, gen_kwargs in (req.args for req in requests):
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            new = kw.pop("max_gen_toks")
            if new >= self.max_length:
                raise ValueError(f"max_gen_toks ({new}) must be less than the model's max_seq_len ({self.max_length})")
            temperature = float(kw.pop("temperature", 1.0)) if kw.pop("do_sample", False) else 0.0
            ignored = sorted(set(kw) - {"temperature", "max_length"})
            if ignored and not self._warned:
                self._warned = True
                logger.warning("dbrx model: generation arguments %s are not supported and are ignored", ignored)
            batch.append(GenerationRequest(self.tok_encode(context), tuple(s for s in until if s), new, temperature))
        with self._bar(len(batch), disable_tqdm, "Running generate_until requests") as bar:
            texts = generate_until(self._model, self.tokenizer, batch, max_num_seqs=self.max_num_seqs,
                                   progress=bar.update)
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    # ---- chat -------------------------------------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """DBRX Instruct's ChatML, with no default system prompt (lm-eval passes its own). Without the generation
        prompt the last (assistant) message stays open, for lm-eval to continue it."""
        text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  system_prompt=None)
        if not add_generation_prompt and text.endswith(IM_END):
            text = text[: -len(IM_END)]
        return text

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "dbrx-chatml" if chat_template else None


# ---- running lm-eval --------------------------------------------------------------------------------------------
def task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None = None):
    """An lm-eval TaskManager that knows `tasks`: only `include_path`'s tasks when they are all there (indexing
    lm-eval's own thousands of task files takes a minute), else those and lm-eval's. ValueError names unknown ones."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"include path {include_path} is not a directory")
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    missing = [t for t in tasks if t not in manager.all_tasks and not manager.match_tasks([t])
               and not Path(t).is_file()]
    if missing:
        where = f"{include_path} or lm-eval's tasks" if include_path is not None else "lm-eval's tasks"
        raise ValueError(f"unknown lm-eval task(s) {missing} (looked in {where})")
    return manager


def run_lm_eval(model_dir: str | os.PathLike, tasks: Sequence[str], include_path: str | os.PathLike | None = None,
                num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 64,
                device: str | None = None, dtype: str | None = None, *, model: torch.nn.Module | None = None,
                log_samples: bool = False, apply_chat_template: bool = False, gen_kwargs: dict | None = None,
                seed: int = 1234, adapter: str | os.PathLike | None = None) -> dict:
    """`lm_eval.simple_evaluate` of the dbrx model in `model_dir` (or the loaded `model`) on `tasks`, with the tasks
    of `include_path` added to lm-eval's. Returns lm-eval's result dict ("results", "configs", "versions",
    "n-shot", "higher_is_better", ..., "samples" with log_samples). adapter: a PEFT LoRA adapter directory applied
    unmerged on top of `model_dir`."""
    from lm_eval import simple_evaluate

    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    manager = task_manager(list(tasks), include_path)
    lm = DbrxLM(pretrained=None if model is not None else model_dir, model=model, device=device, dtype=dtype,
                batch_size=batch_size, adapter=adapter)
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                          log_samples=log_samples, apply_chat_template=apply_chat_template, gen_kwargs=gen_kwargs,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    if out is None:
        raise RuntimeError("lm-eval returned no results")
    return dict(out)


# ---- the same tokenizer for transformers (comparisons with lm-eval's hf model) ----------------------------------
def transformers_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The project's cl100k tokenizer (with DBRX's special tokens at their ids) as a transformers
    `PreTrainedTokenizerFast`, built offline from the bundled BPE file. Converting the BPE ranks to merges takes a
    while; with `cache_dir` the result is kept there as ``tokenizer.json`` (keyed by the BPE file's hash)."""
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    from dbrx.tokenizer import BPE_SHA256, CL100K_PATTERN, SPECIAL_TOKENS, find_bpe_file
    from dbrx.tokens import ENDOFTEXT, PAD

    cached = Path(cache_dir) / f"tokenizer-{BPE_SHA256[:16]}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        backend = Backend.from_file(str(cached))
    else:
        from transformers.convert_slow_tokenizer import TikTokenConverter

        spec = json.loads(TikTokenConverter(vocab_file=str(find_bpe_file()), pattern=CL100K_PATTERN).converted()
                          .to_str())
        spec["model"]["vocab"].update(SPECIAL_TOKENS)  # the special tokens at DBRX's ids, not after the ranks
        spec["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                                 "normalized": False, "special": True} for s, i in SPECIAL_TOKENS.items()]
        text = json.dumps(spec, ensure_ascii=False)
        backend = Backend.from_str(text)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, cached)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=PAD)


__all__ = ["DbrxLM", "run_lm_eval", "task_manager", "transformers_tokenizer"]
