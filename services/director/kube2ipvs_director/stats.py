"""What the director's kernel is carrying: IPVS connection entries by protocol and state, and how
full the conntrack table is. (IPVS per-service and per-destination counters come over netlink:
`LinuxIpvs.stats()` in `kernel`.)

Pure parsers (`count_ip_vs_conn`, `parse_sysctl_int`) are apart from the readers, which open the
/proc files and block; the app calls the readers from its worker thread.

/proc/net/ip_vs_conn holds one line per IPVS connection entry, of both families (there is no
ip_vs_conn6; ip_vs_conn_sync lists the same entries with their origin, so it is not added in):

    Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData
    TCP C000020A C01E C000020A 0050 7F000001 A573 TIME_WAIT       117
    TCP 2001:0db8:000c:0000:0000:0000:0000:0002 D431 2001:0db8:0000:0000:0000:0000:0000:0010 0050 ...

The protocol is the first field and the state the eighth (addresses contain no blanks, IPv6 ones
are printed with colons). A busy director has a million lines, so the parser reads bytes, splits
each line once and counts (protocol, state) pairs with a Counter, in batches, without a Python
statement per line (under 1 s per million lines on a slow core); the names are decoded once per
distinct pair, at the end. Persistence templates count under state NONE.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Final

IP_VS_CONN_PATHS: Final = (Path("/proc/net/ip_vs_conn"),)
CONNTRACK_DIR: Final = Path("/proc/sys/net/netfilter")
_STATE_FIELD: Final = 7
_HEADER_KEY: Final = (b"Pro", b"State")  # the fields of the header line at those places
_BATCH: Final = 65536  # lines per batch: bounds memory, keeps the per-batch overhead negligible

ConnKey = tuple[str, str]  # ("TCP", "ESTABLISHED"), ("UDP", "UDP"), ...


@dataclass(frozen=True, slots=True)
class ConntrackUsage:
    """nf_conntrack_count and nf_conntrack_max; None when the file is absent (module not loaded)."""

    count: int | None
    max: int | None


def count_ip_vs_conn(lines: Iterable[bytes]) -> dict[ConnKey, int]:
    """(protocol, state) -> number of entries, over the lines of /proc/net/ip_vs_conn.

    The header and lines with too few fields are not counted.
    """
    counts: Counter[tuple[bytes, bytes]] = Counter()
    key = itemgetter(0, _STATE_FIELD)
    it = iter(lines)
    while batch := list(islice(it, _BATCH)):
        try:
            # All in C: about half the time of a Python loop over the lines.
            counts.update(Counter(map(key, map(bytes.split, batch))))
        except IndexError:  # a line with too few fields: count this batch one line at a time
            counts.update(key(f) for f in map(bytes.split, batch) if len(f) > _STATE_FIELD)
    counts.pop(_HEADER_KEY, None)
    return {(p.decode("ascii", "replace"), s.decode("ascii", "replace")): n for (p, s), n in sorted(counts.items())}


def merge_counts(*counts: Mapping[ConnKey, int]) -> dict[ConnKey, int]:
    total: Counter[ConnKey] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))


def parse_sysctl_int(text: str) -> int | None:
    """The integer a /proc/sys file holds, or None when it holds something else."""
    try:
        return int(text.strip())
    except ValueError:
        return None


# -- readers (block on /proc) ---------------------------------------------------------------------

def read_ip_vs_conn(paths: Iterable[Path] = IP_VS_CONN_PATHS) -> dict[ConnKey, int] | None:
    """Connection entries by protocol and state, added up over the files of `paths` that exist;
    None when none does (no IPVS in this kernel). Streams each file: memory does not grow with
    its size."""
    found: list[dict[ConnKey, int]] = []
    for path in paths:
        try:
            with path.open("rb", buffering=1 << 20) as f:
                found.append(count_ip_vs_conn(f))
        except FileNotFoundError:
            continue
    return merge_counts(*found) if found else None


def _read_int(path: Path) -> int | None:
    try:
        return parse_sysctl_int(path.read_text())
    except OSError:  # absent (nf_conntrack not loaded) or not readable in this namespace
        return None


def read_conntrack(directory: Path = CONNTRACK_DIR) -> ConntrackUsage:
    return ConntrackUsage(count=_read_int(directory / "nf_conntrack_count"),
                          max=_read_int(directory / "nf_conntrack_max"))
