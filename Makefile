# Two commands on a fresh machine (Python >= 3.11):
#   make demo   set up .venv, run the embedded offline default
#   make test   set up .venv with the test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo

COMPARE ?= workdir/compare
VARIANTS ?= mae siamese rmae cmae

.PHONY: demo compare test bench parity golden clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m mimjax.main --config=configs/demo.py --workdir=$(WORKDIR)

# The paper's comparison in small: each objective pre-trained and fine-tuned
# as in the demo, then occlusion invariance and CKA of all their encoders.
compare: $(VENV)/.installed
	set -e; for v in $(VARIANTS); do \
	  $(BIN)/python -m mimjax.main --config=configs/demo.py:$$v \
	    --workdir=$(COMPARE)/$$v --config.linprobe.enabled=False \
	    --config.finetune.scratch_baseline=False --config.analyze.enabled=False; \
	done
	$(BIN)/python -m mimjax.main --config=configs/demo.py --config.mode=analyze \
	  --workdir=$(COMPARE) --config.analyze.encoders="$(foreach v,$(VARIANTS),$(v)=$(COMPARE)/$(v)/pretrain/checkpoints,)random=random"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/run.py

# Reference implementations (CPU torch from the local wheel, transformers,
# timm) for the live parity tests and for regenerating golden files.
$(VENV)/.parity: $(VENV)/.installed
	$(BIN)/pip install -q torch==2.13.0 transformers
	touch $@

parity: $(VENV)/.parity
	$(BIN)/python -m pytest -q tests/test_parity.py tests/test_torch_io.py

golden: $(VENV)/.parity
	$(BIN)/python tests/golden/make_golden.py

clean:
	rm -rf $(VENV) workdir
