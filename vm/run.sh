#!/usr/bin/env bash
# Boots the test VM that vm/build.sh built (qemu TCG: KVM does not work on the CI machines) and
# runs one command in it, chrooted into the host's / (read-only over 9p), at the repo's path.
#
#   vm/run.sh [PYTEST_ARGS...]     pytest -m vm on tests/vm (or on the test paths given), from .venv
#   vm/run.sh --sh 'COMMAND'       any shell command instead, e.g. 'ipvsadm -Ln; lsmod' (debugging)
#
# The VM's console (the command's output) streams to stdout and to <cache>/out/console.log; the
# out share (<cache>/out, /dev/shm/out in the VM, $KUBE2IPVS_VM_OUT) also receives junit.xml.
# Exits with the command's status, or 125 with a message when the VM failed to boot or to set
# up, or qemu timed out.
#
# Environment: KUBE2IPVS_VM_CACHE (default <repo>/.cache/vm), KUBE2IPVS_VM_TIMEOUT (seconds,
# default 900), KUBE2IPVS_VM_CPUS (default 2), KUBE2IPVS_VM_MEMORY (MiB, default 1024).
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$VM_DIR")
CACHE=${KUBE2IPVS_VM_CACHE:-$REPO/.cache/vm}
TIMEOUT=${KUBE2IPVS_VM_TIMEOUT:-900}
CPUS=${KUBE2IPVS_VM_CPUS:-2}
CPU_MODEL=${KUBE2IPVS_VM_CPU_MODEL:-max}
MEMORY=${KUBE2IPVS_VM_MEMORY:-1024}
OUT=$CACHE/out
SETUP_FAILED=125  # vm/run.sh's own failures; pytest uses 0-5

die() { echo "vm/run.sh: error: $*" >&2; exit "$SETUP_FAILED"; }

command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (make system-packages installs it)"
[ -f "$CACHE/vmlinuz" ] && [ -f "$CACHE/initramfs.cpio.gz" ] || die "no vm image in $CACHE: run vm/build.sh first"

if [ "${1:-}" = --sh ]; then
  [ $# -eq 2 ] || die "usage: vm/run.sh --sh 'COMMAND'"
  command=$2
else
  [ -x "$REPO/.venv/bin/python" ] || die "$REPO/.venv is missing (make install creates it)"
  # The VM sees the repo read-only: no cache provider. Hypothesis's pytest plugin costs about 8 s
  # of imports under TCG and no VM test needs it (@given works without it).
  args=(-m vm -p no:cacheprovider -p no:hypothesispytest --junitxml=/dev/shm/out/junit.xml)
  paths_given=false
  for arg in "$@"; do [[ $arg == tests/* ]] && paths_given=true; done
  $paths_given || args+=(tests/vm)
  command="exec .venv/bin/python -m pytest $(printf '%q ' "${args[@]}" "$@")"
fi

# One VM per cache at a time: the out share and the image are shared.
exec 9>"$CACHE/.lock"
flock -n 9 || { echo "vm/run.sh: waiting for another build or run using $CACHE"; flock 9; }

rm -rf "$OUT"
mkdir -p "$OUT"
# cmd.sh runs in the VM under the host's /bin/sh, from the repo.
printf 'cd %q || exit 99\n%s\n' "$REPO" "$command" > "$OUT/cmd.sh"

echo "vm/run.sh: booting $(cat "$CACHE/kernel-version" 2>/dev/null) (tcg, ${CPUS} cpus, ${MEMORY} MiB, timeout ${TIMEOUT}s)"
start=$EPOCHREALTIME
set +e
# The serial console ends lines with \r\n, and pytest, seeing a tty, redraws "collecting ..."
# with bare \r: sed drops the first and breaks lines at the others, so the log holds plain lines
# (pytest's closing line among them, for the lane summary); -u keeps the output live.
timeout -k 10 "$TIMEOUT" qemu-system-x86_64 \
  -accel tcg -cpu "$CPU_MODEL" -smp "$CPUS" -m "$MEMORY" \
  -nodefaults -display none -no-reboot -serial stdio \
  -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initramfs.cpio.gz" \
  -append 'console=ttyS0 quiet loglevel=3 panic=-1' \
  -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$OUT",mount_tag=vmout,security_model=none \
  </dev/null 2>&1 | sed -u 's/\r$//; s/\r/\n/g' | tee "$OUT/console.log"
status=${PIPESTATUS[0]}
set -e
elapsed=$(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $start}")

# init prints "kube2ipvs-vm: exit status N" last; qemu then exits with min(N,127)*2+1.
reported=$(sed -n 's/^kube2ipvs-vm: exit status \([0-9]*\) .*/\1/p' "$OUT/console.log" | tail -n 1)
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  die "qemu timed out after ${TIMEOUT}s (KUBE2IPVS_VM_TIMEOUT); console log: $OUT/console.log"
fi
if [ -z "$reported" ] || [ $((status % 2)) != 1 ]; then
  die "the VM stopped without reporting an exit status (qemu exit $status after ${elapsed}s): it did not boot, or /init died; console log: $OUT/console.log"
fi
if grep -q '^kube2ipvs-vm: setup failed' "$OUT/console.log"; then
  die "$(grep -m1 '^kube2ipvs-vm: setup failed' "$OUT/console.log" | sed 's/^kube2ipvs-vm: //') (qemu wall ${elapsed}s)"
fi
echo "vm/run.sh: exit status $reported, qemu wall ${elapsed}s"
exit "$reported"
