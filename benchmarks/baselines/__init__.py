"""The baselines streamconv is compared with, each a script run as its own process:

* `dcp_to_torch_save` - torch's `format_utils.dcp_to_torch_save`, then safetensors `save_file`.
* `cookbook` - the llama-cookbook way: allocate every model tensor, `dcp.load(..., no_dist=True)`, save.

Both write the same sharded layout as streamconv (`model-0000i-of-0000N.safetensors` + index, 5 GB
shards) through `common.save_sharded`, so outputs can be compared name by name.
"""
