"""`make demo`: write a real FSDP2 checkpoint with torch's own writer, convert it, verify it, print the report.

    python -m streamconv.demo --workdir /tmp/streamconv-demo

The conversion runs as the `streamconv` CLI in its own process (so its peak RSS is the converter's, without
torch); verification imports torch and compares every tensor with torch's own `dcp_to_torch_save`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import click


def _verify_against_torch(ckpt_dir: str, out_dir: str) -> dict:
    """Every converted tensor equals torch's reconstruction bit for bit; nothing of the model is missing."""
    import torch
    from safetensors import safe_open
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "ref.pt")
        dcp_to_torch_save(ckpt_dir, ref_path)
        ref = torch.load(ref_path, weights_only=False)["model"]   # our own file, written just above
    files = [f for f in sorted(os.listdir(out_dir)) if f.endswith(".safetensors")]
    seen = {}
    for name in files:
        with safe_open(os.path.join(out_dir, name), framework="pt") as f:
            for key in f.keys():
                seen[key] = f.get_tensor(key)
    mismatched = [k for k, v in seen.items()
                  if k not in ref or v.dtype != ref[k].dtype or v.shape != ref[k].shape
                  or not torch.equal(v.view(torch.uint8) if v.dim() else v, ref[k].view(torch.uint8) if v.dim()
                                     else ref[k])]
    missing = sorted(set(ref) - set(seen))
    return {"tensors_compared": len(seen), "mismatched": mismatched, "missing": missing,
            "bytes_compared": sum(v.numel() * v.element_size() for v in seen.values())}


def _load_with_transformers(out_dir: str) -> str:
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        return "skipped (no config.json in the output)"
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()     # its "Loading weights" bar landed on the report's first line
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return f"loaded {type(model).__name__}, logits {tuple(logits.shape)} finite={bool(torch.isfinite(logits).all())}"


@click.command()
@click.option("--workdir", default=os.path.join(tempfile.gettempdir(), "streamconv-demo"), show_default=True,
              help="Folder for the demo checkpoint and its conversion (replaced on each run).")
@click.option("--world-size", default=4, show_default=True, help="Ranks that write the checkpoint.")
def main(workdir: str, world_size: int) -> None:
    """Write a demo FSDP2 checkpoint, convert it with streamconv, verify it against torch."""
    from .demo_checkpoint import write_demo_checkpoint

    shutil.rmtree(workdir, ignore_errors=True)
    ckpt_dir = os.path.join(workdir, "ckpt")
    out_dir = os.path.join(workdir, "hf_model")
    click.echo(f"1/3 writing a tiny Llama FSDP2 checkpoint with torch.distributed.checkpoint across "
               f"{world_size} gloo processes -> {ckpt_dir}")
    demo = write_demo_checkpoint(ckpt_dir, world_size=world_size)
    click.echo(f"    {demo.num_tensors} entries (model + optimizer) in {demo.seconds:.1f} s")

    click.echo(f"2/3 streamconv convert {ckpt_dir} {out_dir} --verify")
    cmd = [sys.executable, "-m", "streamconv.cli", "convert", ckpt_dir, out_dir, "--json", "--verify"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        click.echo(proc.stderr, err=True)
        raise SystemExit(f"conversion failed with exit code {proc.returncode}")
    report = json.loads(proc.stdout)
    report["wall_seconds_including_startup"] = round(time.perf_counter() - started, 3)

    click.echo("3/3 verifying against torch.distributed.checkpoint.format_utils.dcp_to_torch_save")
    check = _verify_against_torch(ckpt_dir, out_dir)
    report["verification"] = check
    report["transformers"] = _load_with_transformers(out_dir)
    click.echo(json.dumps(report, indent=2))
    if check["mismatched"] or check["missing"]:
        raise SystemExit("verification FAILED: see 'mismatched' / 'missing' above")
    click.echo(f"OK: {check['tensors_compared']} tensors ({check['bytes_compared']} bytes) identical to torch's "
               f"reconstruction; converter peak RSS {report['peak_rss_bytes'] / 2**20:.1f} MiB; "
               f"output in {out_dir}")


if __name__ == "__main__":
    main()
