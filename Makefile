# Two commands on a fresh machine (Python >= 3.11):
#   make demo   set up .venv, run the embedded offline default
#   make test   set up .venv with the test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo

COMPARE ?= workdir/compare
VARIANTS ?= mae,siamese,rmae,cmae
SEEDS ?= 1
RESULTS ?= workdir/results

.PHONY: demo compare results test bench parity golden clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m mimjax.main --config=configs/demo.py --workdir=$(WORKDIR)

# The paper's comparison in small: each variant pre-trained, fine-tuned and
# probed as in the demo (SEEDS seeds), then occlusion invariance and CKA of
# all their encoders; tables in $(COMPARE)/results.md.
compare: $(VENV)/.installed
	$(BIN)/python -m mimjax.tools.results --runs=$(COMPARE) --out=$(COMPARE) \
	  --variants=$(VARIANTS) --photos= --seeds=$(SEEDS)

# The small-scale reproduction behind docs/results.md: every variant of the
# transform x similarity matrix, one-image pre-training on three photos,
# random-init baselines, 3 seeds. QUICK=1: one seed, short runs, written to
# $(RESULTS)_quick/results.md (a smoke run; docs/results.md is left alone).
results: $(VENV)/.installed
	$(BIN)/python -m mimjax.tools.results $(if $(QUICK),--quick \
	  --runs=$(RESULTS)_quick --out=$(RESULTS)_quick,--runs=$(RESULTS) --out=docs)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

# The real ViT-B/16 (and, off CPU, ViT-L/16) train steps: img/s, compile
# time, memory, FLOPs/MFU, the input pipeline, and a PyTorch (HF) peer when
# torch and transformers are installed (`make parity` installs them).
# BENCH_ARGS: e.g. --batch=64 --out=bench.json, or --quick for a smoke run.
# MIMJAX_HUGE_PAGES=1: the CPU step's host buffers in huge pages
# (mimjax/host_memory.py), as docs/performance.md measured; 0: without.
MIMJAX_HUGE_PAGES ?= 1
bench: $(VENV)/.installed
	MIMJAX_HUGE_PAGES=$(MIMJAX_HUGE_PAGES) $(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# Reference implementations (CPU torch from the local wheel, transformers,
# timm) for the live parity tests and for regenerating golden files.
$(VENV)/.parity: $(VENV)/.installed
	$(BIN)/pip install -q torch==2.13.0 transformers
	touch $@

parity: $(VENV)/.parity
	$(BIN)/python -m pytest -q tests/test_parity.py tests/test_step_parity.py \
	  tests/test_torch_io.py

golden: $(VENV)/.parity
	$(BIN)/python tests/golden/make_golden.py

clean:
	rm -rf $(VENV) workdir
