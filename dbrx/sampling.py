"""How to pick tokens: `SamplingParams`, shared by the serving engine (which samples) and its clients
(dbrx.generate, the HTTP API, the CLI).

Imports: dbrx.tokens only (the engine and generation import this module, so it must not import them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .tokens import STOP_IDS


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (top_k, top_p and seed are then unused).

    repetition_penalty follows transformers: logits of tokens already seen (prompt included) are divided by the
    penalty when positive, multiplied by it when negative. seed None uses torch's global generator. A stop id
    ends a sequence and is not part of its output; stop strings apply to the text (dbrx.generate.stream_text and
    the HTTP API cut the text before the first one).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = STOP_IDS  # <|endoftext|>, <|im_end|>
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


__all__ = ["SamplingParams"]
