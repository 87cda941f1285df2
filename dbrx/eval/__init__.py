"""Evaluation: scoring primitives on the model, in-context-learning tasks in llm-foundry's formats, Gauntlet scoring.

    scoring.py   continuation log-likelihoods (batched, shared contexts), rolling log-likelihood, generation
    icl.py       ICL task types read from JSONL, few-shot prompts, a YAML list of tasks, running them
    gauntlet.py  baseline-rescaled accuracies per category, results JSON, table, bar chart, comparison
    code.py      HumanEval and sandboxed execution of generated code
    harness.py   the lm-evaluation-harness adapter

Imports: dbrx.model, dbrx.loading (float or quantized checkpoints), dbrx.tokens, dbrx.tokenizer, dbrx.sampling
(SamplingParams), dbrx.serve.engine (generation); never dbrx.train or dbrx.cli (the trainer and the CLI import
this package).
"""
