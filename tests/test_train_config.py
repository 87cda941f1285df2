"""Training config: YAML + overrides -> dataclasses, validation naming the field, LR schedule, LionW, decay groups."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from dbrx.config import DbrxConfig
from dbrx.model import DbrxForCausalLM
from dbrx.train.config import OptimSection, TrainConfig, from_dict, load_config, parse_overrides
from dbrx.train.trainer import LionW, build_optimizer, lr_at


def test_packaged_configs_load_and_validate():
    cfg = load_config()
    assert cfg.model.preset == "dbrx-demo" and set(cfg.data.streams) == {"text", "code"}
    cfg.validate()
    ft = load_config("finetune-demo")
    assert ft.optim.name == "lionw"
    ft.data.sft = ["chat.jsonl"]
    ft.validate(task="finetune")


def test_overrides_dotted_paths_yaml_scalars(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-3", "train.steps=50", "model.overrides.n_layers=2", "optim.grad_clip=null",
                             "train.debug_nan_steps=[3, 4]", "log.tensorboard=false", "run_dir=" + str(tmp_path)])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 50 and cfg.optim.grad_clip is None
    assert cfg.model.overrides == {"ffn_config": {"moe_loss_weight": 0.5}, "n_layers": 2}  # merged into the demo's
    assert cfg.train.debug_nan_steps == [3, 4] and cfg.run_dir == str(tmp_path)
    assert parse_overrides(["a.b=true"]) == [(["a", "b"], True)]
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["train.steps"])


@pytest.mark.parametrize("override, field", [
    ("train.stepz=5", "train.stepz"),  # unknown key
    ("bogus.x=1", "bogus"),  # unknown section
    ("train.steps=abc", "train.steps"),  # wrong type
    ("train.steps=2.5", "train.steps"),
    ("optim.lr=fast", "optim.lr"),
    ("train.compile=3", "train.compile"),
    ("optim.betas=0.9", "optim.betas"),
])
def test_bad_keys_and_types_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override, field", [
    ("train.micro_batch=3", "train.global_batch"),  # not divisible
    ("train.steps=0", "train.steps"),
    ("optim.name=sgd", "optim.name"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("optim.schedule=step", "optim.schedule"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("train.precision=fp8", "train.precision"),
    ("train.activation_checkpointing=some", "train.activation_checkpointing"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("eval.fraction=1.5", "eval.fraction"),
    ("model.preset=dbrx-huge", "model.preset"),
    ("log.peak_flops=fast", "log.peak_flops"),
    ("data.schedule=[{until: 1.0, weights: {prose: 1}}]", "schedule"),
    ("data.streams.text.paths=[]", "data.streams.text"),
])
def test_bad_values_rejected_before_training(override, field):
    cfg = load_config(None, [override])
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cfg.validate()


def test_world_size_enters_the_divisibility_check():
    cfg = load_config(None, ["train.global_batch=8", "train.micro_batch=8"])
    cfg.validate(world=1)
    with pytest.raises(ValueError, match="world size"):
        cfg.validate(world=2)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_asked_but_missing():
    with pytest.raises(ValueError, match="log.tensorboard.*not installed"):
        load_config(None, ["log.tensorboard=true"]).validate()


def test_from_dict_builds_nested_sections():
    cfg = from_dict(TrainConfig, {"data": {"streams": {"a": {"prepared": "/x"}}}, "optim": {"betas": [0.8, 0.9]}})
    assert cfg.data.streams["a"].prepared == "/x" and cfg.optim.betas == [0.8, 0.9]


def test_lr_schedule_warmup_cosine_linear():
    o = OptimSection(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, 110, o) == pytest.approx(0.1) and lr_at(9, 110, o) == pytest.approx(1.0)
    assert lr_at(10, 110, o) == pytest.approx(1.0)
    assert lr_at(60, 110, o) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos = 0
    assert lr_at(110, 110, o) == pytest.approx(0.1)
    o.schedule = "linear"
    assert lr_at(60, 110, o) == pytest.approx(0.55) and lr_at(109, 110, o) == pytest.approx(0.1 + 0.9 / 100)
    o.schedule = "constant"
    assert lr_at(100, 110, o) == 1.0


def test_lionw_matches_the_update_formula():
    torch.manual_seed(0)
    p0 = torch.randn(5, 3)
    p = torch.nn.Parameter(p0.clone())
    lr, b1, b2, wd = 0.1, 0.9, 0.99, 0.5
    opt = LionW([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    ref, m = p0.clone(), torch.zeros_like(p0)
    for _ in range(3):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
        torch.testing.assert_close(p.data, ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m)


def test_no_weight_decay_on_norms_and_embeddings():
    model = DbrxForCausalLM.from_config(DbrxConfig.from_preset("dbrx-tiny", vocab_size=256), seed=0)
    opt = build_optimizer(model, OptimSection(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, plain = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "transformer.wte.weight" in plain and "transformer.norm_f.weight" in plain
    assert all("norm" in n or "wte" in n for n in plain)
    assert "lm_head.weight" in decayed and "transformer.blocks.0.ffn.experts.mlp.w1" in decayed
    assert len(decayed) + len(plain) == len(names) and not math.isnan(opt.param_groups[0]["lr"])


def test_cli_arguments_config_overrides_and_resume():
    import argparse

    from dbrx.cli import train as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["pretrain", "my.yaml", "train.steps=5"])
    assert cli._split_args(args.args) == ("my.yaml", ["train.steps=5"]) and args.resume is None
    args = parser.parse_args(["pretrain", "--resume", "train.steps=5"])  # an override, not a checkpoint path
    assert cli._resume_arg(args) == ["train.steps=5"] and args.resume == "latest"
    with pytest.raises(ValueError, match="key=value"):
        cli._split_args(["a.yaml", "b.yaml"])


def test_eval_interval_needs_a_held_out_split():
    with pytest.raises(ValueError, match="eval.interval.*eval.fraction"):
        load_config(None, ["eval.fraction=0"]).validate()


def test_resume_option_gives_back_a_config_file():
    import argparse

    from dbrx.cli import train as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["pretrain", "--resume", "my.yaml", "train.steps=5"])
    assert cli._config_and_overrides(args) == ("my.yaml", ["train.steps=5"]) and args.resume == "latest"
    args = parser.parse_args(["pretrain", "my.yaml", "--resume", "train.steps=5"])
    assert cli._config_and_overrides(args) == ("my.yaml", ["train.steps=5"]) and args.resume == "latest"
