# One idempotent set-up for people, CI and the README: `make run-example`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
AGENT := src/bencher_runner/_agent/bencher-agent
APT_PACKAGES := qemu-system-x86 qemu-utils e2fsprogs cpio gcc libc6-dev busybox-static \
	docker-registry skopeo umoci iproute2 nftables liblz4-1 zstd
EXAMPLE := examples/hello/oci

.PHONY: setup deps venv agent kernel example run-example test lint clean

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

agent: $(AGENT)

kernel: venv
	@$(BIN)/runner kernel show >/dev/null 2>&1 || $(BIN)/runner kernel fetch

$(EXAMPLE)/index.json: examples/hello/build.sh examples/hello/bench.sh
	examples/hello/build.sh

example: $(EXAMPLE)/index.json

run-example: setup example
	$(BIN)/runner run --image $(EXAMPLE):latest

test: setup example
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(dir $(AGENT)) $(EXAMPLE)
