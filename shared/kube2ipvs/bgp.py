"""The VIP routes a BGP director announces, derived from cluster state. Pure.

A VIP is announced while at least one of its virtual services has a real server: announcing a
VIP that nothing serves would attract traffic only to reset it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from kube2ipvs.lbconfig import address_sort_key
from kube2ipvs.model import ClusterState

WELL_KNOWN_COMMUNITIES: Final = ("no-export", "no-advertise", "no-export-subconfed", "no-peer", "blackhole")
_COMMUNITY: Final = re.compile(r"(\d{1,10}):(\d{1,10})(?::(\d{1,10}))?\Z")


@dataclass(frozen=True, slots=True)
class Announcement:
    prefix: str  # 192.0.2.10/32, 2001:db8::10/128
    nexthop: str | None  # None: the speaker's own address ("self")
    communities: tuple[str, ...]


def parse_community(text: str) -> str:
    """Validate a standard (ASN:VALUE, each 0-65535), large (A:B:C, each < 2^32) or well-known community."""
    if text in WELL_KNOWN_COMMUNITIES:
        return text
    match = _COMMUNITY.fullmatch(text)
    if match is None:
        known = ", ".join(WELL_KNOWN_COMMUNITIES)
        raise ValueError(f"{text!r} is not a BGP community (ASN:VALUE, A:B:C or one of {known})")
    parts = [int(p) for p in match.groups() if p is not None]
    limit = 2**32 - 1 if len(parts) == 3 else 65535
    if any(p > limit for p in parts):
        raise ValueError(f"{text!r}: each part must be at most {limit}")
    return ":".join(str(p) for p in parts)


def announced_vips(state: ClusterState) -> tuple[str, ...]:
    live = {vs.vip for vs in state.services if vs.backends}
    return tuple(sorted(live, key=address_sort_key))


def desired_announcements(
    state: ClusterState,
    *,
    nexthop: str | None = None,
    nexthop6: str | None = None,
    communities: Sequence[str] = (),
) -> tuple[Announcement, ...]:
    comms = tuple(communities)
    return tuple(
        Announcement(f"{vip}/128", nexthop6, comms) if ":" in vip else Announcement(f"{vip}/32", nexthop, comms)
        for vip in announced_vips(state)
    )
