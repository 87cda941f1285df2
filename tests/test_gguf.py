"""GGUF export (dbrx.gguf_export, `dbrx export-gguf`): the file read back field by field and tensor by tensor.

The checks are independent of the exporter: the file is parsed here with `struct` from the GGUF layout (the
`gguf` package's own reader, much slower, cross-checks one file in a slow test); the expected names and ggml
shapes are llama.cpp's DBRX loader table written out; a numpy forward that follows llama.cpp's DBRX graph (ggml
matmul convention, NEOX RoPE, fused QKV with clamp, softmax top-k MoE with the weights divided by their sum)
must give our model's logits; and a small BPE over the exported merges must tokenize like cl100k, including
llama.cpp's own pre-tokenizer check text, whose token-id hash identifies databricks/dbrx-base's tokenizer.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_

gguf = pytest.importorskip("gguf")

from dbrx import DbrxConfig, DbrxForCausalLM  # noqa: E402
from dbrx.cli import main  # noqa: E402
from dbrx.gguf_export import export_gguf  # noqa: E402
from dbrx.tokenizer import CL100K_PATTERN, get_tokenizer  # noqa: E402
from dbrx.tokens import EOS_ID, PAD_ID, PADDED_VOCAB_SIZE, REAL_VOCAB_SIZE, SPECIAL_TOKENS, UNUSED_IDS  # noqa: E402

F32, F16, Q4_0, Q8_0 = 0, 1, 2, 8  # ggml type ids
TYPE_SIZES = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q8_0: (32, 34)}  # (block elements, block bytes)
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q4_0
MATRIX = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
HEAD = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q8_0}

# llama.cpp's convert_hf_to_gguf.py pre-tokenizer check text, and the sha256 of str(token ids) it lists for
# databricks/dbrx-base (-> tokenizer.ggml.pre = "dbrx")
CHK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
            "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
            "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
            "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE "
            "you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
CHK_HASH_DBRX = "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e"


# ---- an independent GGUF parser --------------------------------------------------------------------------------
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def read_gguf(path) -> tuple[dict, dict, dict]:
    """(metadata key -> value, key -> GGUF value type (arrays: (9, element type)), tensor name -> (ggml type,
    ggml dims ne0.., raw bytes)), in file order, straight from the GGUF v3 layout."""
    buf = memoryview(Path(path).read_bytes())
    pos = 0

    def take(fmt: str, n: int = 1):
        nonlocal pos
        vals = struct.unpack_from(f"<{n}{fmt}", buf, pos)
        pos += struct.calcsize(f"<{n}{fmt}")
        return vals if n != 1 else vals[0]

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8")

    def value(t: int):
        if t == STRING:
            return string()
        if t == ARRAY:
            et, n = take("I"), take("Q")
            return list(take(_SCALARS[et], n)) if et in _SCALARS else [value(et) for _ in range(n)]
        return take(_SCALARS[t])

    assert bytes(buf[:4]) == b"GGUF"
    pos = 4
    assert take("I") == 3
    n_tensors, n_kv = take("Q"), take("Q")
    kv, kv_types = {}, {}
    for _ in range(n_kv):
        key, t = string(), take("I")
        if t == ARRAY:
            et = struct.unpack_from("<I", buf, pos)[0]
            kv_types[key] = (ARRAY, et)
        else:
            kv_types[key] = t
        kv[key] = value(t)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        dims = take("Q", n_dims) if n_dims != 1 else (take("Q"),)
        infos.append((name, tuple(dims), take("I"), take("Q")))
    align = kv.get("general.alignment", 32)
    start = -(-pos // align) * align
    tensors = {}
    for name, dims, t, offset in infos:
        block, size = TYPE_SIZES[t]
        nbytes = math.prod(dims) // block * size
        assert offset % align == 0
        tensors[name] = (t, dims, np.frombuffer(buf, np.uint8, nbytes, start + offset))
    return kv, kv_types, tensors


def as_array(raw: np.ndarray, t: int, dims: tuple[int, ...]) -> np.ndarray:
    """The tensor as fp32 in numpy order (dims reversed); quantized types through gguf.quants.dequantize."""
    shape = tuple(reversed(dims))
    if t == F32:
        return raw.view(np.float32).reshape(shape)
    if t == F16:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    block, size = TYPE_SIZES[t]
    rows = raw.reshape(*shape[:-1], shape[-1] // block * size)
    return gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(t))


# ---- fixtures --------------------------------------------------------------------------------------------------
def tiny_full_vocab() -> DbrxConfig:
    """dbrx-tiny (d 64, 2 layers, 8 experts top-2, F 96, 4 heads / 2 KV heads) with DBRX's padded vocabulary."""
    return DbrxConfig.from_preset("dbrx-tiny", max_seq_len=64)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(checkpoint directory, its state dict): random fp32 weights, norms around 1."""
    cfg = tiny_full_vocab()
    assert cfg.vocab_size == PADDED_VOCAB_SIZE
    model = randomize_(DbrxForCausalLM.from_config(cfg, device="cpu"), seed=3)
    path = tmp_path_factory.mktemp("gguf") / "tiny-ckpt"
    model.save_pretrained(path)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def exported(source):
    """qtype -> (path, parsed file). q8_0 goes through the CLI, the other three through the Python API."""
    path, _ = source
    out = {}
    for qtype in ("f32", "f16", "q8_0", "q4_0"):
        f = path.parent / f"tiny-{qtype}.gguf"
        if qtype == "q8_0":
            assert main(["export-gguf", str(path), str(f), "--type", "q8_0"]) == 0
        else:
            report = export_gguf(path, f, qtype)
            assert report["tensors"] == 19 and report["bytes"] == f.stat().st_size
            assert report["f16_fallback"] == []  # every row of dbrx-tiny is a multiple of 32
        out[qtype] = (f, read_gguf(f))
    return out


# ---- the expected file -----------------------------------------------------------------------------------------
def expected_tensors(cfg: DbrxConfig, qtype: str) -> dict[str, tuple[tuple[int, ...], int, str]]:
    """GGUF name -> (ggml dims, ggml type, our state-dict name): llama.cpp's DBRX loader table."""
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    E, F = cfg.ffn_config.moe_num_experts, cfg.ffn_config.ffn_hidden_size
    qkv = D + 2 * cfg.attn_config.kv_n_heads * cfg.head_dim
    m = MATRIX[qtype]
    out = {"token_embd.weight": ((D, V), m, "transformer.wte.weight")}
    for i in range(L):
        b, blk = f"transformer.blocks.{i}", f"blk.{i}"
        out.update({
            f"{blk}.attn_norm.weight": ((D,), F32, f"{b}.norm_attn_norm.norm_1.weight"),
            f"{blk}.attn_qkv.weight": ((D, qkv), m, f"{b}.norm_attn_norm.attn.Wqkv.weight"),
            f"{blk}.attn_output.weight": ((D, D), m, f"{b}.norm_attn_norm.attn.out_proj.weight"),
            f"{blk}.attn_output_norm.weight": ((D,), F32, f"{b}.norm_attn_norm.norm_2.weight"),
            f"{blk}.ffn_gate_inp.weight": ((D, E), F32, f"{b}.ffn.router.layer.weight"),
            f"{blk}.ffn_gate_exps.weight": ((D, F, E), m, f"{b}.ffn.experts.mlp.w1"),
            f"{blk}.ffn_up_exps.weight": ((D, F, E), m, f"{b}.ffn.experts.mlp.v1"),
            f"{blk}.ffn_down_exps.weight": ((F, D, E), m, f"{b}.ffn.experts.mlp.w2"),
        })
    out["output_norm.weight"] = ((D,), F32, "transformer.norm_f.weight")
    out["output.weight"] = ((D, V), HEAD[qtype], "lm_head.weight")
    return out


def file_layout(name: str, t: torch.Tensor) -> np.ndarray:
    """Our tensor in the file's numpy layout: the experts' w2 (E, F, D) stored per expert as (D, F)."""
    x = t.float().numpy()
    return x.transpose(0, 2, 1) if name.endswith(".mlp.w2") else x


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_every_metadata_field(exported, source, qtype):
    cfg = tiny_full_vocab()
    kv, kv_types, _ = exported[qtype][1]
    U32, I32, F32V, STR, BOOL = 4, 5, 6, 8, 7
    expect = {
        "general.architecture": (STR, "dbrx"),
        "general.type": (STR, "model"),
        "general.name": (STR, source[0].name),
        "general.file_type": (U32, FILE_TYPES[qtype]),
        "general.quantization_version": (U32, 2),
        "dbrx.context_length": (U32, 64),
        "dbrx.embedding_length": (U32, 64),
        "dbrx.feed_forward_length": (U32, 96),
        "dbrx.block_count": (U32, 2),
        "dbrx.attention.head_count": (U32, 4),
        "dbrx.attention.head_count_kv": (U32, 2),
        "dbrx.rope.freq_base": (F32V, 500000.0),
        "dbrx.attention.clamp_kqv": (F32V, 8.0),
        "dbrx.expert_count": (U32, 8),
        "dbrx.expert_used_count": (U32, 2),
        "dbrx.attention.layer_norm_epsilon": (F32V, float(np.float32(1e-5))),
        "tokenizer.ggml.model": (STR, "gpt2"),
        "tokenizer.ggml.pre": (STR, "dbrx"),
        "tokenizer.ggml.bos_token_id": (U32, EOS_ID),
        "tokenizer.ggml.eos_token_id": (U32, EOS_ID),
        "tokenizer.ggml.unknown_token_id": (U32, EOS_ID),
        "tokenizer.ggml.padding_token_id": (U32, PAD_ID),
        "tokenizer.ggml.add_bos_token": (BOOL, False),
        "tokenizer.ggml.add_eos_token": (BOOL, False),
    }
    arrays = {"tokenizer.ggml.tokens": (ARRAY, STR), "tokenizer.ggml.token_type": (ARRAY, I32),
              "tokenizer.ggml.merges": (ARRAY, STR)}
    assert set(kv) == set(expect) | set(arrays) | {"tokenizer.chat_template"}
    for key, (t, v) in expect.items():
        assert (kv_types[key], kv[key]) == (t, v), key
    for key, t in arrays.items():
        assert kv_types[key] == t, key
    assert kv_types["tokenizer.chat_template"] == STR
    assert len(kv["tokenizer.ggml.tokens"]) == len(kv["tokenizer.ggml.token_type"]) == cfg.vocab_size
    assert cfg.attn_config.rope_theta == 500000.0 and cfg.attn_config.clip_qkv == 8.0


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_every_tensor(exported, source, qtype):
    """Names (in order), ggml dims, types, and values: f16 equal to the source rounded to fp16, f32 exact, q8_0 /
    q4_0 dequantized within each 32-block's quantization bound."""
    _, state = source
    _, _, tensors = exported[qtype][1]
    expect = expected_tensors(tiny_full_vocab(), qtype)
    assert list(tensors) == list(expect)
    for name, (dims, t, ours) in expect.items():
        got_t, got_dims, raw = tensors[name]
        assert (got_dims, got_t) == (dims, t), name
        got = as_array(raw, t, dims)
        want = file_layout(ours, state[ours])
        assert got.shape == want.shape, name
        if t == F32:
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif t == F16:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            blocks, err = want.reshape(-1, 32), np.abs(got - want).reshape(-1, 32)
            amax = np.abs(blocks).max(axis=1, keepdims=True)
            # q8_0: scale amax/127 (stored fp16), round to nearest: <= half a step plus the scale's rounding.
            # q4_0: scale -max/8 (signed), levels -8..7: the value opposite the max lands one full step away.
            bound = amax / 127 * 0.57 if t == Q8_0 else amax / 8 * 1.01
            assert (err <= bound + 1e-7).all(), name
            rel = np.sqrt((err ** 2).mean() / (blocks ** 2).mean())
            assert rel < (0.01 if t == Q8_0 else 0.12), (name, rel)


def test_vocabulary(exported):
    kv, _, _ = exported["f16"][1]
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == PADDED_VOCAB_SIZE
    normal, control, unused = 1, 3, 5
    n_ranks = min(set(SPECIAL_TOKENS.values()) | set(UNUSED_IDS))
    assert set(types[:n_ranks]) == {normal}
    for text, i in SPECIAL_TOKENS.items():
        assert (tokens[i], types[i]) == (text, control)
    pads = [*UNUSED_IDS, *range(REAL_VOCAB_SIZE, PADDED_VOCAB_SIZE)]
    assert [(tokens[i], types[i]) for i in pads] == [(f"[PAD{i}]", unused) for i in pads]
    assert sum(t == normal for t in types) + len(SPECIAL_TOKENS) + len(pads) == PADDED_VOCAB_SIZE
    assert len(set(tokens)) == len(tokens)

    tok = get_tokenizer()
    to_byte = {c: b for b, c in enumerate(gpt2_byte_chars())}
    for text in ["hello", " world", "\n\n", "  ", "\t", " 🦙", "é", "Ġ", "DBRX"]:
        for i in tok.encode(text):
            assert bytes(to_byte[c] for c in tokens[i]) == tok.decode_bytes([i]), (text, i, tokens[i])
    for i in [0, 1, 100, 255, 256, 1000, 50000, 100255]:  # incl. single bytes (ranks 0..255 are not byte order)
        assert bytes(to_byte[c] for c in tokens[i]) == tok.decode_bytes([i])
    assert tokens[220] == "Ġ" and tokens[198] == "Ċ"  # " " and "\n" in byte-level form


def gpt2_byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode, written out independently: printable Latin-1 as itself, the rest from U+0100."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != 0x20]  # no controls, spaces, soft hyphen
    nxt = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(nxt)) for b in range(256)]


def bpe_ids(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Byte-level BPE as llama.cpp and Hugging Face run it: split with the pre-tokenizer pattern, map bytes to
    characters, then repeatedly merge the adjacent pair listed earliest in `merges`."""
    import regex

    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    token_id = {t: i for i, t in enumerate(tokens)}
    chars = gpt2_byte_chars()
    ids = []
    for piece in regex.findall(CL100K_PATTERN, text):
        word = [chars[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            r, i = min(pairs)
            if r == math.inf:
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        ids += [token_id[w] for w in word]
    return ids


def test_merges_reproduce_cl100k(exported):
    """An independent BPE over the exported merges tokenizes like tiktoken's cl100k, and gives llama.cpp's
    registered hash for DBRX's tokenizer on llama.cpp's pre-tokenizer check text."""
    kv, _, _ = exported["f16"][1]
    tokens, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.merges"]
    assert len(merges) == 100000  # one per multi-byte token (100256 tokens, 256 of them single bytes)
    assert merges[:3] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n"]
    tok = get_tokenizer()
    texts = [
        "Hello, world! DBRX is a mixture-of-experts model with 132B parameters (36B active).",
        "def f(x):\n    return x ** 2  # squares\n\n\n\tprint(f(12345678))",
        "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, 🦙🚀✅",
        "   leading spaces, trailing spaces   \r\n\r\nwindows newlines and 'quotes' I'm you'll THEY'RE",
        "<|endoftext|> special-looking text is plain text; URLs: https://example.com/a?b=c&d=e#f",
    ]
    for text in texts:
        assert bpe_ids(text, tokens, merges) == tok.encode(text), text
    ids = bpe_ids(CHK_TEXT, tokens, merges)
    assert ids == tok.encode(CHK_TEXT)
    assert hashlib.sha256(str(ids).encode()).hexdigest() == CHK_HASH_DBRX


def test_chat_template_renders_like_the_tokenizer(exported):
    jinja2 = pytest.importorskip("jinja2")
    kv, _, _ = exported["f16"][1]
    template = jinja2.Environment().from_string(kv["tokenizer.chat_template"])
    tok = get_tokenizer()
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "  Be terse.\n"}, {"role": "user", "content": "2+2?"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            assert template.render(messages=msgs, add_generation_prompt=gen) == \
                tok.apply_chat_template(msgs, add_generation_prompt=gen), (msgs, gen)


def test_no_clip_is_a_clamp_that_never_binds(tmp_path):
    """clip_qkv None (no clipping) is written as the 1e9 clamp (llama.cpp requires the key), rope theta as given."""
    from dbrx.gguf_export import _write_metadata

    cfg = DbrxConfig.from_preset("dbrx-tiny", attn_config=dict(clip_qkv=None, kv_n_heads=2, rope_theta=10000.0))
    w = gguf.GGUFWriter(tmp_path / "meta.gguf", "dbrx")
    _write_metadata(w, cfg, "q4_0", "no-clip")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    kv, _, tensors = read_gguf(tmp_path / "meta.gguf")
    assert kv["dbrx.attention.clamp_kqv"] == 1e9 and kv["dbrx.rope.freq_base"] == 10000.0 and tensors == {}
    assert kv["general.name"] == "no-clip" and kv["general.file_type"] == FILE_TYPES["q4_0"]


# ---- llama.cpp's graph, in numpy --------------------------------------------------------------------------------
def _layer_norm(x, w, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w


def _rope_neox(x, pos, theta):
    """x (T, H, hd): rotate the pairs (i, i + hd/2) by pos * theta^(-2i/hd) (ggml's NEOX mode)."""
    hd = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)  # (T, hd/2)
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def llama_cpp_logits(kv: dict, tensors: dict, ids: list[int]) -> np.ndarray:
    """DBRX as llama.cpp's graph computes it, from the file alone. ggml_mul_mat(W, x) contracts W's ne0, i.e. the
    last numpy axis: x @ W.T."""
    w = {name: as_array(raw, t, dims).astype(np.float64) for name, (t, dims, raw) in tensors.items()}
    a = "dbrx."
    H, kvH = kv[a + "attention.head_count"], kv[a + "attention.head_count_kv"]
    D, L, k = kv[a + "embedding_length"], kv[a + "block_count"], kv[a + "expert_used_count"]
    eps, clamp, theta = kv[a + "attention.layer_norm_epsilon"], kv[a + "attention.clamp_kqv"], kv[a + "rope.freq_base"]
    hd, T = D // H, len(ids)
    pos = np.arange(T, dtype=np.float64)
    x = w["token_embd.weight"][ids]  # (T, D)
    for i in range(L):
        p = f"blk.{i}."
        h = _layer_norm(x, w[p + "attn_norm.weight"], eps)
        qkv = np.clip(h @ w[p + "attn_qkv.weight"].T, -clamp, clamp)
        q = qkv[:, :D].reshape(T, H, hd)
        kk = qkv[:, D:D + kvH * hd].reshape(T, kvH, hd)
        v = qkv[:, D + kvH * hd:].reshape(T, kvH, hd)
        q, kk = _rope_neox(q, pos, theta), _rope_neox(kk, pos, theta)
        att = np.empty((T, H, hd))
        for head in range(H):
            g = head // (H // kvH)  # ggml broadcasts each K/V head over H / kvH consecutive query heads
            s = q[:, head] @ kk[:, g].T / math.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
            s = np.exp(s - s.max(-1, keepdims=True))
            att[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, g]
        x = x + att.reshape(T, D) @ w[p + "attn_output.weight"].T
        h = _layer_norm(x, w[p + "attn_output_norm.weight"], eps)
        logits = h @ w[p + "ffn_gate_inp.weight"].T  # (T, E)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        moe = np.zeros_like(x)
        for t in range(T):
            top = np.argsort(-probs[t])[:k]
            weights = probs[t, top] / probs[t, top].sum()
            for e, we in zip(top, weights):
                gate = w[p + "ffn_gate_exps.weight"][e] @ h[t]  # (F,)
                up = w[p + "ffn_up_exps.weight"][e] @ h[t]
                moe[t] += we * (w[p + "ffn_down_exps.weight"][e] @ (gate / (1 + np.exp(-gate)) * up))
        x = x + moe
    return _layer_norm(x, w["output_norm.weight"], eps) @ w["output.weight"].T


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_llama_cpp_graph_on_the_file_matches_our_model(exported, source, qtype):
    """The f32 / f16 file run by llama.cpp's DBRX graph (in numpy) gives our model's logits (f16: the model's
    weights rounded as the file stores them): this checks gate/up/down, the w2 transpose, the fused QKV order,
    RoPE and GQA."""
    _, state = source
    kv, _, tensors = exported[qtype][1]
    model = DbrxForCausalLM.from_config(tiny_full_vocab(), device="meta")
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "router" not in name and qtype == "f16":
                p.copy_(p.half().float())
        ids = get_tokenizer().encode("The quick brown fox jumps over the lazy dog")
        ours = model(torch.tensor([ids]))[0].double().numpy()
    theirs = llama_cpp_logits(kv, tensors, ids)
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


@pytest.mark.slow
def test_gguf_packages_reader_agrees(exported):
    """The `gguf` package's own reader (what its tools use) sees the same fields and tensors as our parser."""
    path, (kv, _, tensors) = exported["q4_0"]
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields.keys() == kv.keys()
    for key, value in kv.items():
        if isinstance(value, float):
            assert fields[key] == pytest.approx(value), key
        else:
            assert fields[key] == value, key
    assert [t.name for t in r.tensors] == list(tensors)
    for t in r.tensors:
        typ, dims, raw = tensors[t.name]
        assert (int(t.tensor_type), tuple(int(d) for d in t.shape)) == (typ, dims)
        np.testing.assert_array_equal(t.data.reshape(-1).view(np.uint8), raw)


# ---- errors and the command line ------------------------------------------------------------------------------
def test_bad_input(tmp_path, source):
    path, _ = source
    with pytest.raises(ValueError, match="unknown GGUF type 'q5_k'; choose one of f32, f16, q8_0, q4_0"):
        export_gguf(path, tmp_path / "x.gguf", "q5_k")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="is a directory"):
        export_gguf(path, tmp_path)

    small = DbrxForCausalLM.from_config(DbrxConfig.from_preset("dbrx-tiny", vocab_size=128))
    small.save_pretrained(tmp_path / "small-vocab")
    with pytest.raises(ValueError, match="vocab_size is only 128"):
        export_gguf(tmp_path / "small-vocab", tmp_path / "x.gguf")

    p2 = DbrxForCausalLM.from_config(DbrxConfig.from_preset(
        "dbrx-tiny", ffn_config=dict(ffn_hidden_size=96, moe_num_experts=8, moe_top_k=2,
                                     moe_normalize_expert_weights=2.0)))
    p2.save_pretrained(tmp_path / "p2", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="divides the top-k expert weights by their sum"):
        export_gguf(tmp_path / "p2", tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "p2", "small-vocab"]


def test_rows_that_do_not_fit_the_blocks_fall_back_to_f16(tmp_path, capsys):
    """As llama.cpp's converter does: a matrix whose rows are not a multiple of 32 (here ffn_down_exps, rows of
    ffn_hidden_size 112 as in the demo preset) is written f16 in a q8_0 / q4_0 file; the others keep the type."""
    cfg = DbrxConfig.from_preset("dbrx-tiny", max_seq_len=64, ffn_config=dict(ffn_hidden_size=112,
                                                                              moe_num_experts=4, moe_top_k=2))
    model = randomize_(DbrxForCausalLM.from_config(cfg, device="cpu"), seed=5)
    model.save_pretrained(tmp_path / "f112")
    state = model.state_dict()
    down = [f"blk.{i}.ffn_down_exps.weight" for i in range(cfg.n_layers)]
    for qtype in ("q8_0", "q4_0"):
        report = export_gguf(tmp_path / "f112", tmp_path / f"{qtype}.gguf", qtype)
        assert report["f16_fallback"] == down
        kv, _, tensors = read_gguf(tmp_path / f"{qtype}.gguf")
        assert kv["general.file_type"] == FILE_TYPES[qtype]
        for name, (dims, t, ours) in expected_tensors(cfg, qtype).items():
            want_t = F16 if name in down else t
            assert (tensors[name][0], tensors[name][1]) == (want_t, dims), name
            if name in down:
                got = as_array(tensors[name][2], F16, dims)
                want = file_layout(ours, state[ours])
                np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
    assert export_gguf(tmp_path / "f112", tmp_path / "f32.gguf", "f32")["f16_fallback"] == []
    assert main(["export-gguf", str(tmp_path / "f112"), str(tmp_path / "cli.gguf"), "--type", "q4_0"]) == 0
    err = capsys.readouterr().err
    assert f"note: 2 matrices have rows that are not a multiple of the q4_0 block size 32 and were written in f16: " \
           f"{', '.join(down)}\n" in err


def test_values_beyond_f16_are_refused_and_out_is_untouched(tmp_path):
    """An f16 tensor cannot hold 1e5: a one-line error, OUT untouched, no temporary file left; f32 keeps it."""
    cfg = DbrxConfig.from_preset("dbrx-tiny", max_seq_len=64)
    model = DbrxForCausalLM.from_config(cfg, device="cpu")
    with torch.no_grad():
        model.transformer.blocks[1].norm_attn_norm.attn.out_proj.weight[3, 5] = 1e5
    model.save_pretrained(tmp_path / "big")
    out = tmp_path / "old.gguf"
    out.write_bytes(b"previous file")
    with pytest.raises(ValueError, match=r"tensor blk.1.attn_output.weight holds values up to 100000, beyond "
                                         r"float16's range; it cannot be stored in float16 \(try --type f32\)"):
        export_gguf(tmp_path / "big", out, "f16")
    assert out.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "old.gguf"]
    export_gguf(tmp_path / "big", out, "f32")
    _, _, tensors = read_gguf(out)
    t, dims, raw = tensors["blk.1.attn_output.weight"]
    assert t == F32 and as_array(raw, t, dims)[3, 5] == 1e5


def test_cli(tmp_path, capsys, source, exported):
    path, _ = source
    with pytest.raises(SystemExit) as e:
        main(["export-gguf", "--help"])
    assert e.value.code == 0
    assert "llama.cpp" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export-gguf", str(path), str(tmp_path / "x.gguf"), "--type", "q5_k"])
    assert e.value.code == 2
    assert "invalid choice: 'q5_k'" in capsys.readouterr().err
    assert main(["export-gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dbrx export-gguf: error: ") and "not found" in err
    f, _ = exported["q8_0"]
    assert f.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_cli_without_the_gguf_package(tmp_path, capsys, monkeypatch, source):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    monkeypatch.delitem(sys.modules, "dbrx.gguf_export")
    assert main(["export-gguf", str(source[0]), str(tmp_path / "x.gguf")]) == 2
    hint = 'GGUF export needs the `gguf` package: pip install -e ".[gguf]"'
    assert capsys.readouterr().err == f"dbrx export-gguf: error: {hint}\n"


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
