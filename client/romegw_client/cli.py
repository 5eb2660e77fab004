"""The client commands of the ``rome-gateway`` command: each talks to a running server
through this SDK (grpcio + protobuf, no torch). ``serve`` and the jobs that load a model
in-process live in the server package (``romegw_server.cli``), whose parser adds these
commands beside its own; ``python -m romegw_client.cli`` runs them without the server installed.

    rome-gateway generate "The capital of France is" [--max-new-tokens N] [--target HOST:PORT]
    rome-gateway score "The Eiffel Tower is in" " Paris" " Rome"
    rome-gateway info | health
    rome-gateway trace "The Eiffel Tower is in" --subject "The Eiffel Tower" [--out trace.png]
    rome-gateway edit "{} is located in" --subject "The Eiffel Tower" --object " Rome"
    rome-gateway edits [--all] | show-edit ID | revert --to-version N | revert --edit-id ID
    rome-gateway export DIR [--from-version N] | import FILE...

Every flag also reads an environment variable (ROMEGW_<FLAG>), e.g. ROMEGW_TARGET.
The commands send the bearer token of $ROMEGW_TOKEN (never a flag: command lines end up
in logs), and speak TLS when told to (--tls, --tls-ca, --tls-client-cert) or when the
server's own $ROMEGW_TLS_CERT is set (so ``rome-gateway health`` beside a TLS server works
with the server's environment alone). ``trace`` draws a heatmap: it needs the ``plot``
extra (``pip install 'romegw-client[plot]'``: matplotlib, tqdm).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .client import Client, tls_credentials
from .errors import GatewayError
from .types import TRACE_KINDS, EditInfo, LayerFile, TraceResult

log = logging.getLogger("romegw")

AddCommands = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def env(name: str, default: str | None = None) -> str | None:
    """The value of $ROMEGW_<NAME>, the default of the flag ``--name``."""
    return os.environ.get(f"ROMEGW_{name.upper()}", default)


def _number_env(name: str, default: str, kind: type[int] | type[float]) -> int | float:
    raw = env(name, default)
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise SystemExit(f"${'ROMEGW_' + name.upper()} must be {what}, got {raw[:80]!r}") from None


def int_env(name: str, default: int) -> int:
    """$ROMEGW_<NAME> as an integer (SystemExit naming the variable if it is not one)."""
    return int(_number_env(name, str(default), int))


def float_env(name: str, default: float) -> float:
    """$ROMEGW_<NAME> as a number (SystemExit naming the variable if it is not one)."""
    return float(_number_env(name, str(default), float))


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def parse_hparams(items: list[str]) -> dict[str, float]:
    """``--hparam NAME=VALUE`` items as a dict of overrides."""
    hparams = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--hparam wants NAME=VALUE, got {item!r}")
        hparams[name.strip()] = float(value)
    return hparams


def _client(args: argparse.Namespace) -> Client:
    """A client with the TLS settings of the flags, else of the environment.

    TLS is on with --tls, --tls-ca or a client certificate, and also when $ROMEGW_TLS_CERT is set:
    that is the server's own certificate, so a client command run beside the server (the
    container's HEALTHCHECK) speaks TLS exactly when the server does.
    """
    if bool(args.tls_client_cert) != bool(args.tls_client_key):
        raise SystemExit("--tls-client-cert and --tls-client-key go together ($ROMEGW_TLS_CLIENT_CERT/_KEY)")
    credentials = None
    if args.tls or args.tls_ca or args.tls_client_cert or env("tls_cert"):
        credentials = tls_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key)
    return Client(
        args.target,
        token=env("token"),
        timeout=args.timeout,
        credentials=credentials,
        tls_server_name=args.tls_server_name,
    )


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=env("target", "127.0.0.1:50051"), help="the server's host:port")
    common.add_argument("--timeout", type=float, default=600.0, help="deadline of the call, seconds")
    common.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    common.add_argument("--tls-ca", type=Path, default=env("tls_ca"), help="CA certificate of the server (PEM)")
    common.add_argument(
        "--tls-client-cert", type=Path, default=env("tls_client_cert"), help="client certificate (mutual TLS)"
    )
    common.add_argument("--tls-client-key", type=Path, default=env("tls_client_key"), help="its private key")
    common.add_argument(
        "--tls-server-name",
        default=env("tls_server_name"),
        help="verify the server certificate for this name instead of the target's host",
    )

    p = sub.add_parser("generate", parents=[common], help="stream a completion to the terminal")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="a stop sequence (repeatable)")
    _add_pin(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", parents=[common], help="log-probabilities of continuations")
    p.add_argument("prompt")
    p.add_argument("continuations", nargs="+")
    _add_pin(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("info", parents=[common], help="what the server serves")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("health", parents=[common], help="the server's health status (exit 0 when SERVING)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("trace", parents=[common], help="causal trace of a fact, drawn as a heatmap")
    p.add_argument("prompt")
    p.add_argument("--subject", required=True, help="the words of the prompt to corrupt")
    p.add_argument("--answer", help="the answer to trace (default: the model's greedy next token)")
    p.add_argument("--kind", choices=list(TRACE_KINDS), default="hidden")
    p.add_argument("--samples", type=int)
    p.add_argument("--window", type=int)
    p.add_argument("--noise", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, default=Path("trace.png"), help="the heatmap (PNG)")
    _add_pin(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("edit", parents=[common], help="rewrite a fact, or a batch of facts, as a new version")
    p.add_argument("prompt", nargs="?",
                   help='a template with {} for the subject ("{} is located in"), or a prompt with it')
    p.add_argument("--subject")
    p.add_argument("--object", dest="new_object", help='the new object, e.g. " Rome"')
    p.add_argument("--from", dest="from_file", type=Path, metavar="FACTS.jsonl",
                   help='a batch instead: one JSON object per line, {"prompt", "subject", "target"}, written as '
                   "ONE layer and one version (method memit or projected)")
    p.add_argument("--method", default="", choices=["", *EDIT_METHODS],
                   help="how the edit is computed (default: the server's)")
    p.add_argument("--layer", type=int)
    p.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE", help="override (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="compute and report, change nothing")
    p.add_argument("--force", action="store_true", help="apply even if the target already is the model's answer")
    p.add_argument("--min-target-prob", type=float, default=None,
                   help="refuse the edit if P(new object) after it stays below this (default: the server's)")
    p.add_argument("--expected-version", type=int, help="refuse if the head version is not this one")
    p.add_argument("--author", default=env("author", os.environ.get("USER", "")))
    p.add_argument("--comment", default="")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("edits", parents=[common], help="list edit layers, newest first")
    p.add_argument("--all", action="store_true", help="also reverted layers")
    p.add_argument("--page-size", type=int, default=50)
    p.set_defaults(func=cmd_edits)

    p = sub.add_parser("show-edit", parents=[common], help="one edit layer with its whole header")
    p.add_argument("edit_id")
    p.set_defaults(func=cmd_show_edit)

    p = sub.add_parser("revert", parents=[common], help="go back to a version, or remove one layer")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--to-version", type=int)
    g.add_argument("--edit-id")
    p.add_argument("--author", default=env("author", os.environ.get("USER", "")))
    p.add_argument("--comment", default="")
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("export", parents=[common], help="save the layer files of a version range to a folder")
    p.add_argument("folder", type=Path)
    p.add_argument("--from-version", type=int, default=1)
    p.add_argument("--to-version", type=int)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", parents=[common], help="apply layer files computed on the same base model")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(func=cmd_import)


def _add_pin(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edit-version", type=int, help="run on this version of the edit history (0: the base model)")
    p.add_argument("--min-edit-version", type=int, help="run once the server knows this version (read your writes)")


def _pin(args: argparse.Namespace) -> dict[str, int | None]:
    return {"edit_version": args.edit_version, "min_edit_version": args.min_edit_version}


def cmd_generate(args: argparse.Namespace) -> int:
    params = {
        **_pin(args),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    last = None
    with _client(args) as c:
        for chunk in c.generate(args.prompt, **params):
            out(chunk.text)
            last = chunk
    out("\n")
    if last is not None:
        log.info(
            "finish=%s prompt_tokens=%d completion_tokens=%d edit_version=%d",
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
            last.edit_version,
        )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    with _client(args) as c:
        result = c.score(args.prompt, args.continuations, **_pin(args))
    width = max(len(repr(s.continuation)) for s in result.scores)
    for s in sorted(result.scores, key=lambda s: -s.total_logprob):
        out(f"{s.continuation!r:<{width}}  total {s.total_logprob:9.4f}  mean {s.mean_logprob:9.4f}\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.model_info()
    for key, value in vars(info).items():
        if key != "extra":
            out(f"{key:>24}: {value}\n")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.health(timeout=min(args.timeout, 5.0))  # a health check answers fast or not at all
    out(status + "\n")
    return 0 if status == "SERVING" else 1


def cmd_trace(args: argparse.Namespace) -> int:
    try:
        from tqdm import tqdm

        from .plotting import draw_trace
    except ImportError as e:  # the plot extra is not installed
        raise SystemExit(f"the trace command draws a heatmap: pip install 'romegw-client[plot]' ({e})") from e

    options = {k: getattr(args, k) for k in ("answer", "kind", "samples", "window", "noise", "seed")} | _pin(args)
    result = None
    with _client(args) as c, tqdm(total=None, unit="cell", desc=f"tracing ({args.kind})", file=sys.stderr) as bar:
        for event in c.trace(args.prompt, args.subject, **options):
            if isinstance(event, TraceResult):
                result = event
            else:
                bar.total = event.total
                bar.update(event.done - bar.n)
    if result is None:
        raise SystemExit("the server sent no trace result")
    draw_trace(
        result.tokens,
        result.scores,
        result.subject_range,
        kind=result.kind,
        answer=result.answer,
        clean_prob=result.clean_prob,
        corrupted_prob=result.corrupted_prob,
        out_path=args.out,
        window=result.window,
    )
    token, layer = result.peak
    out(
        f"answer {result.answer!r}: clean p={result.clean_prob:.3f}, corrupted p={result.corrupted_prob:.3f}\n"
        f"peak: token {token} ({result.tokens[token]!r}) at layer {layer}, "
        f"restored p={result.scores[token][layer]:.3f}\n"
        f"heatmap written to {args.out} ({result.seconds:.1f} s on the server, edit version {result.edit_version})\n"
    )
    return 0


def _edit_line(e: EditInfo) -> str:
    state = "active" if e.active else "reverted"
    return (
        f"v{e.version:<4} {e.edit_id}  {state:8}  layer {e.layer:<3} {e.prompt.replace('{}', e.subject)!r} -> "
        f"{e.target!r}  P(target) {e.target_before:.3f} -> {e.target_after:.3f}  by {e.author or '-'} {e.created_at}\n"
    )


EDIT_METHODS = ("rome", "memit", "projected", "ft", "gated")
MAX_FACTS_FILE_BYTES = 16 * 1024 * 1024


def read_facts(path: Path) -> list[tuple[str, str, str]]:
    """(prompt, subject, target) of each line of a JSONL file; SystemExit naming the first bad line."""
    if path.stat().st_size > MAX_FACTS_FILE_BYTES:
        raise SystemExit(f"{path} is over {MAX_FACTS_FILE_BYTES} bytes: send the facts in smaller batches")
    facts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            fact = tuple(doc[k] for k in ("prompt", "subject", "target"))
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}:{n}: not a fact ({e}): write {{\"prompt\", \"subject\", \"target\"}}") from None
        if not all(isinstance(x, str) for x in fact):
            raise SystemExit(f"{path}:{n}: prompt, subject and target must be strings")
        facts.append(fact)
    if not facts:
        raise SystemExit(f"{path} holds no facts")
    return facts


def cmd_edit(args: argparse.Namespace) -> int:
    options = {
        "layer": args.layer, "hparams": parse_hparams(args.hparam), "dry_run": args.dry_run,
        "expected_version": args.expected_version, "author": args.author, "comment": args.comment,
        "force": args.force, "min_target_prob": args.min_target_prob, "method": args.method,
    }  # fmt: skip
    if args.from_file is not None:
        if args.prompt or args.subject or args.new_object:
            raise SystemExit("give either --from FACTS.jsonl or a prompt with --subject and --object, not both")
        facts = read_facts(args.from_file)
        with _client(args) as c, _spinner(f"computing the edit of {len(facts)} facts"):
            r = c.apply_edits(facts, **options)
    else:
        if not (args.prompt and args.subject and args.new_object):
            raise SystemExit("give a prompt with --subject and --object, or --from FACTS.jsonl")
        with _client(args) as c, _spinner("computing the edit"):
            r = c.apply_edit(args.prompt, args.subject, args.new_object, **options)
    e = r.edit
    out(("dry run (nothing changed): " if r.dry_run else f"applied as version {e.version}: ") + _edit_line(e))
    for f in e.facts[1:]:
        out(f"  also {f.prompt.replace('{}', f.subject)!r} -> {f.target!r}  P(target) {f.target_before:.3f} -> "
            f"{f.target_after:.3f}\n")
    if r.below_min_target_prob:
        out(f"  the edit did not take: a P(target) is below min_target_prob {r.min_target_prob:g} "
            "(ApplyEdit would refuse it)\n")
    out(
        f"  {e.method} on layers {list(e.layers) or [e.layer]}; P({e.old_object!r}) {e.old_before:.3f} -> "
        f"{e.old_after:.3f}; computed in {e.compute_seconds:.1f} s; head version {r.head_version}\n"
    )
    return 0


def cmd_edits(args: argparse.Namespace) -> int:
    token = ""
    with _client(args) as c:
        while True:
            page = c.list_edits(page_size=args.page_size, page_token=token, include_inactive=args.all)
            for e in page.edits:
                out(_edit_line(e))
            token = page.next_page_token
            if not token:
                break
    out(f"head version {page.head_version}\n")
    return 0


def cmd_show_edit(args: argparse.Namespace) -> int:
    import json

    with _client(args) as c:
        e = c.get_edit(args.edit_id)
    out(json.dumps({**e.header, "active": e.active, "served_version": e.version}, indent=2) + "\n")
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.revert_edit(to_version=args.to_version, edit_id=args.edit_id, author=args.author, comment=args.comment)
    out(
        f"head version {r.head_version}, {r.active_layers} active layers; removed {list(r.removed_edit_ids)} "
        f"in {r.seconds * 1000:.0f} ms\n"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json

    with _client(args) as c:
        files = c.export_edits(args.from_version, args.to_version)
    args.folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (args.folder / f.filename).write_bytes(f.content)
    order = [{"file": f.filename, "version": f.version, "edit_id": f.edit_id, "sha256": f.sha256} for f in files]
    (args.folder / "export.json").write_text(json.dumps(order, indent=1))
    out(f"{len(files)} layer files written to {args.folder} (order in export.json)\n")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    files = [LayerFile(p.name, p.read_bytes(), 0, "", "") for p in args.files]
    with _client(args) as c:
        imported = c.import_edits(files)
    for e in imported:
        out("imported " + _edit_line(e))
    return 0


@contextlib.contextmanager
def _spinner(what: str) -> Iterator[None]:
    """Elapsed seconds on stderr while a unary call runs (edits take seconds to minutes)."""
    done = threading.Event()

    def tick() -> None:
        t0 = time.monotonic()
        while not done.wait(0.5):
            sys.stderr.write(f"\r{what}... {time.monotonic() - t0:5.1f} s")
            sys.stderr.flush()
        sys.stderr.write("\r" + " " * (len(what) + 16) + "\r")

    if not sys.stderr.isatty():
        yield
        return
    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def build_parser(*commands: AddCommands, description: str | None = None) -> argparse.ArgumentParser:
    """The ``rome-gateway`` parser with the commands each of ``commands`` adds (default: the client commands)."""
    parser = argparse.ArgumentParser(prog="rome-gateway", description=description or __doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=env("log_level", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in commands or (add_client_commands,):
        add(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, set up logging and run the chosen command; its exit code (2 on a gateway error)."""
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except GatewayError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
