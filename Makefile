# kube2ipvs: the two commands are `make lab` (run the system) and `make test` (run every test).
# Works on a fresh Debian 12 machine as root; see README.md.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# System packages the project needs. Later issues add to this one list.
APT_PACKAGES := python3 python3-venv python3-pip nftables iptables iproute2 curl nats-server openssl qemu-system-x86 busybox-static kmod ipvsadm iputils-arping gobgpd frr golang-github-osrg-gobgp-dev chromium

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Rebuilt (pip re-run) only when the dependency declarations change.
STAMP := $(VENV)/.kube2ipvs-installed
# gobgpd's API modules, generated into the venv from Debian's gobgp .proto files (never committed).
GOBGP_PROTOS := /usr/share/gocode/src/github.com/osrg/gobgp/api
GOBGP_STAMP := $(VENV)/.kube2ipvs-gobgpapi
# Per-lane logs and exit codes of the last `make test`, read by its summary.
LANES := $(VENV)/test-lanes

PYTEST := $(VENV)/bin/pytest
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help install system-packages lint test test-vm soak lab bench bench-scaling clean

help:
	@echo "make install   system packages (apt) + .venv with the project and its dev tools"
	@echo "make lint      ruff, mypy, import-linter"
	@echo "make test      install, lint, then every test lane (pure+fakes, root, vm)"
	@echo "make test-vm   the real-IPVS lane alone (qemu VM, pytest -m vm; root)"
	@echo "make soak      the load test for 10 minutes: 200 endpoint changes/s end to end (make test runs 60 s)"
	@echo "make lab       the whole system on this host, in network namespaces (root; lab/README.md)"
	@echo "make bench     every benchmark, then docs/performance.md and bench/results.json (BENCH_ARGS=--scale 0.1: quick)"
	@echo "make bench-scaling  every benchmark at 1k, 10k and 30k VIP:ports (bench/results/scaling/; BENCH_ARGS=--skip-vm)"
	@echo "make clean     remove .venv and caches"

install: system-packages $(STAMP) $(GOBGP_STAMP)

# Installs only what is missing, so a second run costs one dpkg-query per package.
system-packages:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "system packages missing:$$missing"; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else echo "error: not root and no sudo; install them with: apt-get install -y$$missing" >&2; exit 1; fi; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing

$(VPY): | system-packages
	@echo "creating $(VENV) with $$(command -v $(PYTHON)) ($$($(PYTHON) --version 2>&1))"
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

$(STAMP): pyproject.toml constraints.txt | $(VPY)
	$(VPY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

$(GOBGP_STAMP): $(STAMP) $(GOBGP_PROTOS)/gobgp.proto services/bgp-speaker/kube2ipvs_bgp_speaker/genproto.py
	$(VPY) -m kube2ipvs_bgp_speaker.genproto --protos $(GOBGP_PROTOS)
	@touch $@

# Every linter runs even when an earlier one fails, so one run shows every problem.
lint: install
	@failed=""; \
	echo "==> ruff check ."; $(VENV)/bin/ruff check . || failed="$$failed ruff"; \
	echo "==> mypy"; $(VENV)/bin/mypy || failed="$$failed mypy"; \
	echo "==> lint-imports"; $(VENV)/bin/lint-imports || failed="$$failed lint-imports"; \
	if [ -n "$$failed" ]; then echo "lint failed:$$failed" >&2; exit 1; fi; \
	echo "lint: ok"

# One lane: run it, keep its output and exit code. pytest's 5 ("no tests collected") counts as
# success, because a lane whose marker matches nothing yet is empty, not broken.
define run_lane
echo; echo '==================== lane $(1): $(2)'; \
$(2) 2>&1 | tee $(LANES)/$(1).log; rc=$${PIPESTATUS[0]}; \
if [ "$$rc" = 5 ]; then rc=0; echo "(no tests collected for lane $(1))"; fi; \
echo "$$rc" > $(LANES)/$(1).rc
endef

test: install
	@rm -rf $(LANES) && mkdir -p $(LANES)
	@$(call run_lane,lint,$(MAKE) --no-print-directory lint)
	@$(call run_lane,pure,$(PYTEST) $(PYTEST_ARGS) -m "not root and not vm")
	@if [ "$$(id -u)" != 0 ]; then echo "note: not root, the root lane's tests will skip themselves"; fi
	@$(call run_lane,root,$(PYTEST) $(PYTEST_ARGS) -m root)
	@$(call run_lane,vm,$(MAKE) --no-print-directory test-vm)
	@$(summary)

# The summary: each lane's verdict and pytest closing line, then the totals over every lane in
# pytest's own closing-line shape, printed last. "deselected" is left out of the totals: every
# lane deselects the tests of the others.
define summary
echo; echo "==================== summary"; \
bad=""; \
for lane in lint pure root vm; do \
  rc=$$(cat $(LANES)/$$lane.rc 2>/dev/null || echo 99); \
  last=$$(grep -E '^=+ .* in [0-9.]+s.* =+$$' $(LANES)/$$lane.log 2>/dev/null | tail -n 1 | sed -E 's/^=+ //; s/ =+$$//'); \
  if [ -z "$$last" ]; then last=$$(grep -m 1 '^skipped: ' $(LANES)/$$lane.log 2>/dev/null); fi; \
  if [ "$$rc" = 0 ]; then verdict=ok; else verdict="FAILED (exit $$rc)"; bad="$$bad $$lane"; fi; \
  printf '  %-5s %-18s %s\n' "$$lane" "$$verdict" "$$last"; \
done; \
if [ -n "$$bad" ]; then echo "make test: FAILED lanes:$$bad"; else echo "make test: every lane passed"; fi; \
cat $(LANES)/*.log | grep -E '^=+ .* in [0-9.]+s.* =+$$' | awk ' \
  { for (i = 1; i < NF; i++) { \
      w = $$(i + 1); sub(/,$$/, "", w); \
      if ($$i ~ /^[0-9]+$$/ && w ~ /^(passed|failed|skipped|xfailed|xpassed|errors?|warnings?)$$/) { \
        if (w == "error") w = "errors"; if (w == "warning") w = "warnings"; n[w] += $$i } \
      if ($$i == "in") t += $$(i + 1) + 0 } } \
  END { out = ""; \
    split("failed passed skipped xfailed xpassed errors warnings", order, " "); \
    for (k = 1; k <= 7; k++) if (n[order[k]] > 0) out = out (out == "" ? "" : ", ") n[order[k]] " " order[k]; \
    if (out == "") out = "no tests ran"; \
    printf "==================== all lanes: %s in %.2fs ====================\n", out, t }'; \
[ -z "$$bad" ]
endef

# The real-IPVS lane (vm/README.md): vm/build.sh builds Debian's kernel and a busybox initramfs
# into .cache/vm when missing or changed; vm/run.sh boots them in qemu and runs `pytest -m vm`
# on tests/vm inside, with the host's / read-only. Runs as root, as CI does; skipped otherwise.
# pytest's 5 (nothing collected, e.g. a -k that matches no VM test) counts as success here too.
test-vm:
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "skipped: not root (the vm lane runs as root, like CI; any user can run vm/build.sh && vm/run.sh)"; \
	  exit 0; \
	fi; \
	$(MAKE) --no-print-directory install && vm/build.sh || exit 1; \
	vm/run.sh $(PYTEST_ARGS); rc=$$?; \
	if [ "$$rc" = 5 ]; then rc=0; echo "(no tests collected for lane vm)"; fi; \
	exit $$rc

# tests/test_soak.py for 10 minutes instead of the 60 s `make test` gives it (KUBE2IPVS_SOAK_SECONDS);
# it prints its report (lag, publishes, memory) whether it passes or fails.
soak: install
	KUBE2IPVS_SOAK_SECONDS=600 $(PYTEST) $(PYTEST_ARGS) tests/test_soak.py

# The whole system in network namespaces on this host (lab/README.md); root. It returns once
# every VIP answers and leaves the lab running: `.venv/bin/kube2ipvs lab status|down`.
lab: install
	@if [ "$$(id -u)" != 0 ]; then echo "make lab: needs root (network namespaces, nftables, routes)" >&2; exit 2; fi
	$(VENV)/bin/kube2ipvs lab up

bench: install
	$(VPY) bench/bench_render.py $(BENCH_ARGS)
	$(VPY) bench/bench_watcher.py $(BENCH_ARGS)
	$(VPY) bench/bench_realserver.py $(BENCH_ARGS)
	$(VPY) bench/bench_maglev.py $(BENCH_ARGS)
	$(VPY) bench/bench_garp.py
	$(VPY) bench/bench_dsr.py
	$(VPY) bench/bench_lab.py --changes 200
	$(VPY) bench/bench_lab.py --changes 200 --vip-ports 10000
	$(VPY) bench/bench_failover.py
	$(VPY) bench/bench_bgp.py $(BENCH_ARGS)
	$(VPY) bench/bench_change_scaling.py
	$(VPY) bench/bench_resources.py --scale 0.1 --idle-seconds 30 --load-seconds 30
	$(VPY) bench/bench_resources.py --idle-seconds 30 --load-seconds 30 --repeat 3
	bench/run_director_bench.sh $(BENCH_ARGS)
	-$(VPY) bench/bench_scaling.py
	$(VPY) bench/report.py

# The scaling curves (issue 10): each benchmark at 1k, 10k and 30k VIP:ports, one subprocess per
# size; bench/report.py renders them as one table. Hours at full size (the VM's 30k most of it).
# It exits 1 when a step failed or timed out; in `make bench` (the leading -) the report still runs.
bench-scaling: install
	$(VPY) bench/bench_scaling.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
