"""Generate the Python modules for gobgpd's gRPC API (gobgp v3, `package apipb`) at build time.

    python -m kube2ipvs_bgp_speaker.genproto [--protos DIR] [--out DIR]

gobgp's .proto files are not part of this repository: they come from Debian's
`golang-github-osrg-gobgp-dev` package (the same release as the gobgpd package) and the code
is generated from them by grpcio-tools' protoc, into a package of its own, `kube2ipvs_gobgpapi`,
in the interpreter's site-packages (or `--out`). `make install` runs this; so does the image build.

The protos import each other as flat files (`import "gobgp.proto"`), which protoc turns into
top-level `import gobgp_pb2`. They are copied into a folder named after the package, with those
imports rewritten, so the generated modules import `kube2ipvs_gobgpapi.gobgp_pb2` instead. The
proto package stays `apipb`, so the gRPC paths stay `/apipb.GobgpApi/...`, which gobgpd 3.x serves.
Type stubs (.pyi) are generated beside the modules, with a `py.typed` marker for mypy.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

PACKAGE: Final = "kube2ipvs_gobgpapi"
DEBIAN_PROTOS: Final = Path("/usr/share/gocode/src/github.com/osrg/gobgp/api")
PROTOS: Final = ("gobgp.proto", "attribute.proto", "capability.proto")
_FLAT_IMPORT: Final = re.compile(r'^import "((?:gobgp|attribute|capability)\.proto)";', re.MULTILINE)


def generate(protos: Path, out: Path) -> Path:
    """Write `out/kube2ipvs_gobgpapi/` (replacing an older one) and return that folder."""
    from grpc_tools import protoc  # a build-time tool only (dev dependency)

    missing = [name for name in PROTOS if not (protos / name).is_file()]
    if missing:
        raise SystemExit(f"error: {protos}: no {', '.join(missing)} (apt-get install golang-github-osrg-gobgp-dev)")
    with tempfile.TemporaryDirectory(prefix="k2i-gobgpapi-") as tmp:
        src = Path(tmp, "protos", PACKAGE)
        src.mkdir(parents=True)
        for name in PROTOS:
            text = (protos / name).read_text()
            (src / name).write_text(_FLAT_IMPORT.sub(rf'import "{PACKAGE}/\1";', text))
        build = Path(tmp, "out")
        build.mkdir()
        include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpcio-tools
        args = ["protoc", f"-I{src.parent}", f"-I{include}", f"--python_out={build}", f"--pyi_out={build}",
                *(str(src / name) for name in PROTOS)]
        if protoc.main(args) != 0:
            raise SystemExit(f"error: protoc failed on {protos}")
        package = build / PACKAGE
        (package / "__init__.py").write_text(
            f'"""gobgp v3 API (package apipb), generated from {protos} at build time."""\n')
        (package / "py.typed").write_text("")
        target = out / PACKAGE
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(package, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kube2ipvs_bgp_speaker.genproto", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protos", type=Path, default=DEBIAN_PROTOS,
                        help=f"folder with gobgp's {', '.join(PROTOS)} (default {DEBIAN_PROTOS})")
    parser.add_argument("--out", type=Path, default=Path(sysconfig.get_paths()["purelib"]),
                        help="where the package folder goes (default: this interpreter's site-packages)")
    args = parser.parse_args(argv)
    target = generate(args.protos, args.out)
    print(f"generated {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
