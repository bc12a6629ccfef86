"""Hugging Face readiness: config and tokenizer beside the weights, the reference's names, tied embeddings.

* `sidecars` — find the base model's folder (--config-from, train_params.yaml, local HF cache), copy its
  config/tokenizer/processor files, set config.json's dtype.
* `layouts`  — per-architecture name mappings as data, chosen by matching the reference folder's names.
* `tied`     — which head a tied config drops, and a streaming check that it equals the embedding.
* `verdict`  — the output's names and shapes against the reference's weights: a mismatch fails before writing.
* `expected` — with a config-only base folder, the names and shapes that config's model loads (`tables`: Llama as
  data; `meta_probe`: transformers on the meta device in a child process, `meta_model`), held to the same rule.
* `prepare`  — the above turned into `PlanOptions` before planning.
"""
from . import sidecars, tied
from .prepare import HFSetup, config_dtype, prepare, compare_with_reference

# (`layouts`, `verdict` and `expected` are imported where a base model asks for them: not at every conversion's
# start-up)
__all__ = ["sidecars", "tied", "HFSetup", "config_dtype", "prepare", "compare_with_reference"]
