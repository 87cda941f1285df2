"""dbrx.generate, the Python API on the serving engine: greedy outputs against a recompute-everything reference,
batch invariance, seeds, stops, the vocabulary limit, the sampler's distributions, and text streaming."""

import functools
from types import SimpleNamespace

import pytest
import torch
from conftest import reference_greedy as _reference_greedy
from torch import nn

from dbrx.config import DbrxConfig
from dbrx.generate import _start, generate_ids, generate_text, stream_ids, stream_pieces, stream_text
from dbrx.model import DbrxForCausalLM
from dbrx.sampling import SamplingParams
from dbrx.tokens import REAL_VOCAB_SIZE, UNUSED_IDS

VOCAB = 256
GREEDY = SamplingParams(temperature=0, max_new_tokens=10, stop_ids=())


def tiny_model(vocab_size: int = VOCAB, seed: int = 0) -> DbrxForCausalLM:
    model = DbrxForCausalLM.from_config(DbrxConfig.from_preset("dbrx-tiny", vocab_size=vocab_size), seed=seed)
    with torch.no_grad():  # random init gives near-flat logits and attention: sharpen both
        model.lm_head.weight.mul_(100.0)  # diverse tokens
        for block in model.transformer.blocks:  # positions matter (a wrong position id changes the output)
            block.norm_attn_norm.attn.Wqkv.weight.mul_(10.0)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> DbrxForCausalLM:
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    from dbrx.tokenizer import get_tokenizer

    return get_tokenizer()


@functools.cache
def _reference(model, prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(_reference_greedy(model, list(prompt), n))


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """conftest's recompute-everything greedy reference, memoised (several tests ask for the same prompts)."""
    return list(_reference(model, tuple(prompt), n))


def _engine_like(vocab_size: int) -> SimpleNamespace:
    """The config fields the engine reads from a model (one layer, one KV head of width 1: a tiny KV pool)."""
    return SimpleNamespace(vocab_size=vocab_size, max_seq_len=4096, n_layers=1, head_dim=1,
                           attn_config=SimpleNamespace(kv_n_heads=1))


class FixedLogits(nn.Module):
    """The same next-token logits after every prefix (for tests of the sampler through the engine)."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.config = _engine_like(len(logits))
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward_paged(self, ids, positions, meta, kv_caches, logits_indices):
        return self.logits.expand(len(logits_indices), -1).clone()  # (M, V)


def _draws(logits: list[float], n_rows: int = 8, n: int = 250, **kw) -> torch.Tensor:
    """n_rows * n sampled ids from fixed logits: every draw independent (repetition_penalty 1, no stop ids)."""
    params = SamplingParams(max_new_tokens=n, stop_ids=(), seed=0, **kw)
    out = generate_ids(FixedLogits(logits), [[0]] * n_rows, params)
    assert all(len(row) == n for row in out)
    return torch.tensor(out).flatten()


# ---- generation with the real (tiny) model ------------------------------------------------------------------
def test_greedy_matches_the_recompute_reference(model):
    prompt = [5, 17, 99, 3, 42]
    out = generate_ids(model, [prompt], GREEDY)[0]
    assert out == reference_greedy(model, prompt, GREEDY.max_new_tokens)
    assert len(set(out)) > 1  # the model is not stuck on one token, so the comparison means something


def test_a_batch_of_any_lengths_matches_each_prompt_alone(model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [200], [4, 4, 4, 4, 4]]
    batch = generate_ids(model, prompts, GREEDY)
    assert batch == [reference_greedy(model, p, GREEDY.max_new_tokens) for p in prompts]
    assert all(len(o) == GREEDY.max_new_tokens for o in batch)
    assert len({tuple(o) for o in batch}) == len(prompts)


def test_sampling_seeded_per_row(model):
    prompt = [3, 1, 4, 1, 5]
    p = SamplingParams(temperature=1.0, max_new_tokens=16, stop_ids=(), seed=123)
    a = generate_ids(model, [prompt], p)
    assert a == generate_ids(model, [prompt], p)
    others = [generate_ids(model, [prompt], SamplingParams(temperature=1.0, max_new_tokens=16, stop_ids=(), seed=s))
              for s in (1, 2)]
    assert any(o != a for o in others)
    # row i of a batch uses seed + i: the same tokens as that prompt alone with that seed, whatever runs beside it
    batch = generate_ids(model, [[9, 9], prompt, prompt], SamplingParams(temperature=1.0, max_new_tokens=16,
                                                                         stop_ids=(), seed=122))
    assert batch[1] == a[0]  # seed 122 + 1
    assert batch[2] == generate_ids(model, [prompt], SamplingParams(temperature=1.0, max_new_tokens=16,
                                                                    stop_ids=(), seed=124))[0]
    assert batch[1] != batch[2]  # the same prompt twice in a batch gets two different samples


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)])
def test_truncated_sampling_equals_greedy(model, kw):
    prompts = [[9, 8, 7], [1, 2, 3, 4, 5, 6]]
    p = SamplingParams(temperature=1.5, max_new_tokens=10, stop_ids=(), seed=0, **kw)
    assert generate_ids(model, prompts, p) == [reference_greedy(model, q, 10) for q in prompts]


def test_max_new_tokens_and_stream_ids(model):
    p = SamplingParams(temperature=0.8, max_new_tokens=7, stop_ids=(), seed=5)
    out = generate_ids(model, [[10, 20]], p)[0]
    assert len(out) == 7
    assert list(stream_ids(model, [10, 20], p)) == out
    assert list(stream_ids(model, [10, 20], GREEDY)) == reference_greedy(model, [10, 20], GREEDY.max_new_tokens)


def test_stop_ids_end_each_row(model):
    prompts = [[5, 17, 99, 3, 42], [60, 61]]
    free = [reference_greedy(model, q, 10) for q in prompts]
    k = next(i for i in range(2, len(free[0])) if free[0][i] not in free[0][:i])  # first occurrence at k
    stop = free[0][k]
    p = SamplingParams(temperature=0, max_new_tokens=10, stop_ids=(stop,))
    out = generate_ids(model, prompts, p)
    assert out[0] == free[0][:k]  # the stop id itself is not part of the output
    other = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert out[1] == other
    assert list(stream_ids(model, prompts[0], p)) == free[0][:k]


def test_stops_early_when_all_rows_done(model):
    prompt = [5, 17, 99, 3, 42]
    first = reference_greedy(model, prompt, 1)[0]
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = generate_ids(model, [prompt], SamplingParams(temperature=0, max_new_tokens=10, stop_ids=(first,)))
    finally:
        handle.remove()
    assert out == [[]]
    assert len(calls) == 1  # the prefill only


def test_repetition_penalty_in_generation(model):
    prompt = [5, 17, 99, 3, 42]
    p = SamplingParams(temperature=0, max_new_tokens=12, stop_ids=(), repetition_penalty=1e6)
    out = generate_ids(model, [prompt], p)[0]
    assert len(set(out)) == len(out)
    assert not set(out) & set(prompt)


def test_vocab_limit_never_sampled():
    model = tiny_model(vocab_size=100352)
    with torch.no_grad():  # make the padding rows of the head win everywhere
        model.lm_head.weight[100280:] = model.lm_head.weight[:72] * 100
    forced = generate_ids(model, [[1, 2, 3]], GREEDY, vocab_limit=100352)[0]
    assert all(t >= 100280 for t in forced)
    for p in (GREEDY, SamplingParams(temperature=2.0, max_new_tokens=10, stop_ids=(), seed=0)):
        out = generate_ids(model, [[1, 2, 3]], p)[0]  # default limit: the real cl100k + DBRX ids
        assert len(out) == 10 and all(t < 100280 for t in out)
    assert all(t < 1000 for t in generate_ids(model, [[1, 2, 3]], GREEDY, vocab_limit=1000)[0])
    with pytest.raises(ValueError, match="vocab_limit"):
        generate_ids(model, [[1, 2, 3]], GREEDY, vocab_limit=0)


def test_the_kv_pool_is_sized_to_the_call(model):
    engine = _start(model, [[1] * 20, [2] * 3], SamplingParams(max_new_tokens=10), None)
    assert engine.pool.num_blocks == 1 + 2 + 1  # the null block, ceil(30 / 16), ceil(13 / 16)
    assert engine.scheduler.max_num_seqs == 2
    prompts = [[i % 200 + 1] * (i % 7 + 1) for i in range(40)]  # more prompts than a server's default seats
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = generate_ids(model, prompts, SamplingParams(temperature=0, max_new_tokens=3, stop_ids=()))
    finally:
        handle.remove()
    assert len(calls) == 3  # every prompt ran from the first step: one prefill step, then two decode steps
    assert [out[i] for i in (0, 13, 39)] == [reference_greedy(model, prompts[i], 3) for i in (0, 13, 39)]


def test_too_long_raises_naming_numbers(model):
    with pytest.raises(ValueError, match=r"(?s)250.*10.*256"):
        generate_ids(model, [[1] * 250], SamplingParams(max_new_tokens=10))


@pytest.mark.parametrize("prompts", [[], [[]], [[1, VOCAB]], [[-1]], "abc", [["a"]], [[1], [2, 2.5]]])
def test_bad_prompts_raise(model, prompts):
    with pytest.raises(ValueError, match="prompt"):
        generate_ids(model, prompts, GREEDY)


def test_nan_logits_raise():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN logits"):
        generate_ids(model, [[1, 2, 3]], SamplingParams(max_new_tokens=2))
    assert not model.lm_head._forward_hooks  # the check removed itself


def test_generation_restores_modes():
    model = tiny_model().train()
    it = stream_ids(model, [1, 2, 3], GREEDY)
    assert model.training  # checked and queued, not run yet
    next(it)
    assert not torch.is_inference_mode_enabled()  # only inside the engine's steps
    list(it)
    assert model.training
    it = stream_ids(model, [1, 2, 3], GREEDY)
    next(it)
    it.close()  # a caller that stops early (a stop string) also gets its model back in training mode
    assert model.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generation_on_cuda():
    model = tiny_model().to("cuda")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    assert generate_ids(model, prompts, GREEDY) == [reference_greedy(model, p, 10) for p in prompts]


# ---- the sampler, through the engine ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=0), dict(top_k=2.5), dict(top_p=0.0),
    dict(top_p=1.01), dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0), dict(max_new_tokens=0),
    dict(stop_ids=(-1,)), dict(stop_strings=("",)), dict(seed=1.5),
])
def test_bad_params_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_stop_strings_accepts_single_string():
    assert SamplingParams(stop_strings="END").stop_strings == ("END",)


@pytest.mark.parametrize("logits, prompt, penalty, expected", [
    ([2.0, 1.9, -5.0], [0], 2.0, [1]),  # a seen positive logit is divided: 2.0 -> 1.0 < 1.9
    ([-1.0, -1.5, -5.0], [0], 2.0, [1]),  # a seen negative one is multiplied: -1.0 -> -2.0 < -1.5
    ([1.0, 1.5, -5.0], [0], 0.5, [0]),  # a penalty below 1 favours seen tokens: 1.0 -> 2.0
    ([2.0, 1.9, 1.8], [2], 2.0, [0, 1]),  # generated tokens count as seen too
])
def test_repetition_penalty_follows_transformers(logits, prompt, penalty, expected):
    params = SamplingParams(temperature=0, max_new_tokens=len(expected), stop_ids=(), repetition_penalty=penalty)
    assert generate_ids(FixedLogits(logits), [prompt], params)[0] == expected


def test_temperature_scales_logits():
    logits = [0.0, torch.tensor(3.0).log().item()]  # p(1) = 0.75 at temperature 1
    for t, p1 in [(1.0, 0.75), (0.5, 0.9), (2.0, 3**0.5 / (1 + 3**0.5))]:
        ids = _draws(logits, temperature=t)
        assert abs(ids.float().mean().item() - p1) < 0.04, t


def test_top_k_samples_stay_in_top_k():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    top3 = set(torch.topk(logits, 3).indices.tolist())
    ids = _draws(logits.tolist(), temperature=3.0, top_k=3)
    assert set(ids.tolist()) == top3  # all three seen in 2000 draws at high temperature, nothing else


def test_top_p_keeps_smallest_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert set(_draws(logits, n_rows=2, n=100, temperature=1.0, top_p=0.45).tolist()) == {0}
    counts = torch.bincount(_draws(logits, n_rows=12, temperature=1.0, top_p=0.75), minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 3000 - 0.625) < 0.05  # renormalised 0.5 / 0.8
    assert set(_draws(logits, n_rows=4, temperature=1.0, top_p=0.85).tolist()) == {0, 1, 2}


def test_vocab_limit_of_the_sampler():
    logits = [0.0] * 8 + [100.0, 100.0]
    assert int(_draws(logits, n_rows=2, n=100, temperature=1.0).min()) >= 8  # (the test means something)
    params = SamplingParams(temperature=1.0, max_new_tokens=200, stop_ids=(), seed=0)
    assert max(generate_ids(FixedLogits(logits), [[0]], params, vocab_limit=8)[0]) < 8
    greedy = SamplingParams(temperature=0, max_new_tokens=3, stop_ids=())
    assert max(generate_ids(FixedLogits(logits), [[0]], greedy, vocab_limit=5)[0]) < 5


# ---- text streaming -----------------------------------------------------------------------------------------
TEXT = "Hi 🙂 naïve 日本語 and 👩‍👩‍👧 done"


def test_stream_pieces_whole_characters(tokenizer):
    ids = tokenizer.encode(TEXT)
    partial = [i for i in ids if not _is_utf8(tokenizer.decode_bytes([i]))]
    assert partial  # some tokens hold only part of a character: the test exercises that case
    pieces = list(stream_pieces(ids, tokenizer))
    assert "".join(pieces) == TEXT == tokenizer.decode(ids)
    assert all(p and "\ufffd" not in p for p in pieces)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_pieces_stop_string_spanning_tokens(tokenizer):
    text = "alpha beta <END> gamma"
    ids = tokenizer.encode(text)
    consumed = []

    def tokens():
        for i in ids:
            consumed.append(i)
            yield i

    pieces = list(stream_pieces(tokens(), tokenizer, ["<END>"]))
    assert len(tokenizer.encode("<END>")) > 1
    assert "".join(pieces) == "alpha beta "
    assert all("<" not in p for p in pieces)  # the possible start of the stop string was held back
    assert len(consumed) < len(ids)  # stopped pulling tokens


def test_stream_pieces_releases_false_alarm(tokenizer):
    text = "a <EN b <E"
    pieces = list(stream_pieces(tokenizer.encode(text), tokenizer, ["<END>", "zz"]))
    assert "".join(pieces) == text
    assert "".join(stream_pieces(tokenizer.encode("x🙂yzz!"), tokenizer, ["zz"])) == "x🙂y"
    assert list(stream_pieces(tokenizer.encode("STOP now"), tokenizer, ["STOP"])) == []


class ScriptedModel(nn.Module):
    """Predicts script[k] at generation step k of its (one) request, whatever the input (for text-level tests)."""

    def __init__(self, script: list[int], vocab_size: int = 100352):
        super().__init__()
        self.config = _engine_like(vocab_size)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script = script
        self.prompts: list[list[int]] = []  # the ids of each request's first step (its whole prompt, here)
        self.steps = 0  # logits computed for the latest request

    def forward_paged(self, ids, positions, meta, kv_caches, logits_indices):
        if int(positions[0]) == 0:  # a new request
            self.prompts.append(ids.tolist())
            self.steps = 0
        logits = torch.zeros(len(logits_indices), self.config.vocab_size)  # (M, V)
        if len(logits_indices):
            logits[:, self.script[min(self.steps, len(self.script) - 1)]] = 1.0
            self.steps += 1
        return logits


def test_stream_text_stop_string_and_stop_id(tokenizer):
    script = tokenizer.encode("Hello 🙂 world<STOP>ignored") + [tokenizer.im_end_id]
    model = ScriptedModel(script)
    p = SamplingParams(temperature=0, max_new_tokens=50, stop_strings=("<STOP>",))
    assert generate_text(model, tokenizer, "Say hi", p) == "Hello 🙂 world"
    assert model.prompts[-1] == tokenizer.encode("Say hi")
    assert model.steps < len(script)  # generation ended at the stop string
    pieces = list(stream_text(model, tokenizer, "Say hi", SamplingParams(temperature=0, max_new_tokens=50)))
    assert "".join(pieces) == "Hello 🙂 world<STOP>ignored"  # ends on <|im_end|>, which is not emitted
    assert all("\ufffd" not in piece for piece in pieces)


def test_generate_text_chat_and_max_tokens(tokenizer):
    model = ScriptedModel(tokenizer.encode("one two three four five six"))
    messages = [{"role": "user", "content": "count"}]
    text = generate_text(model, tokenizer, messages, SamplingParams(temperature=0, max_new_tokens=3))
    assert text == tokenizer.decode(model.script[:3])
    assert model.prompts[-1] == tokenizer.apply_chat_template(messages, tokenize=True)
    generate_text(model, tokenizer, "count", SamplingParams(temperature=0, max_new_tokens=1), chat=True)
    assert model.prompts[-1] == tokenizer.apply_chat_template(messages, tokenize=True)


def test_stream_text_never_samples_padding_rows(tokenizer):
    model = ScriptedModel([100300])  # only a padding row has a high logit
    text = generate_text(model, tokenizer, "x", SamplingParams(temperature=0, max_new_tokens=3, stop_ids=()))
    assert len(text) > 0  # decodable tokens came out instead of a decode error


def test_unused_ids_are_never_sampled(tokenizer):
    undecodable = []
    for i in range(REAL_VOCAB_SIZE):
        try:
            tokenizer.decode_bytes([i])
        except ValueError:
            undecodable.append(i)
    assert undecodable == list(UNUSED_IDS)
    for bad in (100256, 100261, 100275):  # the model's favourite is an id that no token has
        model = ScriptedModel([bad])
        text = generate_text(model, tokenizer, "x", SamplingParams(temperature=0, max_new_tokens=3, stop_ids=()))
        assert len(text) > 0
        out = generate_ids(model, [[1, 2]], SamplingParams(temperature=0, max_new_tokens=3, stop_ids=()))[0]
        assert not set(out) & set(UNUSED_IDS)


def test_encode_prompt_system_prompt():
    from dbrx.generate import encode_prompt
    from dbrx.tokenizer import get_tokenizer

    tok = get_tokenizer()
    bare = encode_prompt(tok, "hi", chat=True, system_prompt=None)
    assert tok.decode(bare) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    default = tok.decode(encode_prompt(tok, "hi", chat=True))
    assert default.startswith("<|im_start|>system\nYou are DBRX, created by Databricks.")
    assert tok.decode(encode_prompt(tok, "hi")) == "hi"
