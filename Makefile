# Two entry points on a fresh machine: `make demo` and `make test`.
# Both build .venv with the packages they need; a changed pyproject.toml triggers a reinstall.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,demo]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/slidemil run configs/demo.yaml

lint: $(BIN)/.installed
	$(BIN)/ruff check cli mil preprocessing tests benchmarks
	$(BIN)/mypy preprocessing mil cli

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) demo-output
