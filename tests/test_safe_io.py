"""Nothing lost, nothing escapes: Hugging Face checkpoint writes are all-or-nothing, indexes cannot point outside
their directory, bad weights are refused, and every ordinary mistake is a one-line error from the CLI."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import dbrx.fsutil
import dbrx.hf_checkpoint as hfc
from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.cli import main
from dbrx.config import PRESETS

SHARD = 60_000  # bytes: several shards for a tiny model


def _model(seed=0, full_vocab=False):
    cfg = DbrxConfig.from_preset("dbrx-tiny") if full_vocab else tiny_config()  # full: text prompts tokenize
    return randomize_(DbrxForCausalLM.from_config(cfg), seed=seed).eval()


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if dbrx.fsutil.is_temporary(p))


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err, err
    assert len(lines) >= 1 and "error:" in lines[-1], err
    assert sum("error" in line for line in lines) == 1, err
    for n in needles:
        assert n in lines[-1], (n, err)


@pytest.fixture
def old_and_new(tmp_path):
    """dst: a sharded checkpoint of model A; src: model B. Returns (src, dst, model A, model B)."""
    a, b = _model(0), _model(1)
    a.save_pretrained(tmp_path / "dst", max_shard_bytes=SHARD)
    b.save_pretrained(tmp_path / "src")
    return tmp_path / "src", tmp_path / "dst", a, b


def _same(model_a, path) -> bool:
    loaded = DbrxForCausalLM.from_pretrained(path)
    return all(torch.equal(v, loaded.state_dict()[k]) for k, v in model_a.state_dict().items())


# ---- all-or-nothing writes ------------------------------------------------------------------------------------
def _fail_at(monkeypatch, module, name, n):
    """Make module.name raise ENOSPC on its n-th call (1-based); earlier calls run for real."""
    real, calls = getattr(module, name), [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[-1] if args else ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)
    return calls


@pytest.mark.parametrize("stage", ["shard1", "shard2", "last_shard", "fsync", "fsync_dir", "swap"])
def test_a_failed_convert_leaves_the_old_checkpoint_intact(old_and_new, monkeypatch, capsys, stage):
    src, dst, a, _ = old_and_new
    before = _files(dst)
    n_shards = len(hfc.convert_checkpoint(src, dst.parent / "probe", max_shard_bytes=SHARD))
    if stage.startswith("shard") or stage == "last_shard":
        _fail_at(monkeypatch, hfc, "save_file", {"shard1": 1, "shard2": 2, "last_shard": n_shards}[stage])
    elif stage == "fsync":
        _fail_at(monkeypatch, dbrx.fsutil, "fsync_path", 2)
    elif stage == "fsync_dir":
        _fail_at(monkeypatch, dbrx.fsutil, "fsync_path", n_shards + 2)  # after the files: the directory itself
    else:
        monkeypatch.setattr(dbrx.fsutil, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    code, _, err = _run(["convert", src, dst, "--shard-size", SHARD], capsys)
    _one_line_error(code, err)  # (after the progress lines of the shards that were written)
    assert _files(dst) == before and _same(a, dst)  # the old checkpoint, byte for byte
    assert _leftovers(dst.parent) == []


def test_no_space_is_a_one_line_error_and_a_fresh_target_is_not_created(old_and_new, monkeypatch, capsys):
    src, dst, _, _ = old_and_new
    _fail_at(monkeypatch, hfc, "save_file", 1)
    code, _, err = _run(["convert", src, dst.parent / "fresh"], capsys)
    _one_line_error(code, err, "no space left")
    assert not (dst.parent / "fresh").exists() and _leftovers(dst.parent) == []


def test_a_completed_convert_replaces_the_whole_directory(old_and_new, capsys):
    src, dst, _, b = old_and_new
    (dst / "README.md").write_text("my notes")  # not ours: carried over
    code, _, _ = _run(["convert", src, dst], capsys)
    assert code == 0 and _same(b, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # no old shards
    assert (dst / "README.md").read_text() == "my notes" and _leftovers(dst.parent) == []


def test_a_writer_killed_mid_write_leaves_the_old_checkpoint(old_and_new, capsys):
    """A real SIGKILL after the first shard: the old checkpoint still loads whole; the next writer cleans up."""
    src, dst, a, b = old_and_new
    script = (
        "import os, signal, sys\n"
        "import dbrx.hf_checkpoint as h\n"
        "real = h.save_file\n"
        "def save(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "h.save_file = save\n"
        "h.convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(src), str(dst), str(SHARD)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert _same(a, dst) and len(_leftovers(dst.parent)) == 1  # the dead writer's temporary directory
    assert _run(["convert", src, dst], capsys)[0] == 0
    assert _same(b, dst) and _leftovers(dst.parent) == []


def test_init_refuses_a_non_empty_directory_and_a_bad_override_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = _run(["init", "--preset", "dbrx-tiny", out], capsys)
    _one_line_error(code, err, "--force")
    code, _, err = _run(["init", "--preset", "dbrx-tiny", "--force", out], capsys)
    _one_line_error(code, err, "not a checkpoint directory")
    assert sorted(os.listdir(out)) == ["keep.txt"]
    code, _, err = _run(["init", "--preset", "dbrx-tiny", tmp_path / "new", "--override", 'resid_pdrop="a"'], capsys)
    _one_line_error(code, err, "resid_pdrop")
    assert not (tmp_path / "new").exists()


def test_a_symlink_planted_at_an_old_temporary_name_is_never_followed(old_and_new, capsys):
    src, dst, _, b = old_and_new
    victim = dst.parent / "victim.txt"
    victim.write_text("precious")
    for name in ("config.json.tmp", "model.safetensors.tmp", "model.safetensors.index.json.tmp"):
        (dst / name).symlink_to(victim)
    (dst.parent / f".{dst.name}.tmp").symlink_to(victim)
    assert _run(["convert", src, dst], capsys)[0] == 0
    assert victim.read_text() == "precious" and _same(b, dst)


# ---- what a checkpoint may name and hold -------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["/etc/passwd", "../other/model.safetensors", "sub/model.safetensors", "..", ""])
def test_an_index_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, capsys, entry):
    _model(0).save_pretrained(tmp_path / "ck", max_shard_bytes=SHARD)
    _model(1).save_pretrained(tmp_path / "other")
    index_path = tmp_path / "ck" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = entry
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a plain file name"):
        DbrxForCausalLM.from_pretrained(tmp_path / "ck")
    code, out, err = _run(["generate", "--model", tmp_path / "ck", "hi", "--max-new-tokens", "2"], capsys)
    _one_line_error(code, err, repr(key), "not a plain file name")
    assert out == ""


def test_non_float_and_non_finite_weights_are_refused_by_name(tmp_path, capsys):
    model = _model(0, full_vocab=True)
    model.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(f)
    name = "transformer.blocks.1.norm_attn_norm.attn.Wqkv.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3, 5] = float("nan")
    save_file(tensors, f)
    with pytest.raises(ValueError, match=f"{name}.*NaN or infinite"):
        DbrxForCausalLM.from_pretrained(tmp_path / "ck")
    code, out, err = _run(["generate", "--model", tmp_path / "ck", "hi", "--max-new-tokens", "2"], capsys)
    _one_line_error(code, err, name, "--allow-nonfinite")
    assert out == ""
    # loaded anyway, the NaN reaches the logits: sampling stops with a one-line error, not a torch traceback
    code, out, err = _run(["generate", "--model", tmp_path / "ck", "hi", "--allow-nonfinite",
                           "--max-new-tokens", "2"], capsys)
    _one_line_error(code, err, "NaN logits")

    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, f)
    with pytest.raises(ValueError, match=f"{name}.*dtype I32"):
        DbrxForCausalLM.from_pretrained(tmp_path / "ck", allow_nonfinite=True)


# ---- one-line errors from the CLI -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    _model(0, full_vocab=True).save_pretrained(path)
    return path


@pytest.mark.parametrize("device, needle", [("bogus", "unknown device"), ("cuda", "CUDA is not available"),
                                            ("cuda:7", "CUDA"), ("tpu", "device")])
def test_bad_devices_are_one_line_errors(ckpt, capsys, device, needle):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    code, out, err = _run(["generate", "--model", ckpt, "hi", "--device", device], capsys)
    _one_line_error(code, err, needle)
    assert out == ""


def test_an_over_long_prompt_is_refused_before_anything_is_printed(ckpt, capsys):
    code, out, err = _run(["generate", "--model", ckpt, "word " * 300, "--max-new-tokens", "2"], capsys)
    _one_line_error(code, err, "max_seq_len")
    assert out == ""


def test_debug_shows_the_traceback(capsys):
    assert main(["info", "no-such-preset"]) == 2
    with pytest.raises(ValueError, match="neither a preset"):
        main(["--debug", "info", "no-such-preset"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr("dbrx.cli.model.info_report", lambda cfg: {}["missing"])
    with pytest.raises(KeyError):
        main(["info", "dbrx-tiny"])


def test_ctrl_c_stops_the_reply_not_the_chat(ckpt, capsys, monkeypatch):
    import dbrx.generate

    real, calls = dbrx.generate.stream_text, [0]

    def interrupted_once(*args, **kwargs):
        calls[0] += 1
        pieces = real(*args, **kwargs)
        if calls[0] > 1:
            return pieces

        def gen():
            yield next(pieces)
            raise KeyboardInterrupt

        return gen()

    monkeypatch.setattr(dbrx.generate, "stream_text", interrupted_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n"))
    code, out, err = _run(["chat", "--model", ckpt, "--system", "", "--max-new-tokens", "3", "--temperature", "0"],
                          capsys)
    assert code == 0 and "reply interrupted" in err and out.count("dbrx> ") == 2 and calls[0] == 2


# ---- fuzzing: every failure is one line ------------------------------------------------------------------
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_fields = ["d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "attn_config", "ffn_config", "resid_pdrop",
           "emb_pdrop", "initializer_range", "tie_word_embeddings", "model_type",
           "attn_config.clip_qkv", "attn_config.kv_n_heads", "attn_config.rope_theta", "attn_config.attn_pdrop",
           "ffn_config.ffn_hidden_size", "ffn_config.moe_num_experts", "ffn_config.moe_top_k",
           "ffn_config.moe_jitter_eps", "ffn_config.moe_loss_weight", "ffn_config.moe_normalize_expert_weights",
           "ffn_config.ffn_act_fn"]


def _cli_outcome(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_fields), _values, min_size=1, max_size=3))
def test_fuzzed_config_json_is_info_or_a_one_line_error(tmp_path, changes):
    d = json.loads(json.dumps(PRESETS["dbrx-tiny"]))
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field and isinstance(d.get(section), dict):
            d[section][field] = value
        elif not field:
            d[key] = value
    try:
        text = json.dumps(d, allow_nan=True)
    except (ValueError, TypeError):
        return
    (tmp_path / "config.json").write_text(text)
    code, err = _cli_outcome(["info", str(tmp_path)])
    assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err), err


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(_fields), st.text(max_size=12) | _values.map(json.dumps))
def test_fuzzed_overrides_are_info_or_a_one_line_error(field, value):
    code, err = _cli_outcome(["info", "dbrx-tiny", "--override", f"{field}={value}"])
    assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err), err


def test_a_refused_lock_leaves_no_dangling_descriptor(tmp_path):
    """A LockedError must not leave an object whose finaliser closes a descriptor number reused since."""
    import gc

    held = dbrx.fsutil.lock_dir(tmp_path / "d", "d", inside=True)
    script = ("import sys, dbrx.fsutil as f\n"
              "try:\n    f.lock_dir(sys.argv[1], 'd', inside=True)\nexcept f.LockedError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "d")], capture_output=True, text=True).stdout
    assert f"pid {os.getpid()}" in out
    for _ in range(3):  # in-process refusals, each followed by a collection, then a lock elsewhere still works
        with pytest.raises(dbrx.fsutil.LockedError):
            dbrx.fsutil.DirLock(tmp_path / "d" / ".lock", "d")
        other = dbrx.fsutil.lock_dir(tmp_path / f"e{_}", "e", inside=True)
        gc.collect()
        other.release()
    held.release()
    dbrx.fsutil.lock_dir(tmp_path / "d", "d", inside=True).release()  # free again
