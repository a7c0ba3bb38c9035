# Two commands for a fresh machine:  `make serve`  and  `make test`.
VENV ?= .venv
HONE := $(VENV)/bin/hone

.PHONY: setup serve test test-unit bench clean
setup: $(VENV)/.hone-installed

$(VENV)/.hone-installed: pyproject.toml scripts/install.sh constraints/cpu.txt constraints/gpu.txt
	VENV=$(VENV) bash scripts/install.sh
	touch $@

serve: setup
	$(HONE) serve

test: setup
	$(VENV)/bin/python -m pytest -q

test-unit: setup
	$(VENV)/bin/python -m pytest -q -m "not integration"

bench: setup
	$(VENV)/bin/python bench/serving.py

clean:
	rm -rf $(VENV) .pytest_cache .hone-test
