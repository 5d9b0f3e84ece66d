"""libnftables in-process: `nft` commands without a process per change. Adapter (ctypes).

The library is the one `nft` itself is built on (`libnftables.so.1`, in Debian's `libnftables1`,
which the `nftables` package depends on); its C API is documented in libnftables(3). Binding
it here with ctypes needs no Python package beyond the standard library.

Why in-process: `nft -f` costs a process start (plus `ip netns exec` in tests), about 5 ms, and
nft then builds its cache of the ruleset on every run; a long-lived context keeps its cache
between commands and refreshes it only when the ruleset's generation moved. Measured at 10,000
services (docs/design/realserver-nft-layout.md): one element transaction takes about 2.6 ms
in-process against 23 ms with `nft -f`.

A context dropping a large cache is slow (about 0.3 s after a full load of 10,000 services), so
callers load big texts with a throwaway context (`run_once`) and keep a separate long-lived one
for small changes.

Network namespaces: the context opens its netlink socket when it is created, so it works in the
namespace of the thread that created it, whatever thread uses it later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
from typing import Any, Final

_SONAME: Final = "libnftables.so.1"
NFT_CTX_DEFAULT: Final = 0
# Output flags (libnftables.h): JSON output, and handles shown.
NFT_CTX_OUTPUT_HANDLE: Final = 1 << 3
NFT_CTX_OUTPUT_JSON: Final = 1 << 4



class NftError(Exception):
    """nft refused a command: the text is nft's own message (with the offending line)."""


class LibraryMissingError(NftError):
    """libnftables.so.1 could not be loaded."""


@functools.cache
def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("nftables") or _SONAME, use_errno=True)
    except OSError as exc:
        raise LibraryMissingError(f"cannot load {_SONAME} (Debian package libnftables1): {exc}") from exc
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


def available() -> bool:
    try:
        _library()
    except LibraryMissingError:
        return False
    return True


class Nft:
    """One libnftables context. Not thread-safe: use it from one thread at a time."""

    def __init__(self) -> None:
        self._lib = _library()
        ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        if self._lib.nft_ctx_buffer_output(ctx) != 0 or self._lib.nft_ctx_buffer_error(ctx) != 0:
            self.close()
            raise NftError("cannot buffer libnftables output")

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cmd(self, text: str, *, json_output: bool = False) -> str:
        """Run `text` (what `nft -f` reads: one transaction) and return nft's output.

        Raises NftError with nft's error text when nft refuses any of it; then nothing of the
        text was applied (nft commits a file as one batch).
        """
        if self._ctx is None:
            raise NftError("context closed")
        flags = self._lib.nft_ctx_output_get_flags(self._ctx)
        wanted = flags | NFT_CTX_OUTPUT_JSON if json_output else flags & ~NFT_CTX_OUTPUT_JSON
        if wanted != flags:
            self._lib.nft_ctx_output_set_flags(self._ctx, wanted)
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(error.strip() or f"nft failed (rc {rc})")
        return output

    def json(self, text: str) -> list[dict[str, Any]]:
        """The `nftables` array of a listing command's JSON output."""
        out = self.cmd(text, json_output=True)
        if not out.strip():
            return []
        items: list[dict[str, Any]] = json.loads(out).get("nftables", [])
        return items


def run_once(text: str) -> str:
    """`text` on a throwaway context: for big loads, whose cache should not outlive them."""
    with Nft() as nft:
        return nft.cmd(text)
