# `make test` and `make demo` work on a fresh clone: each creates the virtual environment it needs.
PY := .venv/bin/python
DEMO_DIR ?= runs/demo

.venv/.installed: requirements.txt pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps -e .
	touch $@

.PHONY: test demo
test: .venv/.installed
	$(PY) -m pytest -q -n 2

demo: .venv/.installed
	$(PY) -m proma_jax.demo --workdir=$(DEMO_DIR)
