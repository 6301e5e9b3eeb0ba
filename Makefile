# Two commands do everything: `make demo` (the headline benchmark) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/robustness_demo
TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8
# Test worker processes (pytest-xdist); 0 runs the suite in this process.
TEST_WORKERS ?= 2

.PHONY: install demo train-demo test format bench clean

$(VENV)/.installed: requirements.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@# The repository on the venv's path (what an editable install does, minus setuptools' banners).
	$(PY) -c 'import sysconfig; open(sysconfig.get_paths()["purelib"] + "/roclip_jax_repo.pth", "w").write("$(CURDIR)\n")'
	touch $@

install: $(VENV)/.installed

# CLIP vs RoCLIP, SafeCLIP and CleanCLIP on the same poisoned demo data; prints the results table.
demo: install
	$(PY) -m roclip_jax.experiments.robustness --config=configs/robustness_demo.py --workdir=$(WORKDIR)

# One plain training run of the demo config.
train-demo: install
	$(PY) -m roclip_jax.main --config=configs/demo.py --workdir=workdirs/demo

# Test-only extras (torch, the reference of the weight-import parity tests).
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

test: install $(VENV)/.installed-test
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The one formatter (pyproject.toml [tool.pyink]); tests/test_formatting.py checks the result.
format: $(VENV)/.installed-test
	$(PY) -m pyink .

clean:
	rm -rf workdirs .pytest_cache .cache
