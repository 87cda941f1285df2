"""`dbrx finetune`: chat JSONL from a Hugging Face checkpoint, loss on assistant tokens only, LionW."""

from __future__ import annotations

import json

import torch
from test_trainer import step_records, train

from dbrx.config import DbrxConfig
from dbrx.model import DbrxForCausalLM
from dbrx.tokenizer import get_tokenizer
from dbrx.train.config import TrainConfig, from_dict

CHATS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What do bees make?", "Bees make honey."),
]


def test_finetune_learns_assistant_tokens_only(tmp_path):
    hf = tmp_path / "base"
    cfg = DbrxConfig.from_preset("dbrx-tiny", d_model=32, ffn_hidden_size=64)
    DbrxForCausalLM.from_config(cfg, seed=0).save_pretrained(hf)
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for _ in range(4):
            for q, a in CHATS:
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}]}) + "\n")
            f.write(json.dumps({"prompt": CHATS[0][0], "response": CHATS[0][1]}) + "\n")

    tc = from_dict(TrainConfig, {
        "run_dir": str(tmp_path / "run"),
        "model": {"checkpoint": str(hf)},
        "data": {"sft": [str(data)], "system_prompt": None},
        "train": {"steps": 16, "global_batch": 4, "micro_batch": 2, "seq_len": 64, "num_threads": 1},
        "optim": {"name": "lionw", "lr": 1e-2, "schedule": "constant", "betas": [0.9, 0.99], "weight_decay": 0.0,
                  "warmup_steps": 2},
        "log": {"interval": 8, "peak_flops": None},
        "checkpoint": {"interval": 8, "keep": 1},
        "sample": {"prompt": CHATS[2][0], "max_new_tokens": 8, "temperature": 0.0},
    })
    trainer, summary = train(tc, task="finetune")
    lm = [r["lm_loss"] for r in step_records(tc.run_dir)]
    assert len(lm) == 16 and lm[-1] < 0.5 * lm[0]  # the replies are being learned

    # labels: only assistant replies (and their closing <|im_end|>) carry loss
    tok = get_tokenizer()
    batch = trainer.loader.batch(trainer.loader.step)
    labels = batch["labels"]
    assert 0 < (labels != -100).sum() < labels.numel()
    for row in labels:
        targets = tok.decode([int(t) for t in row if t != -100])
        assert any(a in targets for _, a in CHATS)
        assert not any(q in targets for q, _ in CHATS)
        assert "user" not in targets and "<|im_start|>" not in targets
    # the fine-tuned model is exported in the Hugging Face layout and replies to a chat prompt
    out = trainer.export()
    model = DbrxForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.d_model == 32
    assert trainer.sample().strip()
