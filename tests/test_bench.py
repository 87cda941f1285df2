"""`dbrx bench`: the JSON report on the CPU with dbrx-tiny, the transformers comparison, the CLI, user errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from dbrx.bench import active_matmul_params, decode_greedy, run_bench, run_decode_bench, transformers_model
from dbrx.cli import main
from dbrx.config import DbrxConfig
from dbrx.kernels import experts
from dbrx.model import DbrxForCausalLM

SMALL = {"vocab_size": 512}
needs_gmm = pytest.mark.skipif(experts._gmm is None, reason="torch < 2.8 has no torch._grouped_mm")


def _positive(report, *fields):
    for f in fields:
        assert isinstance(report[f], float) and report[f] > 0, (f, report[f])


def test_train_report_with_transformers_comparison():
    pytest.importorskip("transformers")
    r = run_bench("train", "dbrx-tiny", overrides=SMALL, batch=2, seq_len=16, dtype="fp32", steps=1, warmup=0,
                  compare="transformers")
    _positive(r, "seconds_per_step", "tokens_per_s", "tflops", "ratio_tokens_per_s")
    _positive(r["transformers"], "seconds_per_step", "tokens_per_s", "tflops")
    assert r["bench"] == "train" and r["mfu"] is None and r["peak_memory_gb"] is None  # CPU: no peak known
    assert r["expert_backend"] in ("grouped_mm", "loop")
    cfg = DbrxConfig.from_preset("dbrx-tiny", **SMALL)
    per_token = 6 * active_matmul_params(cfg) + 6 * cfg.n_layers * cfg.d_model * 16
    assert r["tflops"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12)
    assert r["ratio_tokens_per_s"] == pytest.approx(r["tokens_per_s"] / r["transformers"]["tokens_per_s"])
    assert r["logits_rel_err"] < 1e-5  # fp32: both models compute the same function on the same weights


def test_transformers_out_of_memory_keeps_our_numbers(monkeypatch):
    pytest.importorskip("transformers")
    import dbrx.bench as bench

    measure, calls = bench._measure, []

    def oom_second(*args, **kwargs):  # ours is measured first, then transformers runs out of memory
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.15 GiB")
        return measure(*args, **kwargs)

    monkeypatch.setattr(bench, "_measure", oom_second)
    r = run_bench("train", "dbrx-tiny", overrides=SMALL, batch=1, seq_len=8, dtype="fp32", steps=1, warmup=0,
                  compare="transformers")
    _positive(r, "tokens_per_s", "tflops")
    assert r["transformers"]["error"] == "out of memory" and "13.15 GiB" in r["transformers"]["detail"]
    assert "ratio_tokens_per_s" not in r and "logits_rel_err" not in r


def test_prefill_report_mfu_with_peak_override():
    r = run_bench("prefill", "dbrx-tiny", overrides=SMALL, seq_len=8, dtype="fp32", steps=1, warmup=0, peak=0.5)
    _positive(r, "tokens_per_s", "tflops", "tflops_with_attention", "mfu")
    assert r["tflops_with_attention"] > r["tflops"]
    assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)


def test_active_params_match_the_baseline_formula():
    cfg = DbrxConfig.from_preset("dbrx-132b", n_layers=2)
    d, f, E, k, V, L = 6144, 10752, 16, 4, 100352, 2
    assert active_matmul_params(cfg) == L * (d * (d + 2 * 1024) + d * d) + L * k * 3 * d * f + L * d * E + V * d


def test_transformers_model_has_our_weights():
    pytest.importorskip("transformers")
    cfg = DbrxConfig.from_preset("dbrx-tiny", vocab_size=128, rope_theta=1234.0)
    ours = DbrxForCausalLM.from_config(cfg, seed=0).eval()
    hf = transformers_model(ours, torch.device("cpu"), torch.float32).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=1e-4)


def test_cli_prints_json(capsys):
    rc = main(["bench", "prefill", "--preset", "dbrx-tiny", "--override", "vocab_size=256", "--seq-len", "8",
               "--steps", "1", "--warmup", "0", "--dtype", "fp32", "--backend", "loop"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bench"] == "prefill" and r["backend"] == "loop" and r["tokens_per_s"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(compare="vllm"), "--compare"),
    (dict(checkpointing="some"), "--checkpointing"),
    (dict(batch=0), "--batch"),
    (dict(seq_len=10_000), "max_seq_len"),
    (dict(backend="magic"), "unknown expert backend"),
])
def test_user_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_bench("train", "dbrx-tiny", **{"overrides": SMALL, "steps": 1, "warmup": 0, **kwargs})


def test_gpu_script_is_valid_bash():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "dbrx-132b" in text and "dbrx-9b" in text and "--compare transformers" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [pytest.param("grouped_mm", marks=needs_gmm), "triton"])
def test_gpu_logits_match_transformers(backend, dtype=torch.bfloat16, tol=3e-2):
    """On CUDA, our expert backends give transformers' logits for the same tiny config and weights."""
    pytest.importorskip("transformers")
    cfg = DbrxConfig.from_preset("dbrx-tiny", vocab_size=256)
    ours = DbrxForCausalLM.from_config(cfg, seed=0, device="cuda", dtype=dtype).eval()
    for block in ours.transformer.blocks:
        block.ffn.backend = backend
    hf = transformers_model(ours, torch.device("cuda"), dtype).eval()
    assert all(p.dtype == dtype for p in hf.parameters())
    ids = torch.randint(0, 256, (3, 200), device="cuda")
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        got = ours(ids).float()
    assert torch.isfinite(got).all()
    assert (got - ref).norm() / ref.norm() < tol


def test_memory_estimate_counts_live_tensors_exactly():
    from dbrx.memory import estimate_peak

    def build():
        return torch.nn.Linear(64, 32), (torch.zeros(8, 64),)

    def step(layer, x):
        with torch.no_grad():
            y = layer(x)  # (8, 32) fp32
            z = y * 2  # a second (8, 32) while y is alive
            del y, z

    est = estimate_peak(build, step)
    assert est["params"] == (64 * 32 + 32) * 4 and est["inputs"] == 8 * 64 * 4
    assert est["peak"] == est["params"] + est["inputs"] + 2 * 8 * 32 * 4
    assert [t["bytes"] for t in est["at_peak"]] == [8 * 32 * 4, 8 * 32 * 4]


@needs_gmm
def test_memory_estimate_of_steps():
    kw = dict(overrides={"vocab_size": 512, "n_layers": 4}, batch=4, seq_len=64, estimate_memory=True)
    train = {c: run_bench("train", "dbrx-tiny", checkpointing=c, **kw) for c in ("none", "selective", "full")}
    prefill = run_bench("prefill", "dbrx-tiny", **kw)
    params = train["none"]["params_gb"]
    assert params == pytest.approx(DbrxConfig.from_preset("dbrx-tiny", vocab_size=512, n_layers=4).num_params()["total"]
                                   * 2 / 1e9)  # bf16
    assert train["none"]["estimated_peak_memory_gb"] > 2 * params  # weights, their gradients and activations
    assert prefill["estimated_peak_memory_gb"] < train["none"]["estimated_peak_memory_gb"]
    peaks = [train[c]["estimated_peak_memory_gb"] for c in ("none", "selective", "full")]
    assert peaks[1] < peaks[0] and peaks[2] < peaks[0], peaks  # less kept for backward, less memory
    with pytest.raises(ValueError, match="estimate-memory"):
        run_bench("train", "dbrx-tiny", compare="transformers", **kw)
    with pytest.raises(ValueError, match="traces the grouped"):  # the loop reference syncs: nothing to trace
        run_bench("train", "dbrx-tiny", backend="loop", **kw)


@needs_gmm
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["train", "prefill"])
def test_gpu_memory_estimate_close_to_measured(kind):
    """The fake-tensor estimate against CUDA's max_memory_allocated for the same eager bf16 step."""
    # sizes where a cuBLAS workspace (tens of MB, not traced) is small next to the step
    kw = dict(overrides={"d_model": 1024, "n_heads": 16, "n_layers": 2, "vocab_size": 32768, "ffn_hidden_size": 1792,
                         "max_seq_len": 1024}, batch=8, seq_len=1024, dtype="bf16")
    est = run_bench(kind, "dbrx-tiny", estimate_memory=True, **kw)["estimated_peak_memory_gb"]
    measured = run_bench(kind, "dbrx-tiny", device="cuda", steps=1, warmup=1, **kw)["peak_memory_gb"]
    assert 0.8 < measured / est < 1.25, (measured, est)


# ---- decode -----------------------------------------------------------------------------------------------------
DECODE = dict(overrides=SMALL, prompt_len=6, new_tokens=4, rounds=1, threads=1)


def _step_fields(entry):
    _positive(entry, "ms_per_step", "tokens_per_s", "bandwidth_gb_s")


def _decode_bytes(cfg, batch, weight_bytes):
    """Bytes a decode step reads, from the config: everything but the experts and the embedding, the expected
    distinct experts' share, B embedding rows (4 bytes per fp32 weight)."""
    f = cfg.ffn_config
    E, K, D, V = f.moe_num_experts, f.moe_top_k, cfg.d_model, cfg.vocab_size
    experts = cfg.n_layers * 3 * E * f.ffn_hidden_size * D * 4
    active = K if batch == 1 else E * (1 - (1 - K / E) ** batch)
    return weight_bytes - experts - V * D * 4 + experts * active / E + batch * D * 4


def test_decode_report_and_bandwidth():
    r = run_decode_bench("dbrx-tiny", batches=(1, 3), dtype="fp32", **DECODE)
    cfg = DbrxConfig.from_preset("dbrx-tiny", **SMALL)
    assert r["bench"] == "decode" and r["quantization"] is None and r["threads"] == 1 and r["dtype"] == "float32"
    assert [row["batch"] for row in r["results"]] == [1, 3]
    n_params = sum(p.numel() for p in DbrxForCausalLM.from_config(cfg, device="meta").parameters())
    for row in r["results"]:
        _step_fields(row)
        assert row["weight_bytes"] == 4 * n_params
        assert row["weight_bytes_per_step"] == pytest.approx(_decode_bytes(cfg, row["batch"], 4 * n_params), abs=1)
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 1e3 / row["ms_per_step"])
        assert row["bandwidth_gb_s"] == pytest.approx(row["weight_bytes_per_step"] / row["ms_per_step"] / 1e6)


def test_decode_greedy_equals_full_recompute(one_thread):
    """The timed loop's tokens: each the argmax of a full forward over everything so far (no cache)."""
    cfg = DbrxConfig.from_preset("dbrx-tiny", **SMALL)
    model = DbrxForCausalLM.from_config(cfg, seed=0).eval()
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    toks, seconds = decode_greedy(model, prompt, 4)
    assert toks.shape == (2, 5) and seconds > 0
    ids = prompt
    with torch.no_grad():
        for i in range(5):
            nxt = model(ids)[:, -1].argmax(-1)
            assert torch.equal(nxt, toks[:, i])
            ids = torch.cat((ids, nxt[:, None]), dim=1)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_decode_quantized_in_memory_reads_fewer_bytes(bits, group):
    fp = run_decode_bench("dbrx-tiny", dtype="fp32", **DECODE)["results"][0]
    r = run_decode_bench("dbrx-tiny", bits=bits, group_size=group, **DECODE)
    assert r["quantization"]["bits"] == bits and r["quantization"]["modules"] == ["attn", "experts", "lm_head"]
    row = r["results"][0]
    _step_fields(row)
    assert row["weight_bytes_per_step"] < fp["weight_bytes_per_step"] / (2.5 if bits == 8 else 4)


def test_decode_checkpoint_dirs_and_transformers(tmp_path):
    pytest.importorskip("transformers")
    from dbrx.quant import save_quantized

    cfg = DbrxConfig.from_preset("dbrx-tiny", **SMALL)
    model = DbrxForCausalLM.from_config(cfg, seed=0)
    model.save_pretrained(tmp_path / "float")
    save_quantized(model, tmp_path / "q8", bits=8)
    kw = {k: v for k, v in DECODE.items() if k != "overrides"}
    r = run_decode_bench(model_dir=str(tmp_path / "float"), compare="transformers", **kw)
    row = r["results"][0]
    _step_fields(row)
    _step_fields(row["transformers"])
    assert row["same_tokens"] == 1.0  # fp32, the same weights: the same greedy tokens
    assert row["ratio_tokens_per_s"] == pytest.approx(row["tokens_per_s"] / row["transformers"]["tokens_per_s"])
    r = run_decode_bench(model_dir=str(tmp_path / "q8"), **kw)
    assert r["quantization"]["bits"] == 8 and r["model"] == str(tmp_path / "q8")
    with pytest.raises(ValueError, match="quantized checkpoint"):
        run_decode_bench(model_dir=str(tmp_path / "q8"), bits=4, **kw)


@pytest.mark.parametrize("kwargs, match", [
    (dict(compare="vllm"), "--compare"),
    (dict(batches=(0,)), "--batch"),
    (dict(new_tokens=0), "--new-tokens"),
    (dict(prompt_len=10_000), "max_seq_len"),
    (dict(bits=8, compare="transformers"), "float weights only"),
    (dict(group_size=32), "--group-size needs --bits 4"),
    (dict(bits=4, group_size=48), "group size"),
])
def test_decode_user_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_decode_bench("dbrx-tiny", **{**DECODE, **kwargs})


def test_decode_cli_json_and_one_line_error(capsys):
    rc = main(["bench", "decode", "--override", "vocab_size=256", "--batch", "1,2", "--prompt-len", "4",
               "--new-tokens", "2", "--rounds", "1", "--threads", "1", "--bits", "8"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bench"] == "decode" and [row["batch"] for row in r["results"]] == [1, 2]
    assert main(["bench", "decode", "--batch", "1,two"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch must be comma-separated integers" in err


@pytest.mark.slow
def test_decode_compiled_step_gives_the_eager_tokens(one_thread):
    from dbrx.bench import compiled_decode_step

    cfg = DbrxConfig.from_preset("dbrx-tiny", **SMALL)
    model = DbrxForCausalLM.from_config(cfg, seed=0).eval()
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    eager, _ = decode_greedy(model, prompt, 4)
    compiled, _ = decode_greedy(model, prompt, 4, compiled_decode_step(model))
    assert torch.equal(eager, compiled)
