# osvai-repro: two commands do all the set-up.
#   make test                  create .venv, install the project, run the test suite (what CI runs)
#   make test-slow             the longer real-data checks and multi-seed runs (marked slow)
#   make reproduce-<paper>     install if needed, run the paper's main job, print paper vs ours
# Other targets: install, bench-<paper>, smoke, report, lint, clean-venv.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PAPERS := scalekd kernelwarehouse ssdkd noah afdcd ske2grid norm pste_bnn gridconv
# Extra key=value arguments, read the same way by every paper (common.cli; see common/README.md), e.g.
#   make reproduce-norm ARGS="data.root=/data/cifar100 seeds=0,1,2"   make bench-kernelwarehouse ARGS="threads=1"
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install test test-slow lint report smoke clean-venv $(addprefix reproduce-,$(PAPERS)) $(addprefix bench-,$(PAPERS))

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The default suite leaves out tests marked slow (real-data mini reproductions, multi-seed smoke orderings):
# they take minutes each on a 2-core machine; `make test-slow` runs them.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

report: $(STAMP)
	$(PY) -m common.report

# Each paper's embedded default run; a paper not built yet says so and fails.
$(addprefix reproduce-,$(PAPERS)): reproduce-%: $(STAMP)
	@if [ -f $*/reproduce.py ]; then $(PY) -m $*.reproduce $(ARGS); \
	else echo "$*: not built yet (no $*/reproduce.py); see README.md for the status of each paper"; exit 1; fi

$(addprefix bench-,$(PAPERS)): bench-%: $(STAMP)
	@if [ -f $*/bench.py ]; then $(PY) -m $*.bench $(ARGS); \
	else echo "$*: no benchmark yet (no $*/bench.py)"; exit 1; fi

# The smoke profile of every built paper, one after the other.
smoke: $(STAMP)
	@for p in $(PAPERS); do if [ -f $$p/reproduce.py ]; then echo "== $$p"; $(PY) -m $$p.reproduce || exit 1; fi; done

clean-venv:
	rm -rf $(VENV)
