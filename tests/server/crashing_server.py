"""``rome-gateway serve`` that dies at a chosen disk write (crash-safety tests).

    python tests/server/crashing_server.py CRASH_AT MODE -- serve --model ... --edit-store ...

CRASH_AT counts atomic writes of the edit store (1 = the first write after the
start: the layer file of the first edit; 2 = its manifest). MODE says where in
that write the process dies: "partial" (half the temporary file written),
"before-rename" (temporary file complete, not renamed) or "after-rename"
(renamed, the folder not yet synced). CRASH_AT 0 never crashes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rome_engine import edit_store
from romegw_server import cli


def main() -> int:
    crash_at, mode = int(sys.argv[1]), sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    count = 0
    real_replace = os.replace

    def atomic_write(path: Path, data: bytes) -> None:
        nonlocal count
        count += 1
        if count != crash_at:
            return original(path, data)
        tmp = path.parent / f".{path.name}.crash.tmp"
        with open(tmp, "wb") as f:
            f.write(data if mode != "partial" else data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        if mode == "after-rename":
            real_replace(tmp, path)
        os._exit(137)

    original = edit_store.atomic_write
    edit_store.atomic_write = atomic_write
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
