# craterlab: `make run` runs the default experiment, `make test` runs lint + docs build + tests.
# Both set up .venv from scratch first (torch pinned to the build this machine has on disk).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test test-slow bench lint docs format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/python -m craterlab $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint docs
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf outputs site
