# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Quiet TensorFlow's C++ start-up chatter; errors still show.
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Tests run on this many worker processes (pytest-xdist), a test file per worker at a
# time so that its session fixtures are built once; 1 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: install demo test test-heavy test-fast lint format clean strace chromium

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/delf demo --output_dir=demo_output

# The suite within 5 minutes on 2 cores; the tests marked crash or heavy (whole-process
# robustness: strace kills, soak, multi-process Beam, kill-and-resume training, ...)
# run in `make test-heavy`, which CI (.ci/run) runs after this.
test: $(STAMP) strace chromium
	$(PYTEST) -m "not crash and not heavy" tests

test-heavy: $(STAMP) strace chromium
	$(PYTEST) -m "crash or heavy" tests

# Everything but the tests marked slow (those that need ResNet50 itself).
test-fast: $(STAMP) strace chromium
	$(PYTEST) -m "not slow and not crash and not heavy" tests

# The crash tests (tests/commands/test_crash_safety.py) kill commands with strace's fault
# injection: installed here when missing (as root, with apt-get); without it those
# tests are skipped and say why.
strace:
	@command -v strace >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null 2>&1 \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace; }; }; } \
	  || echo "note: strace is not installed; the crash tests will be skipped"

# The page tests (tests/report/test_report_html.py, the search service's page in
# tests/serving/test_search_service.py) run Debian's chromium and chromium-driver
# (Selenium): installed here when missing (as root, with apt-get); without them those
# tests are skipped and say why.
chromium:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }; }; } \
	  || echo "note: chromium/chromedriver are not installed; the page tests will be skipped"

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) demo_output build *.egg-info .pytest_cache .ruff_cache
