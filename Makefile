# The README's commands. Each creates the virtual environment and builds mtlfast if needed.
#   make demo   install everything, then the main job: train the `synthetic` config (MTI-Net on
#               the embedded scenes, 6 tasks) on the CPU and print the per-task table
#   make test   install everything, then run the whole test suite
#   make lint   ruff check and ruff format --check over the whole tree (CI runs it first)
#   make bench  install everything, then run the full benchmark suites, each in its own process
#               (one suite's heap slowed the next one's largest cases up to 2.8x), and save
#               their JSON in BENCH_DIR (and the engine's memory_vs_tasks.{json,png} next to it)
#   make bench-quick   the op and engine suites in quick mode, with their report
#   make triton-aot    compile every Triton kernel specialization the launchers produce for sm_90
#               (no GPU needed) and save registers and spills in benchmarks/results/triton_aot.json

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel here; installing the project without build isolation keeps
# pip from ever pulling another (CUDA) torch to build against.
DEPS := torch==2.13.0 numpy scipy pillow scikit-image ninja "setuptools>=64" wheel triton pytest pytest-benchmark hypothesis ruff==0.17.6 matplotlib pyyaml tqdm tensorboard
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*/*.cpp csrc/*/*.h csrc/*/*/*.h kernels/*.cu kernels/*.cuh)
BENCH_DIR ?= /tmp/mtlfast-bench
DEMO_DIR ?= runs/demo
# bench_trainer.py is a script (the whole trainer, minutes), not a pytest-benchmark suite
SUITES := $(filter-out benchmarks/bench_trainer.py,$(wildcard benchmarks/bench_*.py))
# glibc malloc pinned for the benchmarks: NAME=VALUE words from their one definition,
# benchmarks/malloc_env.py (standard library only: any python3 runs it, before the venv exists)
MALLOC_ENV = $(shell $(PYTHON) benchmarks/malloc_env.py)

.PHONY: install lint demo test bench bench-quick triton-aot clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation -e .
	touch $@

install: $(VENV)/.built

# ruff with the pyproject's settings, lint and format, over the whole tree (Python and Markdown)
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install
	MTLFAST_REQUIRE_BACKENDS=cpu,triton $(PY) -m pytest tests -q

demo: install
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/mtlfast train synthetic --out $(DEMO_DIR)

bench-quick: install
	$(MALLOC_ENV) MTLFAST_BENCH_QUICK=1 $(PY) -m pytest $(SUITES) -q --benchmark-json=/tmp/mtlfast-bench-quick.json
	$(PY) benchmarks/report.py /tmp/mtlfast-bench-quick.json

bench: install
	mkdir -p $(BENCH_DIR)
	for suite in $(SUITES); do \
	  $(MALLOC_ENV) $(PY) -m pytest $$suite -q --benchmark-json=$(BENCH_DIR)/$$(basename $$suite .py).json || exit 1; \
	done
	$(PY) benchmarks/report.py $(patsubst benchmarks/%.py,$(BENCH_DIR)/%.json,$(SUITES))
	$(PY) benchmarks/bench_engine.py --plot $(BENCH_DIR)/bench_engine.json
	$(PY) benchmarks/bench_trainer.py --out $(BENCH_DIR)/bench_trainer.json

triton-aot: install
	$(PY) -m tests.ops.test_triton_aot --sweep full --jobs 2 --out benchmarks/results/triton_aot.json

clean:
	rm -rf build *.egg-info mtlfast/_C*.so $(VENV)
