# Two entry points for a fresh machine: `make run` (default workflow) and `make test`.
# Each creates the virtual environment with pip on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
# torch and torchvision are pinned together: the pair is served from local disk on our
# build machines and torchvision must match torch's ABI. The pins are pyproject.toml's.
TORCH_PINS ?= $(shell sed -nE 's/^ *"(torch(vision)?==[^"]+)",?$$/\1/p' pyproject.toml)

.PHONY: run test lint format report clean venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[test]' $(TORCH_PINS)
	touch $@

run: venv
	$(BIN)/snakemake --cores $(CORES)

report: run
	$(BIN)/snakemake --report results/report.html

test: venv
	$(BIN)/pytest -q tests

lint: venv
	$(BIN)/ruff check src tests bench workflow/scripts
	$(BIN)/ruff format --check src tests bench workflow/scripts
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

format: venv
	$(BIN)/ruff format src tests bench workflow/scripts
	$(BIN)/snakefmt Snakefile workflow/rules

clean:
	rm -rf results .snakemake
