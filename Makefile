# One-line entry points for a fresh machine. Each installs what it needs first, once:
#   make demo    generate the shapes set and run the R-CNN pipeline on it (CPU)
#   make timing  the same data, then `rcnn timing-table`: R-CNN, SPP-net, Fast and Faster R-CNN compared
#   make segmentation  a 2 000-image shapes set, then `rcnn run --methods fcn`: FCN and the sliding-window segmentation baseline
#   make localize      a single-object shapes set, then `rcnn localize`: classification + localization
#   make test    the linter (ruff), then the test suite (the slow end-to-end tests included)
#   make bench   print the benchmark tables
# Override TORCH to install another torch build, e.g. make demo TORCH="torch torchvision".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: demo timing segmentation localize test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,photos]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/rcnn data shapes --out data/shapes --images 400 --seed 0
	$(BIN)/rcnn run --config demo

timing: $(VENV)/.installed
	$(BIN)/rcnn data shapes --out data/shapes --images 400 --seed 0
	$(BIN)/rcnn timing-table --config demo

segmentation: $(VENV)/.installed
	$(BIN)/rcnn data shapes --out data/shapes-seg --images 2000 --seed 0
	$(BIN)/rcnn run --methods fcn --config demo --data data/shapes-seg

localize: $(VENV)/.installed
	$(BIN)/rcnn data shapes --single-object --out data/shapes-single --images 2000 --seed 0
	$(BIN)/rcnn localize --config demo --data data/shapes-single

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python bench/scale_out.py
