# One command starts the app, one runs the tests. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint bench-engine bench-upload clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m app.launcher

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-engine: $(STAMP)
	$(VENV)/bin/python bench/engine.py

bench-upload: $(STAMP)
	$(VENV)/bin/python bench/upload.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
