from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dbrx.config import DbrxConfig
from dbrx.generate import (
    REAL_VOCAB_SIZE,
    UNUSED_IDS,
    SamplingParams,
    generate_ids,
    generate_text,
    process_logits,
    sample_next,
    stream_ids,
    stream_pieces,
    stream_text,
)
from dbrx.model import DbrxForCausalLM

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


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---- generation with the real (tiny) model ------------------------------------------------------------------
def test_greedy_matches_naive_loop(model):
    prompt = [5, 17, 99, 3, 42]
    out = generate_ids(model, [prompt], GREEDY)[0]
    assert out == naive_greedy(model, prompt, GREEDY.max_new_tokens)
    assert len(set(out)) > 1  # the model is not stuck on one token, so the comparison means something


def test_left_padded_batch_matches_single_prompts(model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [200], [4, 4, 4, 4, 4]]
    batch = generate_ids(model, prompts, GREEDY)
    single = [generate_ids(model, [p], GREEDY)[0] for p in prompts]
    assert batch == single
    assert all(len(o) == GREEDY.max_new_tokens for o in batch)
    assert len({tuple(o) for o in batch}) == len(prompts)


def test_sampling_seeded(model):
    prompt = [[3, 1, 4, 1, 5]]
    p = SamplingParams(temperature=1.0, max_new_tokens=16, stop_ids=(), seed=123)
    a = generate_ids(model, prompt, p)
    assert a == generate_ids(model, prompt, p)
    others = [generate_ids(model, prompt, SamplingParams(temperature=1.0, max_new_tokens=16, stop_ids=(), seed=s))
              for s in (1, 2)]
    assert any(o != a for o in others)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)])
def test_truncated_sampling_equals_greedy(model, kw):
    prompts = [[9, 8, 7], [1, 2, 3, 4, 5, 6]]
    p = SamplingParams(temperature=1.5, max_new_tokens=10, stop_ids=(), seed=0, **kw)
    assert generate_ids(model, prompts, p) == generate_ids(model, prompts, GREEDY)


def test_max_new_tokens_and_stream_ids(model):
    p = SamplingParams(temperature=0.8, max_new_tokens=7, stop_ids=(), seed=5)
    out = generate_ids(model, [[10, 20]], p)[0]
    assert len(out) == 7
    assert list(stream_ids(model, [10, 20], p)) == out


def test_stop_ids_end_each_row(model):
    prompts = [[5, 17, 99, 3, 42], [60, 61]]
    free = generate_ids(model, prompts, GREEDY)
    k = next(i for i in range(2, len(free[0])) if free[0][i] not in free[0][:i])  # first occurrence at k
    stop = free[0][k]
    p = SamplingParams(temperature=0, max_new_tokens=10, stop_ids=(stop,))
    out = generate_ids(model, prompts, p)
    assert out[0] == free[0][:k]  # the stop id itself is not part of the output
    other = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert out[1] == other
    assert list(stream_ids(model, prompts[0], p)) == free[0][:k]


def test_stops_early_when_all_rows_done(model):
    prompts = [[5, 17, 99, 3, 42]]
    first = generate_ids(model, prompts, GREEDY)[0][0]
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = generate_ids(model, prompts, SamplingParams(temperature=0, max_new_tokens=10, stop_ids=(first,)))
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


def test_fixed_cache_len_reuses_cache(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    expected = generate_ids(model, prompts, GREEDY)
    assert generate_ids(model, prompts, GREEDY, cache_len=64) == expected
    cache = model.transformer.blocks[0].norm_attn_norm.attn.cache
    assert cache.k.shape[2] == 64
    other = [[9, 9, 9, 9, 9, 9, 9], [3]]
    out = generate_ids(model, other, GREEDY, cache_len=64)  # stale entries from the last call must not matter
    assert model.transformer.blocks[0].norm_attn_norm.attn.cache is cache
    assert out == generate_ids(model, other, GREEDY)
    with pytest.raises(ValueError, match="cache_len"):
        generate_ids(model, prompts, GREEDY, cache_len=14)
    with pytest.raises(ValueError, match="cache_len"):
        generate_ids(model, prompts, GREEDY, cache_len=257)


def test_too_long_raises_naming_numbers(model):
    with pytest.raises(ValueError, match=r"(?s)250.*10.*256"):
        generate_ids(model, [[1] * 250], SamplingParams(max_new_tokens=10))


@pytest.mark.parametrize("prompts", [[], [[]], [[1, VOCAB]], [[-1]], "abc", [["a"]]])
def test_bad_prompts_raise(model, prompts):
    with pytest.raises(ValueError):
        generate_ids(model, prompts, GREEDY)


def test_generation_restores_modes():
    model = tiny_model().train()
    it = stream_ids(model, [1, 2, 3], GREEDY)
    next(it)
    assert not torch.is_inference_mode_enabled()  # only inside the generator's steps
    list(it)
    assert model.training


def test_compile_flag_on_cpu(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    p = SamplingParams(temperature=0, max_new_tokens=4, stop_ids=())
    with pytest.warns(UserWarning, match="only applies on CUDA"):
        out = generate_ids(model, prompts, p, compile=True)
    assert out == generate_ids(model, prompts, p)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_flag_on_cuda():
    model = tiny_model().to("cuda", torch.bfloat16)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    p = SamplingParams(temperature=0, max_new_tokens=12, stop_ids=())
    eager = generate_ids(model, prompts, p)
    assert generate_ids(model, prompts, p, compile=True) == eager
    assert generate_ids(model, prompts, p, compile=True) == eager  # a second call replays the graphs


# ---- sampling unit tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=0), dict(top_k=2.5), dict(top_p=0.0),
        dict(top_p=1.01), dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0), dict(max_new_tokens=0),
        dict(stop_ids=(-1,)), dict(stop_strings=("",)), dict(seed=1.5),
    ],
)
def test_bad_params_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_stop_strings_accepts_single_string():
    assert SamplingParams(stop_strings="END").stop_strings == ("END",)


def test_repetition_penalty_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    expected = torch.tensor([[1.0, -4.0, 1.0, -1.0], [2.0, -2.0, 0.5, -2.0]])
    seen_ids = torch.tensor([[0, 1, 1], [2, 3, -1]])  # -1: padding, ignored
    assert torch.equal(process_logits(logits, p, seen_ids), expected)
    mask = torch.tensor([[True, True, False, False], [False, False, True, True]])
    assert torch.equal(process_logits(logits, p, mask), expected)
    assert torch.equal(process_logits(logits, SamplingParams(temperature=0, repetition_penalty=0.5), mask),
                       torch.tensor([[4.0, -1.0, 1.0, -1.0], [2.0, -2.0, 2.0, -0.5]]))
    assert torch.equal(sample_next(logits, p, seen_ids=seen_ids), torch.tensor([0, 0]))  # ties: first index
    assert torch.equal(sample_next(logits[:1], p, seen_ids=seen_ids[:1]), torch.tensor([0]))
    assert torch.equal(sample_next(torch.tensor([[2.0, 1.9]]), p, seen_ids=torch.tensor([[0]])), torch.tensor([1]))


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = process_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(out, logits / 0.5)


def test_top_k_samples_stay_in_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g).expand(4000, 50)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    ids = sample_next(logits, SamplingParams(temperature=3.0, top_k=3), g)
    assert set(ids.tolist()) == top3  # all three seen in 4000 draws at high temperature, nothing else


def test_top_p_keeps_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda top_p: torch.isfinite(process_logits(logits, SamplingParams(top_p=top_p)))[0].tolist()  # noqa: E731
    assert kept(0.45) == [True, False, False, False]
    assert kept(0.75) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits.expand(3000, 4), SamplingParams(top_p=0.75), g)
    counts = torch.bincount(ids, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 3000 - 0.625) < 0.05  # renormalised 0.5 / 0.8


def test_sample_next_respects_vocab_limit():
    logits = torch.zeros(2000, 10)
    logits[:, 8:] = 100.0
    g = torch.Generator().manual_seed(0)
    assert int(sample_next(logits, SamplingParams(temperature=1.0), g, vocab_limit=8).max()) < 8
    assert int(sample_next(logits, SamplingParams(temperature=0), vocab_limit=5).max()) < 5


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
    """Predicts script[k] at generation step k, whatever the input (for text-level tests)."""

    def __init__(self, script: list[int], vocab_size: int = 100352):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=4096)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script = script
        self.prompts: list[torch.Tensor] = []

    def setup_cache(self, batch, max_len, dtype=None, device=None):
        self.step = 0

    def forward(self, ids, attention_mask=None, position_ids=None, cache_pos=None):
        if self.step == 0:
            self.prompts.append(ids.clone())
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.config.vocab_size)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return logits


def test_stream_text_stop_string_and_stop_id(tokenizer):
    script = tokenizer.encode("Hello 🙂 world<STOP>ignored") + [tokenizer.im_end_id]
    model = ScriptedModel(script)
    p = SamplingParams(temperature=0, max_new_tokens=50, stop_strings=("<STOP>",))
    assert generate_text(model, tokenizer, "Say hi", p) == "Hello 🙂 world"
    assert model.prompts[-1][0].tolist() == tokenizer.encode("Say hi")
    assert model.step < len(script)  # generation ended at the stop string
    pieces = list(stream_text(model, tokenizer, "Say hi", SamplingParams(temperature=0, max_new_tokens=50)))
    assert "".join(pieces) == "Hello 🙂 world<STOP>ignored"  # ends on <|im_end|>, which is not emitted
    assert all("\ufffd" not in piece for piece in pieces)


def test_generate_text_chat_and_max_tokens(tokenizer):
    model = ScriptedModel(tokenizer.encode("one two three four five six"))
    messages = [{"role": "user", "content": "count"}]
    text = generate_text(model, tokenizer, messages, SamplingParams(temperature=0, max_new_tokens=3))
    assert text == tokenizer.decode(model.script[:3])
    assert model.prompts[-1][0].tolist() == tokenizer.apply_chat_template(messages, tokenize=True)
    generate_text(model, tokenizer, "count", SamplingParams(temperature=0, max_new_tokens=1), chat=True)
    assert model.prompts[-1][0].tolist() == tokenizer.apply_chat_template(messages, tokenize=True)


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
