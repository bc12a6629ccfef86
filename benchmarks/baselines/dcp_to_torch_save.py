"""Baseline: torch's own converter, then safetensors.

    python -m benchmarks.baselines.dcp_to_torch_save CHECKPOINT_DIR OUTPUT_DIR

`dcp_to_torch_save` loads the whole checkpoint (optimizer state included) into RAM and
`torch.save`s it as one file; we load that file as a user would and write the model weights as
sharded safetensors. The intermediate `.pt` is deleted at the end.
"""
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from .common import save_sharded, select_model_state_dict


def main(ckpt: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "consolidated.pt"
    dcp_to_torch_save(ckpt, tmp)
    state_dict = torch.load(tmp, weights_only=True)
    save_sharded(select_model_state_dict(state_dict), out_dir)
    tmp.unlink()


if __name__ == "__main__":
    main(*sys.argv[1:3])
