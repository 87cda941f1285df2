"""GGUF export for llama.cpp: a Hugging Face-format DBRX checkpoint -> one `.gguf` file (f32, f16, q8_0 or q4_0).

The file follows llama.cpp's own DBRX conversion (architecture `dbrx`), so llama.cpp and the tools built on it
load it as they load a converted databricks/dbrx-instruct:

- tensors (names from the `gguf` package's DBRX table; shapes in numpy order, ggml's `ne` is the reverse):
  token_embd (V, D) · blk.i.attn_norm (D,) · blk.i.attn_qkv (D + 2*kvH*hd, D), kept fused · blk.i.attn_output
  (D, D) · blk.i.attn_output_norm (D,) · blk.i.ffn_gate_inp (E, D) · blk.i.ffn_gate_exps = w1 (E, F, D) ·
  blk.i.ffn_up_exps = v1 (E, F, D) · blk.i.ffn_down_exps = w2 transposed per expert (E, D, F) · output_norm (D,)
  · output (V, D). ggml's matmul contracts each weight's last numpy axis, so every weight is stored
  (out, in): w1/v1 as they are, w2 (which we apply as h @ w2[e]) transposed.
- types: the norms (1-D) f32; the router f32 always (tiny, and it picks the experts: llama.cpp's generic rule
  keeps ffn_gate_inp in f32 and llama-quantize never quantizes it; llama.cpp's DBRX converter writes it f16 in
  an f16 file); every other matrix in the chosen type (f32: the checkpoint's values exactly), except the output
  head of a q4_0 file, which is q8_0 (llama-quantize gives the head a higher-precision type too; it uses q6_K,
  which the `gguf` package cannot write). q8_0/q4_0 quantize rows (the last numpy axis: D, or F for
  ffn_down_exps) in blocks of 32; a matrix whose rows are not a multiple of 32 (the demo preset's ffn_down_exps,
  F = 112) is written f16 instead, as llama.cpp's own converter falls back, and export_gguf reports it.
- metadata: dbrx.{context_length, embedding_length, feed_forward_length, block_count, attention.head_count,
  attention.head_count_kv, rope.freq_base, attention.clamp_kqv, expert_count, expert_used_count,
  attention.layer_norm_epsilon = 1e-5}; general.{architecture, type, name, file_type, quantization_version};
  clip_qkv None is written as a clamp that never binds (llama.cpp requires the key).
- tokenizer: `gpt2` (byte-level BPE) with pre-tokenizer `dbrx` (cl100k's split pattern); one token string per
  row of the padded vocabulary in GPT-2's byte-to-unicode form, special tokens as CONTROL, ids that are no
  token as UNUSED `[PAD{id}]`; BPE merges rebuilt from tiktoken's ranks (for each token, BPE over its bytes
  with only lower ranks leaves exactly two parts: that pair is its merge, ranked by the token's rank);
  bos = eos = unk = <|endoftext|>, pad = <|pad|>, no bos/eos added; DBRX Instruct's chat template as jinja.

Tensors are read one at a time from the memory-mapped checkpoint (dbrx.hf_checkpoint.read_checkpoint) and
converted one expert at a time; the file is written beside OUT and moved into place only once complete.

Imports: fsutil, hf_checkpoint, tokenizer, tokens (and the `gguf` package: `pip install -e ".[gguf]"`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .fsutil import fsync_path
from .hf_checkpoint import HF_NO_CLIP, _expected_shapes, read_checkpoint
from .tokenizer import DEFAULT_SYSTEM_PROMPT, get_tokenizer
from .tokens import IM_END, IM_START, REAL_VOCAB_SIZE, SPECIAL_TOKENS, UNUSED_IDS

try:
    import gguf
except ImportError:
    raise ImportError('GGUF export needs the `gguf` package: pip install -e ".[gguf]"') from None

TYPES = ("f32", "f16", "q8_0", "q4_0")
LAYER_NORM_EPS = 1e-5  # DBRX's LayerNorms (torch's default eps)
Q = gguf.GGMLQuantizationType
_WEIGHT_TYPE = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
_HEAD_TYPE = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q8_0}
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
F16_MAX = float(np.finfo(np.float16).max)


# ---- tokenizer ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def byte_chars() -> tuple[str, ...]:
    """GPT-2's byte -> character table of byte-level BPE vocabularies: printable Latin-1 bytes stand for
    themselves, the other 68 bytes (controls, space, ...) map in order to U+0100, U+0101, ..."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + extra))
            extra += 1
    return tuple(out)


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's BPE over `token`'s bytes using only merges ranked below `max_rank` (leftmost lowest first)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    none = max_rank  # "no merge": not below max_rank
    pair = [ranks.get(parts[i] + parts[i + 1], none) for i in range(len(parts) - 1)]
    while pair:
        best = min(pair)
        if best >= max_rank:
            break
        i = pair.index(best)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair[i]
        if i < len(pair):
            pair[i] = ranks.get(parts[i] + parts[i + 1], none)
        if i > 0:
            pair[i - 1] = ranks.get(parts[i - 1] + parts[i], none)
    return parts


@functools.lru_cache(maxsize=1)
def cl100k_tables() -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """(the bytes of each mergeable token, by id = rank; the BPE merges as "left right" in byte-level form, in
    rank order). A few seconds, once per process."""
    special = set(SPECIAL_TOKENS.values())
    n = min(i for i in range(REAL_VOCAB_SIZE + 1) if i in special or i in UNUSED_IDS or i == REAL_VOCAB_SIZE)
    token_bytes = tuple(get_tokenizer().enc.decode_tokens_bytes(list(range(n))))
    ranks = {b: i for i, b in enumerate(token_bytes)}
    chars = byte_chars()
    merges = []
    for rank, tb in enumerate(token_bytes):
        if len(tb) < 2:
            continue
        parts = _bpe_parts(tb, ranks, rank)
        if len(parts) != 2:  # cannot happen for cl100k (every token is reachable), kept as an invariant
            raise AssertionError(f"token {rank} {tb!r} is not one merge of lower-ranked tokens: {parts}")
        merges.append(" ".join("".join(chars[b] for b in p) for p in parts))
    return token_bytes, tuple(merges)


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < REAL_VOCAB_SIZE:
        raise ValueError(f"the GGUF vocabulary is cl100k's with DBRX's special tokens (ids up to "
                         f"{REAL_VOCAB_SIZE - 1}); this model's vocab_size is only {vocab_size}")


@functools.lru_cache(maxsize=2)
def vocabulary(vocab_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Token strings (byte-level form) and GGUF token types for ids 0 .. vocab_size - 1."""
    _check_vocab_size(vocab_size)
    token_bytes, _ = cl100k_tables()
    chars = byte_chars()
    specials = {i: s for s, i in SPECIAL_TOKENS.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i < len(token_bytes):
            tokens.append("".join(chars[b] for b in token_bytes[i]))
            types.append(int(gguf.TokenType.NORMAL))
        elif i in specials:
            tokens.append(specials[i])
            types.append(int(gguf.TokenType.CONTROL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    return tuple(tokens), tuple(types)


def _jinja_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def chat_template() -> str:
    """DBRX Instruct's chat format as a jinja template (what dbrx.tokenizer.Tokenizer.apply_chat_template renders):
    a leading system message, or else the default system prompt, then ChatML turns joined by newlines."""
    start, end = IM_START, IM_END
    return (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        f"{{%- set system_message = {_jinja_string(DEFAULT_SYSTEM_PROMPT)} -%}}{{%- set loop_messages = messages -%}}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if loop.first -%}"
        f"{{{{- '{start}system\\n' + (system_message | trim) + '{end}\\n' -}}}}"
        "{%- else -%}{{- '\\n' -}}{%- endif -%}"
        f"{{{{- '{start}' + message['role'] + '\\n' + message['content'] + '{end}' -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '\\n{start}assistant\\n' -}}}}{{%- endif -%}}"
    )


# ---- tensors --------------------------------------------------------------------------------------------------
def tensor_type(gguf_name: str, ndim: int, qtype: str, row: int | None = None) -> gguf.GGMLQuantizationType:
    """The GGML type a tensor is stored in (see the module docstring); `row`: the length of its rows (the last
    numpy axis), for the f16 fallback of rows that do not fit the quantization blocks."""
    if ndim == 1 or ".ffn_gate_inp." in gguf_name:
        return Q.F32
    t = _HEAD_TYPE[qtype] if gguf_name == "output.weight" else _WEIGHT_TYPE[qtype]
    return Q.F16 if row is not None and row % gguf.GGML_QUANT_SIZES[t][0] else t


def _plan(cfg, qtype: str) -> list[tuple[str, str, tuple[int, ...], gguf.GGMLQuantizationType]]:
    """(our name, GGUF name, numpy shape in the file, type) for every tensor, in the order the checkpoint is read."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DBRX, cfg.n_layers)
    plan = []
    for ours, shape in _expected_shapes(cfg).items():
        name = names.get_name(ours, try_suffixes=(".weight",))
        assert name is not None, ours
        name = name if name.endswith(".weight") else name + ".weight"  # the experts have no suffix in HF
        if name.endswith(".ffn_down_exps.weight"):
            shape = (shape[0], shape[2], shape[1])  # (E, F, D) -> (E, D, F): each expert stored (out, in)
        plan.append((ours, name, tuple(shape), tensor_type(name, len(shape), qtype, shape[-1])))
    return plan


def _encode(x: np.ndarray, ggml_type, name: str) -> np.ndarray:
    """fp32 array -> the file's bytes for it (as an f32 / f16 / uint8 block array)."""
    if ggml_type == Q.F16:
        amax = float(np.abs(x).max(initial=0.0))
        if amax > F16_MAX:
            raise ValueError(f"tensor {name} holds values up to {amax:g}, beyond float16's range; it cannot be "
                             f"stored in float16 (try --type f32)")
    return gguf.quants.quantize(x, ggml_type)


def _convert(t: torch.Tensor, name: str, ggml_type) -> np.ndarray:
    """Our tensor -> the file's array, one expert at a time for the (E, F, D) experts (w2 transposed)."""
    if t.dim() < 3:
        return _encode(t.float().numpy(), ggml_type, name)
    out = None
    for e in range(t.shape[0]):
        x = t[e].T if name.endswith(".ffn_down_exps.weight") else t[e]  # (D, F) or (F, D)
        q = _encode(x.float().contiguous().numpy(), ggml_type, name)
        if out is None:
            out = np.empty((t.shape[0], *q.shape), dtype=q.dtype)
        out[e] = q
    return out


def _check_config(cfg) -> None:
    """ValueError when llama.cpp's DBRX would not run this model as we do (or the vocabulary is not DBRX's)."""
    _check_vocab_size(cfg.vocab_size)
    p = cfg.ffn_config.moe_normalize_expert_weights
    if p != 1.0:
        raise ValueError(f"llama.cpp's DBRX graph divides the top-k expert weights by their sum "
                         f"(moe_normalize_expert_weights = 1); this model has {p}, so llama.cpp would compute "
                         f"something else")


def _write_metadata(w: gguf.GGUFWriter, cfg, qtype: str, name: str) -> None:
    a, f = cfg.attn_config, cfg.ffn_config
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(f.ffn_hidden_size)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(a.kv_n_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_clamp_kqv(a.clip_qkv if a.clip_qkv is not None else HF_NO_CLIP)
    w.add_expert_count(f.moe_num_experts)
    w.add_expert_used_count(f.moe_top_k)
    w.add_layer_norm_eps(LAYER_NORM_EPS)

    tok = get_tokenizer()
    tokens, types = vocabulary(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("dbrx")
    # the long arrays with their element type given: the writer then skips checking each element's type
    array, keys = gguf.GGUFValueType.ARRAY, gguf.Keys.Tokenizer
    w.add_key_value(keys.LIST, tokens, array, sub_type=gguf.GGUFValueType.STRING)
    w.add_key_value(keys.TOKEN_TYPE, types, array, sub_type=gguf.GGUFValueType.INT32)
    w.add_key_value(keys.MERGES, cl100k_tables()[1], array, sub_type=gguf.GGUFValueType.STRING)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.unk_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template())


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, qtype: str = "f16", name: str | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """Write checkpoint directory `src` as the GGUF file `out` (replaced only once the new file is complete).

    qtype: 'f32', 'f16', 'q8_0' or 'q4_0'. name: `general.name` (default: the checkpoint directory's name).
    Returns {'tensors', 'bytes', 'seconds', 'f16_fallback'}: the last lists the GGUF names of the matrices of a
    q8_0 / q4_0 file written f16 because their rows are not a multiple of the block size 32 (llama.cpp's
    converter falls back the same way). One-line errors: ValueError for an unknown type, a checkpoint that is not
    a valid DBRX checkpoint (dbrx.hf_checkpoint's checks), a vocabulary that is not DBRX's, a model llama.cpp
    would run differently, or values beyond float16's range in an f16 tensor; FileNotFoundError for a missing
    checkpoint (or its config.json) or output directory.
    """
    if qtype not in TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a directory; give the path of the .gguf file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: directory not found (for {out.name})")
    start = time.perf_counter()
    with read_checkpoint(src) as (cfg, tensors):
        _check_config(cfg)
        plan = _plan(cfg, qtype)
        if progress:
            progress(f"building the vocabulary ({cfg.vocab_size} tokens, merges from cl100k's ranks) ...")
        cl100k_tables()
        tmp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as for OUT
        try:
            writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DBRX])
            try:
                _write_metadata(writer, cfg, qtype, name or Path(src).resolve().name)
                for _, gname, shape, ggml_type in plan:
                    nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, ggml_type)))  # f16/f32 too
                    writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=ggml_type)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                done = 0
                for (ours, gname, shape, ggml_type), (read_name, t) in zip(plan, tensors):
                    assert read_name == ours, (read_name, ours)  # the plan follows the checkpoint's read order
                    data = _convert(t, gname, ggml_type)
                    del t
                    writer.write_tensor_data(data)
                    done += 1
                    if progress:
                        dims = ", ".join(map(str, reversed(shape)))
                        progress(f"[{done}/{len(plan)}] {gname} {ggml_type.name} {{{dims}}}")
                assert done == len(plan), (done, len(plan))
            finally:
                writer.close()
            fsync_path(tmp)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    fsync_path(out.parent)
    fallback = [g for _, g, _, t in plan if t == Q.F16 and _WEIGHT_TYPE[qtype] != Q.F16]
    return {"tensors": len(plan), "bytes": out.stat().st_size, "seconds": time.perf_counter() - start,
            "f16_fallback": fallback}


__all__ = ["export_gguf", "TYPES", "byte_chars", "chat_template", "cl100k_tables", "tensor_type", "vocabulary"]
