"""The client half of the ``rome-gateway`` command: torch-free, and the same commands under both parsers."""

from __future__ import annotations

import argparse
import subprocess
import sys

from romegw_client.cli import build_parser

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'rome_engine', 'numpy', 'romegw_server', 'matplotlib'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import romegw_client.cli as cli
parser = cli.build_parser()
args = parser.parse_args(['health', '--target', '127.0.0.1:1'])
assert args.func is cli.cmd_health
assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules
try:  # without the plot extra, trace says what to install before it calls the server
    cli.main(['trace', 'x is in', '--subject', 'x', '--target', '127.0.0.1:1'])
except SystemExit as e:
    assert "pip install 'romegw-client[plot]'" in str(e), e
print('ok')
"""


def test_client_cli_imports_with_torch_absent() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


def test_server_parser_has_serve_the_client_commands_and_the_jobs() -> None:
    from romegw_server.cli import build_parser as build_server_parser

    client, server = _commands(build_parser()), _commands(build_server_parser())
    assert set(client) == {
        "generate", "score", "info", "health", "trace", "edit", "edits", "show-edit", "revert", "export", "import"
    }  # fmt: skip
    assert set(server) == set(client) | {"serve", "trace-summary", "eval", "store"}
    for name in client:  # the same flags under both
        assert [a.option_strings for a in client[name]._actions] == [a.option_strings for a in server[name]._actions]
