"""Training configuration: one YAML file mapped to nested dataclasses, with `key=value` overrides.

    run_dir: runs/demo
    model: {preset: dbrx-demo, overrides: {}, checkpoint: null}
    data:
      streams:
        text: {paths: [pkg:data/corpus/text], split: "\\n{4,}"}
        code: {paths: [pkg:data/corpus/code]}
      schedule: [{until: 0.8, weights: {text: 0.7, code: 0.3}}, {until: 1.0, weights: {text: 0.4, code: 0.6}}]
    train: {steps: 200, global_batch: 8, micro_batch: 8, seq_len: 256, precision: auto, ...}
    optim: {name: adamw, lr: 3e-3, warmup_steps: 20, schedule: cosine, min_lr_ratio: 0.1, ...}
    eval: {interval: 50, fraction: 0.02, batches: 2, icl_tasks: null, icl_limit: null}  # icl_tasks: e.g. demo
    checkpoint: {interval: 100, keep: 2}
    lora: null  # or {rank: 16, alpha: 32, rslora: false, dropout: 0.0, targets: [Wqkv, out_proj, w1, v1, w2]}
    log: {interval: 10, expert_load_interval: 50, tensorboard: false, mlflow: false, peak_flops: auto}

Overrides use dotted paths and YAML values: `optim.lr=1e-3 train.steps=50 model.overrides.n_layers=2`. Files and
overrides are read by `dbrx.config.YamlLoader` (YAML 1.2 floats: `1e-3` is a number in both).
`validate()` rejects a bad config (unknown key, wrong type, bad value) with a ValueError naming the field, before
anything is built. A path starting with `pkg:` is relative to the installed `dbrx` package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dbrx.config import YamlLoader, parse_value, yaml_problem
from dbrx.lora.layers import LoraConfig
from dbrx.moe import LOAD_BALANCING
from dbrx.parallel.activation_checkpoint import MODES

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONFIG_DIR = PACKAGE_DIR / "configs"
PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw", "lionw")
LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class ModelSection:
    preset: str = "dbrx-demo"  # a dbrx.config preset name (ignored when `checkpoint` is set)
    checkpoint: str | None = None  # a Hugging Face-format directory to start from
    overrides: dict[str, Any] = field(default_factory=dict)  # DbrxConfig field overrides of the preset


@dataclass
class StreamSection:
    paths: list[str] = field(default_factory=list)  # text / JSONL / Parquet files or directories, prepared on first use
    prepared: str | None = None  # or a directory already written by `dbrx prepare`
    format: str = "auto"
    text_field: str = "text"
    split: str | None = None  # regex separating documents inside a text file


@dataclass
class DataSection:
    streams: dict[str, StreamSection] = field(default_factory=dict)  # pre-training streams by name
    schedule: list[dict[str, Any]] = field(default_factory=list)  # mixture phases; empty: equal weights throughout
    sft: list[str] = field(default_factory=list)  # chat / prompt-response JSONL files (fine-tuning)
    system_prompt: str | None = "default"  # fine-tuning: "default" (DBRX Instruct's), a string, or null (none)
    cache_dir: str | None = None  # where prepared shards go; default ~/.cache/dbrx/prepared
    workers: int | None = None  # tokeniser processes for preparation


@dataclass
class TrainSection:
    steps: int = 200
    global_batch: int = 8  # sequences per optimizer step, over all ranks
    micro_batch: int = 8  # sequences per forward; accumulation = global / (micro * world)
    seq_len: int = 256
    seed: int = 0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: str = "none"
    compile: bool = False
    z_loss_weight: float = 0.0
    load_balancing: str = "per_layer"  # per_layer (MegaBlocks, as DBRX was trained) | pooled (transformers)
    max_nan_skips: int = 5  # consecutive non-finite steps before training stops
    num_threads: int | None = None  # CPU threads per process (default: cores / local processes)
    debug_nan_steps: list[int] = field(default_factory=list)  # testing hook: poison the loss at these steps


@dataclass
class OptimSection:
    name: str = "adamw"  # adamw | lionw
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms and embeddings
    grad_clip: float | None = 1.0
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class EvalSection:
    interval: int = 0  # steps between evaluations (0: only at the end, when a held-out split exists)
    fraction: float = 0.0  # share of each stream's documents (or conversations) held out
    batches: int = 2  # micro batches per stream per evaluation
    icl_tasks: str | None = None  # ICL tasks scored at each evaluation, as `dbrx eval --tasks`: demo, a YAML, names
    icl_limit: int | None = None  # at most this many items per ICL task


@dataclass
class CheckpointSection:
    interval: int = 0  # steps between checkpoints (0: none, except on Ctrl-C)
    keep: int = 2
    dir: str | None = None  # default RUN_DIR/checkpoints


@dataclass
class LogSection:
    interval: int = 10  # steps between console lines
    expert_load_interval: int = 50  # steps between full (L, E) expert-load matrices in metrics.jsonl
    tensorboard: bool = False
    mlflow: bool = False
    peak_flops: float | str | None = "auto"  # FLOP/s for MFU; auto: known GPU peak, or a measured CPU matmul rate


@dataclass
class SampleSection:
    prompt: str = "ROMEO:"
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int | None = 40


@dataclass
class TrainConfig:
    run_dir: str = "runs/pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    sample: SampleSection = field(default_factory=SampleSection)
    lora: LoraConfig | None = None  # set (e.g. `lora.rank=16`): train LoRA adapters on a frozen model.checkpoint

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def validate(self, world: int = 1, task: str = "pretrain") -> None:
        """Raise ValueError naming the first invalid field."""
        _check_finite(self)
        t, o = self.train, self.optim
        for name in ("steps", "global_batch", "micro_batch", "seq_len"):
            _positive(f"train.{name}", getattr(t, name))
        if t.global_batch % (t.micro_batch * world):
            raise ValueError(f"train.global_batch ({t.global_batch}) must be divisible by train.micro_batch "
                             f"({t.micro_batch}) x world size ({world})")
        _choice("train.precision", t.precision, PRECISIONS)
        _choice("train.activation_checkpointing", t.activation_checkpointing, MODES)
        _choice("train.load_balancing", t.load_balancing, LOAD_BALANCING)
        if t.z_loss_weight < 0:
            raise ValueError(f"train.z_loss_weight must be >= 0, got {t.z_loss_weight}")
        _positive("train.max_nan_skips", t.max_nan_skips)
        if t.num_threads is not None:
            _positive("train.num_threads", t.num_threads)
        _choice("optim.name", o.name, OPTIMIZERS)
        _choice("optim.schedule", o.schedule, LR_SCHEDULES)
        if not o.lr > 0:
            raise ValueError(f"optim.lr must be positive, got {o.lr}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if not o.eps > 0:
            raise ValueError(f"optim.eps must be positive, got {o.eps}")
        if o.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        if o.grad_clip is not None and not o.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be positive or null, got {o.grad_clip}")
        if o.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        if not 0 <= o.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if self.eval.interval < 0:
            raise ValueError(f"eval.interval must be >= 0, got {self.eval.interval}")
        if not 0 <= self.eval.fraction < 1:
            raise ValueError(f"eval.fraction must be in [0, 1), got {self.eval.fraction}")
        _positive("eval.batches", self.eval.batches)
        if self.eval.interval and not self.eval.fraction and not self.eval.icl_tasks:
            raise ValueError(f"eval.interval is {self.eval.interval} but eval.fraction is 0: nothing is held out to "
                             "evaluate on (set eval.fraction, e.g. 0.02, eval.icl_tasks, or eval.interval=0)")
        if self.eval.icl_limit is not None:
            _positive("eval.icl_limit", self.eval.icl_limit)
        if self.checkpoint.interval < 0:
            raise ValueError(f"checkpoint.interval must be >= 0, got {self.checkpoint.interval}")
        _positive("checkpoint.keep", self.checkpoint.keep)
        _positive("log.interval", self.log.interval)
        _positive("log.expert_load_interval", self.log.expert_load_interval)
        p = self.log.peak_flops
        if isinstance(p, str) and p != "auto" or isinstance(p, (int, float)) and not p > 0:
            raise ValueError(f"log.peak_flops must be 'auto', null or a positive number, got {p!r}")
        for flag, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
            if getattr(self.log, flag) and importlib.util.find_spec(module) is None:
                raise ValueError(f"log.{flag} is true but {module} is not installed (`pip install {module}`)")
        self._validate_sample()
        if self.model.checkpoint is None:
            from dbrx.config import PRESETS

            _choice("model.preset", self.model.preset, tuple(PRESETS))
        elif self.model.overrides:
            raise ValueError("model.overrides apply to a preset, not to model.checkpoint")
        self._validate_data(task)
        if self.lora is not None:
            self.lora.validate()
            if self.model.checkpoint is None:
                raise ValueError("lora: LoRA adapts a trained model; set model.checkpoint (--model DIR)")

    def _validate_sample(self) -> None:
        s = self.sample
        if not isinstance(s.prompt, str):
            raise ValueError(f"sample.prompt must be a string, got {s.prompt!r}")
        _positive("sample.max_new_tokens", s.max_new_tokens)
        if isinstance(s.temperature, bool) or not isinstance(s.temperature, (int, float)) or not s.temperature >= 0:
            raise ValueError(f"sample.temperature must be a number >= 0, got {s.temperature!r}")
        if s.top_k is not None:
            _positive("sample.top_k", s.top_k)

    def _validate_data(self, task: str) -> None:
        d = self.data
        if task == "finetune":
            if not d.sft:
                raise ValueError("data.sft: fine-tuning needs at least one chat JSONL file (--data)")
            return
        if not d.streams:
            raise ValueError("data.streams: pre-training needs at least one data stream")
        for name, s in d.streams.items():
            if bool(s.paths) == bool(s.prepared):
                raise ValueError(f"data.streams.{name}: give either paths or prepared (a `dbrx prepare` directory)")
            _choice(f"data.streams.{name}.format", s.format, ("auto", "text", "jsonl", "parquet"))
        if d.schedule:
            from .data import MixtureSchedule

            try:
                MixtureSchedule(d.schedule, list(d.streams))
            except ValueError as e:
                raise ValueError(f"data.{e}") from None


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_finite(obj: Any, where: str = "") -> None:
    """Every float of the dataclass `obj`, of its sections and of its lists of floats, must be finite."""
    for f in dataclasses.fields(obj):
        name, value = where + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{name}.")
        for x in value if isinstance(value, list) else [value]:
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"{name} must be a finite number, got {value}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# ---- dict -> dataclasses, with type checks ------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (recursively) and build dataclasses from mappings."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # an optional section: its own errors name the field
            return _convert(sections[0], value, where)
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ValueError:
                pass
        allowed = " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
        raise ValueError(f"{where} must be {allowed}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ValueError(f"{where} must be a {tp.__name__}, got {value!r}")
        return value
    raise AssertionError(f"unhandled annotation {tp} at {where}")


def from_dict(cls: type, d: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ValueError naming the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for key in d:
        if key not in names:
            raise ValueError(f"unknown config key {prefix}{key} (known: {', '.join(sorted(names))})")
    return cls(**{k: _convert(hints[k], v, f"{prefix}{k}") for k, v in d.items()})


# ---- files and overrides ------------------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """['optim.lr=1e-3'] -> [(['optim', 'lr'], 0.001)]; values as `dbrx.config.parse_value` reads them."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            out.append((key.split("."), parse_value(text)))
        except ValueError as e:
            raise ValueError(f"override {item!r}: {e}") from None
    return out


def apply_overrides(raw: dict[str, Any], items: list[str]) -> dict[str, Any]:
    for path, value in parse_overrides(items):
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or the name of a packaged config (`pretrain-demo`, `finetune-demo`)."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = CONFIG_DIR / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config file {name} not found (packaged configs: {known})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_config_path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({yaml_problem(e)})") from None
    except (ValueError, KeyError, AttributeError) as e:  # PyYAML's reply to a bad explicit tag: `!!int x`
        raise ValueError(f"{path}: invalid YAML ({type(e).__name__}: {e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the config must be a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                default: str = "pretrain-demo") -> TrainConfig:
    """Read a YAML config (default: a packaged one), apply `key=value` overrides, map to TrainConfig."""
    raw = load_yaml(path or default)
    apply_overrides(raw, overrides or [])
    source = str(path or default)
    try:
        return from_dict(TrainConfig, raw)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def resolve_path(p: str) -> Path:
    """`pkg:data/corpus/text` -> a path inside the installed package; other paths as given."""
    return PACKAGE_DIR / p[4:] if p.startswith("pkg:") else Path(p).expanduser()


__all__ = [
    "TrainConfig", "ModelSection", "StreamSection", "DataSection", "TrainSection", "OptimSection", "EvalSection",
    "CheckpointSection", "LogSection", "SampleSection", "load_config", "from_dict", "apply_overrides",
    "parse_overrides", "resolve_path", "resolve_config_path",
]
