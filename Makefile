# mailgate — the two commands: `make run` and `make test`.
# The distribution's interpreter when there is one of 3.11 or later (tomllib): Debian builds
# /usr/bin/python3 with PGO and LTO, and a login costs about 10 % less CPU on it than on a
# plain source build of the same version (README, Benchmarks).  Otherwise the python3 in
# PATH; `make PYTHON=...` picks another.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo /usr/bin/python3 || echo python3)
endif
VENV   := .venv
PY     := $(VENV)/bin/python
# A .venv made by another interpreter than $(PYTHON) is made again.
VENV_BASE := $(shell sed -n 's/^executable = //p' $(VENV)/pyvenv.cfg 2>/dev/null)
WANT_BASE := $(shell $(PYTHON) -c 'import os, sys; print(os.path.realpath(sys.executable))' 2>/dev/null)
ifneq ($(VENV_BASE),$(WANT_BASE))
VENV_CLEAR := --clear
endif
CONFIG ?= deploy/gateway.example.toml
# Debian packages the test suite starts as real servers (systemd: systemd-analyze verify
# checks deploy/mailgate.service; a minimal Debian lacks it).
TEST_PACKAGES := redis-server redis-sentinel dovecot-imapd dovecot-pop3d dovecot-submissiond postfix slapd ldap-utils haproxy nginx-light libnginx-mod-mail systemd
# What `make bench` needs besides them: strace counts the system calls per session.
BENCH_PACKAGES := strace

.PHONY: run test test-soak venv venv-interpreter deps bench bench-smtp check-config clean demo

$(VENV)/.installed: requirements.txt $(if $(VENV_CLEAR),venv-interpreter)
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { echo "$(PYTHON) cannot make a venv: install python3-venv (apt-get install python3-venv), or run make test as root"; exit 2; }
	$(PYTHON) -m venv $(VENV_CLEAR) $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(VENV)/.installed

run: venv
	@command -v redis-server >/dev/null || { echo "redis-server is missing: install it with 'apt-get install redis-server' (or set [redis] url)"; exit 2; }
	$(PY) -m gateway serve --config $(CONFIG)

# Two throwaway Dovecot back-ends with sample users behind the gateway (IMAPS, self-made CA).
demo: venv
	$(PY) deploy/demo.py

deps:
	@PYTHON=$(PYTHON) bash deploy/install-test-deps.sh $(TEST_PACKAGES)

test: deps venv
	$(PY) -m pytest -q tests

# Long fault and fuzz runs (tests marked soak): 20,000 fuzzed sessions, minutes of faults.
test-soak: deps venv
	MAILGATE_SOAK=1 $(PY) -m pytest -q -m soak tests

bench: venv
	@command -v strace >/dev/null || PYTHON=$(PYTHON) bash deploy/install-test-deps.sh $(BENCH_PACKAGES)
	$(PY) -m bench
	$(PY) -m bench.metrics_cost
	$(PY) -m bench.tls
	$(PY) -m bench.floor

# Submission messages/s through the gateway and direct (needs root: a private Postfix).
bench-smtp: venv
	$(PY) -m bench.smtp

check-config: venv
	$(PY) -m gateway check-config --config $(CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache run
