# backupd developer tasks. GNU make; every target is phony except the venv stamp.
#
#   make test        system packages, venv, lint, type check, the test suite (not slow)
#   make test-slow   the slow scenarios (pytest -m slow): fault/load, and the S3 tests on
#                    real Ceph RGW and Swift stores, which the suite starts on loopback
#   make demo        a throwaway PostgreSQL, a daemon, a backup and a verified restore
#                    (installs only PostgreSQL, python3-venv and backupd without test tools)
#
# Works on a fresh Debian bookworm as root: `deps-system` installs what is missing
# with apt-get, and `.venv` installs the Python packages pinned in constraints.txt.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.NOTPARALLEL:
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PG_BIN ?= /usr/lib/postgresql/15/bin

.PHONY: deps-system deps-demo .venv test test-slow lint fmt bench demo clean update-constraints

# Debian packages, installed only when their command is missing (never upgraded). apt must not
# start services: a policy-rc.d that answers 101 is put in place for the install
# (unless one is there already), so the postgresql package's default cluster,
# the prometheus server, memcached and the Ceph and Swift daemons stay down (the
# tests start their own on loopback).
deps-system:
	@missing=()
	[ -x "$(PG_BIN)/initdb" ] && [ -x "$(PG_BIN)/pg_ctl" ] || missing+=(postgresql-15)
	command -v psql >/dev/null && [ -x "$(PG_BIN)/pg_dump" ] || missing+=(postgresql-client-15)
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
	srcs=/etc/apt/sources.list.d/backupd-deb-src.sources
	need_src=0
	if [ "$(DEPS)" != demo ]; then  # the demo needs only PostgreSQL and a venv
	  command -v age >/dev/null || missing+=(age)
	  command -v zstd >/dev/null || missing+=(zstd)
	  command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
	  command -v setpriv >/dev/null && command -v runuser >/dev/null || missing+=(util-linux)
	  command -v systemd-analyze >/dev/null || missing+=(systemd)
	  [ -x /usr/bin/time ] || missing+=(time)
	  command -v chromium >/dev/null || missing+=(chromium)  # the status page test renders in it
	  # Real object stores for the S3 tests (tests/objstores.py): Ceph RGW and Swift with s3api.
	  command -v ceph-mon >/dev/null && command -v monmaptool >/dev/null || missing+=(ceph-mon)
	  command -v ceph-osd >/dev/null || missing+=(ceph-osd)
	  command -v radosgw >/dev/null && command -v radosgw-admin >/dev/null || missing+=(radosgw)
	  command -v uuidgen >/dev/null || missing+=(uuid-runtime)
	  command -v swift-proxy-server >/dev/null || missing+=(swift-proxy)
	  command -v swift-ring-builder >/dev/null || missing+=(swift)
	  command -v swift-account-server >/dev/null || missing+=(swift-account)
	  command -v swift-container-server >/dev/null || missing+=(swift-container)
	  command -v swift-object-server >/dev/null || missing+=(swift-object)
	  command -v memcached >/dev/null || missing+=(memcached)
	  command -v openssl >/dev/null || missing+=(openssl)
	  # The PostgreSQL regression database of the slow restore tests: its test suite is
	  # built from the Debian source package (scripts/regression-build.sh), so apt
	  # needs a deb-src line for the same mirror and the build tools.
	  for tool in gcc make bison flex dpkg-source; do
	    command -v $$tool >/dev/null || missing+=($${tool/dpkg-source/dpkg-dev})
	  done
	  [ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
	  grep -rqs '^deb-src\|^Types:.*deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/ || need_src=1
	fi
	if [ $${#missing[@]} -eq 0 ] && [ $$need_src -eq 0 ]; then echo "deps-system: all present"; exit 0; fi
	echo "deps-system: installing $${missing[*]:-nothing}$$( [ $$need_src -eq 1 ] && echo ', adding a deb-src line')"
	if [ "$$(id -u)" -ne 0 ]; then
	  echo "deps-system: run as root (or install them yourself): apt-get install $${missing[*]}" >&2
	  exit 1
	fi
	if [ $$need_src -eq 1 ]; then
	  if [ -e /etc/apt/sources.list.d/debian.sources ]; then
	    sed 's/^Types: deb$$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$$srcs"
	  else
	    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >"$${srcs%.sources}.list"
	  fi
	fi
	policy=/usr/sbin/policy-rc.d
	if [ ! -e "$$policy" ]; then
	  trap 'rm -f "$$policy"' EXIT
	  printf '#!/bin/sh\nexit 101\n' >"$$policy"
	  chmod 0755 "$$policy"
	fi
	apt-get update
	[ $${#missing[@]} -eq 0 ] && exit 0
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends --no-upgrade "$${missing[@]}"
	if [[ " $${missing[*]} " == *" postgresql-15 "* ]]; then
	  pg_ctlcluster 15 main stop 2>/dev/null || true
	fi

# Only what `make demo` needs: PostgreSQL and python3-venv.
deps-demo:
	@$(MAKE) --no-print-directory deps-system DEPS=demo

# The virtualenv, rebuilt when the dependencies or their pins change.
.venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $@

# Rewrite constraints.txt from the current venv (after changing dependencies).
update-constraints: .venv
	@{ echo "# Pinned versions for a reproducible .venv: pip install -c constraints.txt -e '.[test]'."
	  echo "# Regenerate with 'make update-constraints' after changing dependencies in pyproject.toml."
	  $(BIN)/pip freeze --exclude-editable | grep -v -E '^(#|-e |backupd==)'
	} >constraints.txt.new
	mv constraints.txt.new constraints.txt

test: deps-system .venv lint
	$(BIN)/pytest -m "not slow"

# The suite's slow marker: long fault and load scenarios. pytest exits 5 when it
# collects nothing, which here only means no slow test exists yet.
test-slow: deps-system .venv
	@rc=0
	$(BIN)/pytest -m slow || rc=$$?
	if [ $$rc -eq 5 ]; then echo "test-slow: no slow tests"; exit 0; fi
	exit $$rc

lint: .venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: .venv
	$(BIN)/ruff format .

bench: deps-system .venv
	$(BIN)/python -m tests.bench

# The demo installs backupd alone (no test tool chain) into the same venv.
$(VENV)/.installed-demo: pyproject.toml constraints.txt
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e .
	touch $@

demo: deps-demo $(VENV)/.installed-demo
	BACKUPD=$(CURDIR)/$(BIN)/backupd PG_BIN=$(PG_BIN) scripts/demo.sh

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
