# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo compare test test-slow bench lint fmt clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,data]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

compare: $(STAMP)
	$(BIN)/spvit-dsl compare examples/compare_digits.vit --seeds 3 --out runs/compare_digits
	mkdir -p bench/results && for f in json md png; do cp runs/compare_digits/compare.$$f bench/results/compare-digits.$$f; done

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -o timeout=0  # minutes a test: no per-test hang guard

bench: $(STAMP)
	$(BIN)/python bench/compile.py

lint: $(STAMP)
	$(BIN)/ruff check spvit_dsl tests bench examples
	$(BIN)/ruff format --check spvit_dsl tests bench examples
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format spvit_dsl tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
