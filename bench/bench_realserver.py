"""Realserver benchmark: one node's nftables table, applied whole and changed one endpoint at a
time, against the original design's full `iptables-restore` of the nat table. Root only.

The node's share: the benchmark cluster of bench_render.py (`build_cluster(scale, seed)`,
normalized) with every backend folded into one for this node, so at --scale 1 the node serves
all 10,000 VIP:ports with the cluster's ~100,000 ready endpoints as its local pods: the largest
table a realserver can be asked to hold at the design's scale.

Measured, each in its own throw-away network namespace (prefix `k2i-bench-rs<pid>-`):

(a) full apply: `render_nft` text loaded with `nft -f` (median of --repeat runs; each replaces
    the tables whole, as a restart or a resync after drift does)
(b) one-endpoint change: `render_nft_delta(old, new)` applied with `nft -f` and, when the
    python3-nftables binding loads, with libnftables in-process (median and p99 over --changes
    changes each: a random service loses one endpoint, the next change gives it back). The pure
    Python cost of computing the delta is reported apart. Both nft front ends first fetch a
    cache of the ruleset (every chain, set and named counter: nft 1.0.6 does so for any `add
    rule` or `add element`), so their cost grows with the table, not with the change. Hence a
    third writer, (b3): the same changes sent as one raw nf_tables netlink batch per changed
    chain (flush + append its rules), which is the kernel's own cost of the change. After each
    method the table is compared with a full render of the final state.
(c) the original design's method: the whole nat table (RAVEL → one chain per service → one
    chain per endpoint with DNAT) in iptables-save form, loaded with `iptables-restore` (nft
    backend) and `iptables-legacy-restore` (median of --repeat runs). The original repeated
    this every 10 s whatever changed.

    sudo .venv/bin/python bench/bench_realserver.py [--scale 0.1] [--repeat 3] [--changes 60] [--output PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import platform
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_render import build_cluster

from kube2ipvs.model import Backend, PodEndpoint, VirtualService
from kube2ipvs.names import short_hash
from kube2ipvs.normalize import normalize
from kube2ipvs.render.nft import TABLE, dnat_entries, render_nft
from kube2ipvs.render.nftdelta import render_nft_delta

PREFIX: Final = f"k2i-bench-rs{os.getpid()}-"
NODE: Final = "node-bench"
NODE_IP: Final = "198.18.255.1"
DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_realserver.json"
INCREMENTAL_TARGET_MS: Final = 10.0
SPEEDUP_TARGET: Final = 100.0
CLONE_NEWNET: Final = 0x40000000
NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_NFTABLES: Final = 10
NFNL_MSG_BATCH_BEGIN: Final = 0x10
NFNL_MSG_BATCH_END: Final = 0x11
NLMSG_ERROR: Final = 2
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLM_F_APPEND: Final = 0x800
NLM_F_CREATE: Final = 0x400
NLA_F_NESTED: Final = 0x8000


def NFT_MSG(kind: int) -> int:  # noqa: N802 (the kernel's name)
    return (NFNL_SUBSYS_NFTABLES << 8) | kind


# ---------------------------------------------------------------------------------------------
# The node's share


def node_share(scale: float, seed: int) -> list[VirtualService]:
    """Every virtual service of the benchmark cluster, with all its endpoints local to one node."""
    cluster = build_cluster(scale, seed)
    state = normalize(cluster.nodes, cluster.services, cluster.slices, cluster.config)
    share = []
    for vs in state.services:
        endpoints = tuple(sorted({ep for b in vs.backends for ep in b.endpoints}, key=lambda e: (e.address, e.port)))
        if endpoints:
            share.append(replace(vs, backends=(Backend(NODE, NODE_IP, endpoints),)))
    return share


def with_endpoints(vs: VirtualService, endpoints: tuple[PodEndpoint, ...]) -> VirtualService:
    return replace(vs, backends=(replace(vs.backends[0], endpoints=endpoints),))


def one_endpoint_changes(
    share: Sequence[VirtualService], count: int, rng: random.Random
) -> Iterator[tuple[list[VirtualService], list[VirtualService]]]:
    """`count` (old, new) pairs, each one endpoint apart from the last: a random service with two
    or more endpoints loses one, and the next change gives it back, so the share stays the same
    size however long the run."""
    current = list(share)
    candidates = [i for i, vs in enumerate(share) if len(vs.backends[0].endpoints) > 1]
    taken: tuple[int, VirtualService] | None = None
    for _ in range(count):
        new = list(current)
        if taken is None:
            i = rng.choice(candidates)
            endpoints = current[i].backends[0].endpoints
            drop = rng.randrange(len(endpoints))
            taken = (i, current[i])
            new[i] = with_endpoints(current[i], endpoints[:drop] + endpoints[drop + 1:])
        else:
            i, original = taken
            new[i], taken = original, None
        yield current, new
        current = new


# ---------------------------------------------------------------------------------------------
# The original design's rules: iptables-save text of the nat table


def ravel_nat_table(share: Sequence[VirtualService]) -> str:
    """The nat table the original realserver rewrote every 10 s: PREROUTING and OUTPUT jump to
    RAVEL, which matches each VIP:port and jumps to that service's chain; the service chain picks
    an endpoint chain with `statistic random` (probability 1/(n-i) for the i-th of n, so each
    gets 1/n), and the endpoint chain DNATs. Names carry a hash, as chain names are limited to
    28 characters."""
    chains = ["RAVEL"]
    rules = ["-A PREROUTING -j RAVEL", "-A OUTPUT -j RAVEL"]
    for vs in share:
        if vs.family != 4:
            continue  # ip6tables-restore's job; the benchmark cluster is IPv4 only
        identity = f"{vs.vip}:{vs.port}/{vs.protocol}"
        svc = f"RAVEL-SVC-{short_hash(identity)}"
        chains.append(svc)
        rules.append(f"-A RAVEL -d {vs.vip}/32 -p {vs.protocol} -m {vs.protocol} --dport {vs.port} -j {svc}")
        endpoints = vs.backends[0].endpoints
        for i, ep in enumerate(endpoints):
            chain = f"RAVEL-EP-{short_hash(f'{identity}>{ep.address}:{ep.port}')}"
            chains.append(chain)
            left = len(endpoints) - i
            pick = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            rules.append(f"-A {svc} {pick}-j {chain}")
            dnat = f"-j DNAT --to-destination {ep.address}:{ep.port}"
            rules.append(f"-A {chain} -p {vs.protocol} -m {vs.protocol} {dnat}")
    head = ["*nat", *(f":{c} ACCEPT [0:0]" for c in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"))]
    return "\n".join([*head, *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT", ""])


# ---------------------------------------------------------------------------------------------
# Namespaces and the two ways to talk to nftables


def ns_run(ns: str, *cmd: str, stdin: str | None = None) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, capture_output=True, text=True,
                          check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {ns}: {done.stderr.strip()[:1000]}")
    return done.stdout


@contextmanager
def namespace(suffix: str) -> Iterator[str]:
    name = PREFIX + suffix
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ns_run(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextmanager
def entered(ns: str) -> Iterator[None]:
    """This thread in network namespace `ns` (libnftables' netlink socket is the caller's), and
    back to where it was afterwards. Python 3.11 has no os.setns, hence libc."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


class NftLibrary(Protocol):
    def cmd(self, cmdline: str) -> tuple[int, str, str]: ...


def load_libnftables() -> tuple[Callable[[], NftLibrary] | None, str]:
    """The python3-nftables binding (Debian's ctypes wrapper of libnftables.so.1): from the venv
    if it is there, else from the system's dist-packages, where apt installs it."""
    try:
        nftables = importlib.import_module("nftables")
    except ImportError:
        system = "/usr/lib/python3/dist-packages"
        if system not in sys.path:
            sys.path.append(system)  # appended: the venv's own packages keep precedence
        try:
            nftables = importlib.import_module("nftables")
        except ImportError as exc:
            return None, f"python3-nftables not loadable ({exc}); apt-get install -y python3-nftables"

    def make() -> NftLibrary:
        lib: NftLibrary = nftables.Nftables()
        return lib

    return make, f"python3-nftables from {getattr(nftables, '__file__', '?')}"


# ---------------------------------------------------------------------------------------------
# A third writer: the one changed chain sent as raw nf_tables netlink messages


def _nla(kind: int, payload: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + b"\0" * (-len(payload) % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _nla(kind | NLA_F_NESTED, b"".join(attrs))


def _u32(kind: int, value: int) -> bytes:
    return _nla(kind, struct.pack(">I", value))  # nf_tables attributes are big-endian


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nested(1, _nla(1, name.encode() + b"\0"), _nested(2, *attrs))  # LIST_ELEM {NAME, DATA}


def _data(kind: int, value: bytes) -> bytes:
    return _nested(kind, _nla(1, value))  # NFTA_DATA_VALUE


def dnat_rule_expressions(protocol: str, turn: int | None, address: str, port: int) -> bytes:
    """`meta l4proto P [numgen inc mod TURN == 0] dnat ip to ADDRESS:PORT` as the kernel holds it
    (what `nft --debug=netlink` prints for the rules render_nft writes)."""
    exprs = [
        _expr("meta", _u32(2, 16), _u32(1, 1)),  # key l4proto => reg 1
        _expr("cmp", _u32(1, 1), _u32(2, 0), _data(3, bytes([socket.getprotobyname(protocol)]))),
    ]
    if turn is not None:
        exprs += [
            _expr("numgen", _u32(1, 1), _u32(2, turn), _u32(3, 0)),  # reg 1 = inc mod turn
            _expr("cmp", _u32(1, 1), _u32(2, 0), _data(3, bytes(4))),
        ]
    exprs += [
        _expr("immediate", _u32(1, 1), _data(2, socket.inet_aton(address))),
        _expr("immediate", _u32(1, 2), _data(2, struct.pack(">H", port))),
        # dnat, NFPROTO_IPV4, addr_min reg 1, proto_min reg 2, flags PROTO_SPECIFIED
        _expr("nat", _u32(1, 1), _u32(2, 2), _u32(3, 1), _u32(5, 2), _u32(7, 2)),
    ]
    return b"".join(exprs)


class RawChainWriter:
    """Replaces the rules of one chain in one nf_tables batch over a netlink socket of the
    calling thread's namespace: what libnftables sends, without the cache it first fetches (it
    dumps every chain, set and named counter of the ruleset before each change: O(ruleset)).
    IPv4 only, the rules render_nft writes for a service chain, and only those."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.seq = 0

    def _msg(self, kind: int, flags: int, family: int, res_id: int, body: bytes) -> bytes:
        self.seq += 1
        nfgen = struct.pack("=BBH", family, 0, socket.htons(res_id))
        return struct.pack("=IHHII", 16 + 4 + len(body), kind, flags, self.seq, 0) + nfgen + body

    def replace_rules(self, table: str, chain: str, rules: Sequence[bytes]) -> None:
        names = _nla(1, table.encode() + b"\0") + _nla(2, chain.encode() + b"\0")
        ack = NLM_F_REQUEST | NLM_F_ACK
        msgs = [self._msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, b"")]
        first = self.seq + 1
        msgs.append(self._msg(NFT_MSG(8), ack, 2, 0, names))  # DELRULE by chain: flush
        for exprs in rules:
            msgs.append(self._msg(NFT_MSG(6), ack | NLM_F_CREATE | NLM_F_APPEND, 2, 0,
                                  names + _nla(4 | NLA_F_NESTED, exprs)))
        last = self.seq
        msgs.append(self._msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, b""))
        self.sock.sendall(b"".join(msgs))
        pending = set(range(first, last + 1))
        while pending:
            data = self.sock.recv(65536)
            offset = 0
            while offset < len(data):
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
                if kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, offset + 16)
                    if error != 0:
                        raise OSError(-error, f"nf_tables batch, message {seq}: {os.strerror(-error)}")
                    pending.discard(seq)
                offset += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()


def raw_apply(writer: RawChainWriter, old: Sequence[VirtualService], new: Sequence[VirtualService]) -> None:
    """The one-endpoint change as raw netlink: the service chains whose endpoints differ get
    their rules replaced. `old` and `new` are aligned (the changes of this benchmark replace a
    service in place and never add or remove one), so the changed ones are found by identity."""
    changed = [(a, b) for a, b in zip(old, new, strict=True) if a is not b]
    before = {(e.vip, e.port, e.protocol): e.endpoints for e in dnat_entries([a for a, _ in changed])}
    for e in dnat_entries([b for _, b in changed]):
        if before.get((e.vip, e.port, e.protocol)) == e.endpoints:
            continue
        n = len(e.endpoints)
        rules = [dnat_rule_expressions(e.protocol, n - i if i < n - 1 else None, ep.address, ep.port)
                 for i, ep in enumerate(e.endpoints)]
        writer.replace_rules(TABLE, e.name, rules)


# ---------------------------------------------------------------------------------------------
# Timing


def ms(seconds: Sequence[float]) -> dict[str, float]:
    ordered = sorted(s * 1000 for s in seconds)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"runs": len(ordered), "median_ms": round(statistics.median(ordered), 3), "p99_ms": round(p99, 3),
            "min_ms": round(ordered[0], 3), "max_ms": round(ordered[-1], 3)}


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return ms(runs)


def incremental(
    share: Sequence[VirtualService], changes: int, seed: int, apply: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, float], list[VirtualService]]:
    """Apply `changes` one-endpoint deltas; timings of computing them and of applying them, and the
    share as it ends."""
    compute, applied = [], []
    final = list(share)
    for old, new in one_endpoint_changes(share, changes, random.Random(seed)):
        t0 = time.perf_counter()
        text = render_nft_delta(old, new)
        t1 = time.perf_counter()
        apply(text)
        t2 = time.perf_counter()
        compute.append(t1 - t0)
        applied.append(t2 - t1)
        final = new
    return ms(compute), ms(applied), final


def check_matches_full_render(ns: str, final: Sequence[VirtualService]) -> bool:
    """The table after the deltas lists exactly as the full render of the final share."""
    via_delta = ns_run(ns, "nft", "list", "ruleset")
    ns_run(ns, "nft", "-f", "-", stdin=render_nft(final))
    return via_delta == ns_run(ns, "nft", "list", "ruleset")


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    share = node_share(args.scale, args.seed)
    build_s = time.perf_counter() - t0
    endpoints = sum(len(vs.backends[0].endpoints) for vs in share)
    text = render_nft(share)
    results: dict[str, Any] = {
        "scale": args.scale, "seed": args.seed, "vip_ports": len(share), "endpoints": endpoints,
        "build_share_s": round(build_s, 2), "nft_text_bytes": len(text),
        "environment": {"python": platform.python_version(), "kernel": platform.release(),
                        "cpus": os.cpu_count(), "nft": ns_version("nft", "--version")},
    }
    results["render_nft"] = timed(lambda: render_nft(share), args.repeat)

    with namespace("nft") as ns:
        results["full_apply_nft_f"] = timed(lambda: ns_run(ns, "nft", "-f", "-", stdin=text), args.repeat)
        # The table now holds render_nft(share): the deltas start from there.
        def apply_by_nft_f(delta: str) -> None:
            ns_run(ns, "nft", "-f", "-", stdin=delta)

        compute, applied, final = incremental(share, args.changes, args.seed, apply_by_nft_f)
        results["delta_compute_python"] = compute
        results["incremental_nft_f"] = applied
        results["incremental_nft_f_matches_full_render"] = check_matches_full_render(ns, final)

        make, how = load_libnftables()
        results["libnftables"] = how
        if make is not None:
            ns_run(ns, "nft", "-f", "-", stdin=text)
            with entered(ns):
                lib = make()

                def apply_in_process(delta: str) -> None:
                    rc, _, err = lib.cmd(delta)
                    if rc != 0:
                        raise RuntimeError(err)

                _, applied_lib, final_lib = incremental(share, args.changes, args.seed + 1, apply_in_process)
            results["incremental_libnftables"] = applied_lib
            results["incremental_libnftables_matches_full_render"] = check_matches_full_render(ns, final_lib)

        # (b3) the same changes as raw netlink batches: the kernel's own cost of a change.
        ns_run(ns, "nft", "-f", "-", stdin=text)
        with entered(ns):
            writer = RawChainWriter()
            try:
                runs, final_raw = [], list(share)
                for old, new in one_endpoint_changes(share, args.changes, random.Random(args.seed + 2)):
                    t0 = time.perf_counter()
                    raw_apply(writer, old, new)
                    runs.append(time.perf_counter() - t0)
                    final_raw = new
            finally:
                writer.close()
        results["incremental_raw_netlink"] = ms(runs)
        results["incremental_raw_netlink_matches_full_render"] = check_matches_full_render(ns, final_raw)

    ravel = ravel_nat_table(share)
    results["iptables_text_bytes"] = len(ravel)
    results["iptables_chains"] = ravel.count("\n:") - 3  # less the 4 built-ins; the first line has no \n
    for tool, key, suffix in (("iptables-restore", "full_rewrite_iptables_nft", "ipt-nft"),
                              ("iptables-legacy-restore", "full_rewrite_iptables_legacy", "ipt-legacy")):
        if shutil.which(tool) is None:
            continue
        with namespace(suffix) as ns:
            results[key] = timed(partial(ns_run, ns, tool, stdin=ravel), args.repeat)
    return results


def ns_version(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def summarize(results: dict[str, Any]) -> list[str]:
    """The table printed, and the ratios added to `results`."""
    rows = [("render_nft (Python)", "render_nft"), ("(a) full apply, nft -f", "full_apply_nft_f"),
            ("delta computed (Python)", "delta_compute_python"),
            ("(b) one endpoint, nft -f", "incremental_nft_f"),
            ("(b) one endpoint, libnftables", "incremental_libnftables"),
            ("(b) one endpoint, raw netlink batch", "incremental_raw_netlink"),
            ("(c) full rewrite, iptables-restore (nft)", "full_rewrite_iptables_nft"),
            ("(c) full rewrite, iptables-legacy-restore", "full_rewrite_iptables_legacy")]
    lines = [f"node share: {results['vip_ports']} VIP:ports, {results['endpoints']} endpoints "
             f"(scale {results['scale']})", f"{'':44}{'median ms':>12}{'p99 ms':>12}{'runs':>6}"]
    for label, key in rows:
        if key in results:
            r = results[key]
            lines.append(f"{label:44}{r['median_ms']:>12.3f}{r['p99_ms']:>12.3f}{r['runs']:>6}")
    ratios: dict[str, float] = {}
    for inc in ("incremental_nft_f", "incremental_libnftables", "incremental_raw_netlink"):
        for full in ("full_rewrite_iptables_nft", "full_rewrite_iptables_legacy", "full_apply_nft_f"):
            if inc in results and full in results:
                ratios[f"{full}/{inc}"] = round(results[full]["median_ms"] / results[inc]["median_ms"], 1)
    results["ratios"] = ratios
    lines += [f"  {k}: {v}x" for k, v in ratios.items()]
    rewrite = results.get("full_rewrite_iptables_nft", {}).get("median_ms")
    results["targets"] = {
        inc: {"under_10ms": results[inc]["median_ms"] < INCREMENTAL_TARGET_MS,
              "100x_faster_than_iptables_restore": rewrite is not None
              and rewrite / results[inc]["median_ms"] >= SPEEDUP_TARGET}
        for inc in ("incremental_nft_f", "incremental_libnftables", "incremental_raw_netlink") if inc in results
    }
    lines += [f"targets, {k}: {v}" for k, v in results["targets"].items()]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scale", type=float, default=1.0, help="1.0: 10,000 VIP:ports, ~100,000 endpoints")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each full apply or rewrite")
    ap.add_argument("--changes", type=int, default=60, help="one-endpoint changes per method (at least 50)")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root: creates network namespaces and loads rules in them", file=sys.stderr)
        return 2
    results = run(args)
    for line in summarize(results):
        print(line)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
