"""Generate the gRPC stubs of the client package from ``proto/``.

Run by the client's build (``setup.py``) and by ``make proto``. The generated
modules land in ``romegw_client/_pb/`` and are not committed.

    python client/gen_stubs.py
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent / "proto"
PROTO_FILE = "romegw/v1/gateway.proto"
OUT = HERE / "romegw_client" / "_pb"


def generate(proto_root: Path = PROTO_ROOT, out: Path = OUT) -> None:
    from grpc_tools import protoc  # build-time dependency only

    source = proto_root / PROTO_FILE
    if not source.exists():
        if (out / "gateway_pb2.py").exists():
            return  # building from an sdist that already carries the stubs
        raise FileNotFoundError(f"{source} not found: build from a checkout of the repository")
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(source),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + str(source))
        gen = Path(tmp) / "romegw" / "v1"
        out.mkdir(parents=True, exist_ok=True)
        for f in gen.iterdir():
            text = f.read_text()
            # protoc writes absolute imports (from romegw.v1 import ...); the
            # stubs live inside our package, so make them relative.
            text = re.sub(r"^from romegw\.v1 import", "from . import", text, flags=re.M)
            (out / f.name).write_text(text)
    shutil.copy(source, out / "gateway.proto")


if __name__ == "__main__":
    generate()
    sys.stdout.write(f"stubs written to {OUT}\n")
