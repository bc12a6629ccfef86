"""Megatron-Core `torch_dist` folders, as the trainer adapter choice sees them: the folder's recognition is the
source flavor's (`source/flavors/megatron.py`); the weights' names and layouts are the `megatron-gpt` adapter's
business (`formats.MEGATRON_GPT`)."""
from ...source.flavors.megatron import COMMON_FILE, METADATA_JSON, TORCH_DIST, MegatronFolder, recognise

__all__ = ["COMMON_FILE", "METADATA_JSON", "TORCH_DIST", "MegatronFolder", "recognise"]
