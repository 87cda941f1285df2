"""The serving engine: paged KV-cache blocks with prefix caching, a continuous-batching scheduler, the engine loop.

Imports: dbrx.model, dbrx.tokens, dbrx.generate's sampling helpers; never dbrx.train or dbrx.cli.
"""
