# Two commands are the contract (see README): `make demo` and `make test`.
# torch is installed FIRST and pinned: any other spec can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN := torch==2.13.0
# Where torch comes from. Empty: pip's configured index (PyPI by default, whose Linux wheel is the CUDA build and
# pulls several GB of CUDA libraries). For a CPU-only machine: make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
DEMO_DIR ?= /tmp/streamconv-demo

.PHONY: install demo test test-slow test-no-fast-paths test-trainers test-megatron bench bench-full bench-full-fp32 bench-moe bench-moe-full clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_INDEX) $(TORCH_PIN)
	# -qq: setuptools' "Editable installation" notice (printed by every pip >= 24 at -q) is not for users;
	# errors still show.
	$(PIP) install -qq -e '.[test,bench,demo]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m streamconv.demo --workdir $(DEMO_DIR)

test: install
	$(PY) -m pytest -q -x --durations=10 -m "not trainers and not megatron and not slow" tests

# The long runs `make test` leaves out (marker `slow`; each behaviour they check keeps a fast test in `make test`):
# the wheel on 3.9 with the oldest dependencies, the 20 MB metadata memory runs of the genuine file and of three of
# the six hostile shapes, a source failing 503 for good through every retry, the commit-protocol kill cases the
# rename fallback shares with renameat2, the remote byte-for-byte conversion of tp, a 256 MiB conversion into s3://
# held to issue 21's memory bound (tests/memory/test_upload_memory.py), the benchmark harness on tiny,
# README's install block (`pip install .`, two builds; tests/test_packaging.py installs the wheel in `make test`),
# `make demo`'s command as written (tests/test_demo.py runs the demo on the session's checkpoint in `make test`).
test-slow: install
	$(PY) -m pytest -q -x --durations=10 -m "slow and not trainers and not megatron" tests

# The whole suite once more with every fast IO path (copy_file_range, preadv, posix_fadvise, renameat2) forced off.
# `make test` already converts every layout that way (tests/fs/test_fastpaths.py); this runs everything else too.
test-no-fast-paths: install
	STREAMCONV_NO_FAST_PATHS=1 $(PY) -m pytest -q -x --durations=10 -m "not trainers and not megatron" tests

# The trainers' own model classes (torchtitan 0.3, torchtune 0.6) building real checkpoints (~1 min). Installed with
# --no-deps: only what their model code imports (their dataset/tokenizer stacks are not needed; see
# tests/support/trainer_writers.py for the shims).
TRAINER_PKGS := torchtitan==0.3.0 spmd_types==0.2.3 torch_checkpointing==0.1.1 tyro docstring_parser typeguard \
	shtab einops torchtune==0.6.1 torchao==0.10.0 omegaconf sentencepiece tiktoken torchdata==0.11.0
test-trainers: install
	$(PIP) install -q --no-deps $(TRAINER_PKGS)
	$(PY) -m pytest -q -x --durations=10 -m trainers tests

# megatron-core itself (GPTModel, dist_checkpointing.save) on CPU gloo ranks, TP 1 and 2 (~2 min). Its only
# runtime dependencies (torch, numpy, packaging) are already installed.
test-megatron: install
	$(PIP) install -q --no-deps megatron-core==0.16.1
	$(PY) -m pytest -q -x --durations=10 -m megatron tests

# Cold-cache numbers need the page cache dropped before each contender, which empties it for the whole machine
# (and needs root): only when asked, `make bench DROP_CACHES=1`.
DROP_CACHES ?=
BENCH_CACHES := $(if $(DROP_CACHES),--drop-caches,--no-drop-caches)

bench: install
	@echo "page cache: $(if $(DROP_CACHES),dropped before each contender (DROP_CACHES=1),left warm (make bench DROP_CACHES=1 drops it before each contender: root, whole machine))"
	$(PY) -m benchmarks.run --preset 2gb --out benchmarks/results $(BENCH_CACHES)

bench-full: install
	$(PY) -m benchmarks.run --preset llama-3.2-11b-vision --dtype bfloat16 --out benchmarks/results $(BENCH_CACHES)

# torchtitan Qwen3-MoE (2.75 GB bf16, 128 experts a layer): the grouped experts unstacked per expert, beside the dense
# path of the same bytes (--source-format hf) and cp -r (issue 19.5). A few minutes on 2 cores.
bench-moe: install
	$(PY) -m benchmarks.run --preset qwen3-moe-3gb --dtype bfloat16 --out benchmarks/results $(BENCH_CACHES)

# The real Qwen3-30B-A3B shape (61 GB bf16, 48 layers): for a 16-core host with ~200 GB free.
bench-moe-full: install
	$(PY) -m benchmarks.run --preset qwen3-30b-a3b --dtype bfloat16 --out benchmarks/results $(BENCH_CACHES)

# HuggingFaceStorageWriter per-rank shards (~440 MB, 4 gloo ranks): streamconv against torch's consolidator.
.PHONY: bench-hf-shards
bench-hf-shards: install
	$(PY) -m benchmarks.hf_shards --ranks 4 --layers 2 --runs 3

# Issue 21: the 2gb preset converted from a local S3 server vs a parallel boto3 download of it (docs/remote.md).
.PHONY: bench-remote
bench-remote: install
	$(PY) -m benchmarks.remote --preset 2gb --repeat 2 --fallback

# 43 GB checkpoint + 21 GB bf16 output: needs ~70 GB free (delete the bf16 preset from benchmarks/.cache first).
bench-full-fp32: install
	$(PY) -m benchmarks.run --preset llama-3.2-11b-vision --dtype float32 --out benchmarks/results $(BENCH_CACHES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Fuzz the readers with thousands of mutated real .metadata pickles and torch.save blobs (tests/hostile/test_fuzz.py,
# ~2 min for 5000); the hostile-input table (peak RSS, time) is `$(PY) tests/support/hostile_report.py`.
.PHONY: fuzz
FUZZ_EXAMPLES ?= 5000
fuzz: install
	STREAMCONV_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:logging tests/hostile/test_fuzz.py
