#!/usr/bin/env bash
# The director's IPVS benchmark (bench/bench_director.py) in the qemu VM, the only place with
# real IPVS here: builds the VM image (vm/build.sh, a no-op when up to date), runs the benchmark
# in the VM with the given arguments, copies its JSON (and its table) from the VM's out share to
# bench/results/, and prints the table. Timings are under TCG emulation: compare the ratios.
#
#   bench/run_director_bench.sh [--scale 0.1 | --services 1000] [--changes 50] [--repeat 3] [--seed N]
#
# Measured on the 2-core machine (2026-11-27, after the change path stopped scanning every
# service): --scale 0.1 (1,000 services) took 58 s in the VM, the full 10,000 with --repeat 1
# 453 s; each repeat adds about two full loads and two whole-table ipvsadm -R (about 4 minutes).
#
# Environment: as vm/run.sh (KUBE2IPVS_VM_CACHE, KUBE2IPVS_VM_TIMEOUT, ...). The timeout defaults
# to 10800 s here. Exits with the benchmark's status (1 when a correctness check failed, 2 when
# IPVS is missing), or vm/run.sh's 125.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${KUBE2IPVS_VM_CACHE:-$REPO/.cache/vm}
export KUBE2IPVS_VM_TIMEOUT=${KUBE2IPVS_VM_TIMEOUT:-10800}
RESULTS=$REPO/bench/results

for arg in "$@"; do
  case $arg in --output|--output=*) echo "run_director_bench.sh: --output is set here (bench/results/)" >&2; exit 2;; esac
done

"$REPO/vm/build.sh"
set +e
"$REPO/vm/run.sh" --sh ".venv/bin/python bench/bench_director.py $(printf '%q ' "$@")--output /dev/shm/out/bench_director.json"
rc=$?
set -e
if [ ! -f "$CACHE/out/bench_director.json" ]; then
  echo "run_director_bench.sh: the benchmark wrote no results (exit $rc); console log: $CACHE/out/console.log" >&2
  exit "$(( rc == 0 ? 1 : rc ))"
fi
mkdir -p "$RESULTS"
cp "$CACHE/out/bench_director.json" "$CACHE/out/bench_director.txt" "$RESULTS/"
echo
echo "==================== director benchmark (copied to $RESULTS/bench_director.json)"
cat "$RESULTS/bench_director.txt"
exit "$rc"
