# One idempotent set-up for people, CI and the README: `make run-example`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
AGENT := src/bencher_runner/_agent/bencher-agent
NOISE := src/bencher_runner/_agent/bencher-noise
# What a runner host needs (gcc and libc6-dev build the guest agent, bubblewrap jails every VMM); the rest is for tests only.
RUNTIME_APT_PACKAGES := qemu-system-x86 qemu-utils e2fsprogs cpio gcc libc6-dev iproute2 nftables bubblewrap \
	liblz4-1 zstd
APT_PACKAGES := $(RUNTIME_APT_PACKAGES) busybox-static docker-registry skopeo umoci
EXAMPLE := examples/hello/oci

.PHONY: setup deps venv agent noise kernel lean-kernel example run-example test bench lint clean install-service

setup: deps venv agent kernel

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/runner: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/runner

$(AGENT): guest/agent.c
	@mkdir -p $(dir $@)
	gcc -static -Os -Wall -Wextra -Werror -o $@ guest/agent.c
	strip $@

$(NOISE): guest/noise.c
	@mkdir -p $(dir $@)
	gcc -static -O2 -Wall -Wextra -Werror -o $@ guest/noise.c
	strip $@

# The reference workloads of `runner noise`, shipped next to the agent.
noise: $(NOISE)

agent: $(AGENT) $(NOISE)

kernel: venv
	@$(BIN)/runner kernel show >/dev/null 2>&1 || $(BIN)/runner kernel fetch

# The lean guest kernel (`runner kernel build`: Debian's linux-source-6.1 + the pinned config, about
# 6-13 minutes on a loaded 2-core machine, seconds when unchanged). Once built, jobs boot it by default.
KERNEL_BUILD_APT_PACKAGES := linux-source-6.1 make gcc flex bison bc libelf-dev xz-utils
lean-kernel: venv
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(KERNEL_BUILD_APT_PACKAGES)"
	$(BIN)/runner kernel build

$(EXAMPLE)/index.json: examples/hello/build.sh examples/hello/bench.sh
	examples/hello/build.sh

example: $(EXAMPLE)/index.json

run-example: setup example
	$(BIN)/runner run --image $(EXAMPLE):latest

test: setup example
	$(BIN)/pytest -q

# Every benchmark (bench/__main__.py): about 10 minutes; figures, goals, bench-results/{results.json,phases.png}.
bench: setup example
	$(BIN)/pip install -q -e '.[dev,bench]'
	@# An editable install leaves src/ without bytecode, and where PYTHONDONTWRITEBYTECODE is set every
	@# `runner` start compiles it again (about 0.1 s here): byte-compile it, as pip does for a real install.
	$(BIN)/python -m compileall -q src
	$(BIN)/python -m bench

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(dir $(AGENT)) $(EXAMPLE)

# `make install-service`: `runner up` as a systemd service (README: "Setting up a runner host").
# Installs a copy of this clone (not editable) with the guest agent inside, fetches the cloud guest
# kernel and builds the lean one (the jobs' default; a rebuild is incremental) into the service's
# cache, installs the unit and, only if absent, the env file. It never starts the service. Run it
# again after a `git pull` to upgrade; the env file is kept.
PREFIX ?= /opt/bencher-runner
UNIT_DIR ?= /etc/systemd/system
CONF_DIR ?= /etc/bencher-runner
SERVICE_CACHE ?= /var/cache/bencher-runner
SERVICE_BIN := $(PREFIX)/venv/bin

install-service:
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(RUNTIME_APT_PACKAGES)"
	@$(MAKE) --no-print-directory agent
	@test -x $(SERVICE_BIN)/python || $(PYTHON) -m venv $(PREFIX)/venv
	$(SERVICE_BIN)/pip install -q --upgrade pip
	$(SERVICE_BIN)/pip install -q --upgrade .
	@$(SERVICE_BIN)/python -c 'from bencher_runner.sandbox.agent import find_agent; print("guest agent:", find_agent())'
	install -m 0644 README.md $(PREFIX)/README.md
	@BENCHER_RUNNER_CACHE_DIR=$(SERVICE_CACHE) $(SERVICE_BIN)/runner kernel show 2>/dev/null \
		|| BENCHER_RUNNER_CACHE_DIR=$(SERVICE_CACHE) $(SERVICE_BIN)/runner kernel fetch
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(KERNEL_BUILD_APT_PACKAGES)"
	BENCHER_RUNNER_CACHE_DIR=$(SERVICE_CACHE) $(SERVICE_BIN)/runner kernel build
	install -d -m 0755 $(UNIT_DIR)
	sed -e 's|/opt/bencher-runner|$(PREFIX)|g' -e 's|/etc/bencher-runner|$(CONF_DIR)|g' \
		-e 's|=/var/cache/bencher-runner|=$(SERVICE_CACHE)|' \
		deploy/bencher-runner.service > $(UNIT_DIR)/bencher-runner.service
	chmod 0644 $(UNIT_DIR)/bencher-runner.service
	install -d -m 0700 $(CONF_DIR)
	@if [ -e $(CONF_DIR)/runner.env ]; then echo "kept $(CONF_DIR)/runner.env"; \
	else install -m 0600 deploy/runner.env.example $(CONF_DIR)/runner.env && echo "created $(CONF_DIR)/runner.env"; fi
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	else echo "systemd is not running here: skipped systemctl daemon-reload"; fi
	@echo
	@echo "next: put the runner id and key in $(CONF_DIR)/runner.env (BENCHER_RUNNER, BENCHER_RUNNER_KEY), then"
	@echo "  systemctl enable --now bencher-runner"
	@echo "  journalctl -u bencher-runner -f"
	@echo "(already running? systemctl restart bencher-runner starts the version just installed)"
