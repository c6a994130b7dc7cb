PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench completions clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

DEMO_PROMPT ?= a landscape at daytime with the sun above green grass

# Renders one image from the embedded default: experts.yaml at the root, the demo shipped in the package
# as mixdiff_cli/data/demo (rebuild it with scripts/build_demo). Prints the image's path.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/mixdiff generate "$(DEMO_PROMPT)" --catalog experts.yaml --seed 0 --out build/demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

completions: $(STAMP)
	$(BIN)/python -m mixdiff_cli.cli.completions completions/

clean:
	rm -rf $(VENV) build .pytest_cache
