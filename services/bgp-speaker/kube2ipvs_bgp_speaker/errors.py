"""gobgpd's errors, sorted by what the speaker does next. Pure (no grpc): the adapter hands over
the gRPC status code's name and the message text.

gobgpd 3.x answers every refusal with status UNKNOWN and only a text, so the kind is read from
the text (the messages below were seen from gobgpd 3.10):

    error                    the speaker                         gobgpd says, e.g.
    GobgpUnavailableError    reconnects, resyncs everything      (status UNAVAILABLE, DEADLINE_EXCEEDED)
    GobgpNotStartedError     starts BGP (or waits for its conf)  bgp server hasn't started yet
    GobgpExistsError         converges: it is there              can't overwrite the existing peer: 192.0.2.1
    GobgpNotFoundError       converges: it is gone               can't find a specified path;
                                                                 can't delete a peer configuration for 192.0.2.1;
                                                                 neighbor that has 192.0.2.1 doesn't exist (UpdatePeer)
    GobgpRejectedError       reports it; retrying will not help  invalid router-id format: ; nexthop not found;
                                                                 listen tcp4 0.0.0.0:179: bind: address already in use
    GobgpIncompatibleError   reports it (not a gobgp v3 API)     (status UNIMPLEMENTED)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final


class GobgpError(Exception):
    """An error from gobgpd's API: `call` is the RPC, `detail` gobgpd's own text."""

    kind: str = "error"

    def __init__(self, call: str, detail: str) -> None:
        super().__init__(f"{call}: {detail}" if call else detail)
        self.call, self.detail = call, detail


class GobgpUnavailableError(GobgpError):
    kind = "unavailable"


class GobgpNotStartedError(GobgpError):
    kind = "not_started"


class GobgpExistsError(GobgpError):
    kind = "already_exists"


class GobgpNotFoundError(GobgpError):
    kind = "not_found"


class GobgpRejectedError(GobgpError):
    kind = "rejected"


class GobgpIncompatibleError(GobgpRejectedError):
    kind = "incompatible"


_TRANSIENT_CODES: Final = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED", "ABORTED"})
# Texts are matched by their start, lower-cased: gobgpd appends the object (an address, a path).
# Each was seen from gobgpd 3.10 on this project's machines.
_BY_TEXT: Final[tuple[tuple[str, type[GobgpError]], ...]] = (
    ("bgp server hasn't started yet", GobgpNotStartedError),
    ("can't overwrite the existing peer", GobgpExistsError),
    ("can't find a specified path", GobgpNotFoundError),
    ("can't delete a peer configuration for", GobgpNotFoundError),
    ("neighbor that has ", GobgpNotFoundError),
)


def translate(code: str, detail: str, call: str = "") -> GobgpError:
    """The project's error for a gRPC status `code` (its name, e.g. "UNKNOWN") and text."""
    if code in _TRANSIENT_CODES:
        return GobgpUnavailableError(call, f"gobgpd unreachable ({code.lower()}): {detail}")
    if code == "UNIMPLEMENTED":
        return GobgpIncompatibleError(call, f"gobgpd does not serve apipb.GobgpApi (gobgp v3 API): {detail}")
    text = detail.strip().lower()
    for start, kind in _BY_TEXT:
        if text.startswith(start):
            return kind(call, detail)
    return GobgpRejectedError(call, detail)


class ApplyError(GobgpError):
    """Some ops of a batch failed: `applied` are the ones gobgpd took, `cause` the first failure."""

    def __init__(self, cause: GobgpError, applied: Sequence[object]) -> None:
        super().__init__(cause.call, cause.detail)
        self.kind = cause.kind
        self.cause, self.applied = cause, tuple(applied)
