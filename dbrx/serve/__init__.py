"""The serving engine: paged KV-cache blocks with prefix caching, a continuous-batching scheduler, the engine loop.

Imports: dbrx.model, dbrx.tokens, dbrx.sampling (SamplingParams); never dbrx.generate, dbrx.train or dbrx.cli
(dbrx.generate is a client of this engine).
"""
