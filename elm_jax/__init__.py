"""elm_jax: Expert Language Models (Jang et al., 2023) in JAX/Flax.

The Python API is the module `elm_jax.api` (`from elm_jax import api`; `import elm_jax` alone
loads no JAX, so `elm-jax --help` starts at once).
The workflow, each step the same code as its `elm-jax` command (docs/API.md has every function
with an example; `help(elm_jax.api)` the whole walk):

    from elm_jax import api
    api.runtime()                                      # backend and device count
    backbone = api.build_backbone("/tmp/qs/backbone", api.model_config("models/t5_1_1_mini.gin"))
    api.train_experts("/tmp/qs/run", ["builtin_sentiment_is_positive"], steps=50, backbone=backbone)
    api.add_experts("/tmp/qs/lib", ["/tmp/qs/run"])                       # library add
    scores = api.score("/tmp/qs/lib", api.task_examples("builtin_nli_can_we_infer_score_eval"))
    chosen = api.select_experts("/tmp/qs/lib", task="builtin_nli_can_we_infer_score_eval")  # retrieve
    api.merge("/tmp/qs/lib", chosen, "top2", top_k=2)                     # merge
    api.evaluate("/tmp/qs/lib", "builtin_held_out", max_examples=32).rows # eval, as a table

notebooks/quickstart.ipynb runs this on any runtime; notebooks/library_at_scale.ipynb runs the
paper's workflow on a library kept on Drive or in a bucket.
"""

__version__ = "0.1.0"

