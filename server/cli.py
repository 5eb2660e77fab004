"""The ``rome-gateway`` command: ``serve`` runs the server; the other
subcommands are clients of a running server (through the client SDK).

    rome-gateway serve [--model ID_OR_PATH] [--host H] [--port P] [--device D] [--dtype T]
    rome-gateway generate "The capital of France is" [--max-new-tokens N] [--target HOST:PORT]
    rome-gateway score "The Eiffel Tower is in" " Paris" " Rome"
    rome-gateway info | health
    rome-gateway edit "{} is located in" --subject "The Eiffel Tower" --object " Rome"
    rome-gateway edits [--all] | show-edit ID | revert --to-version N | revert --edit-id ID
    rome-gateway export DIR [--from-version N] | import FILE...

Every flag also reads an environment variable (ROMEGW_<FLAG>), e.g.
ROMEGW_MODEL, ROMEGW_PORT, ROMEGW_TARGET. Client commands send the bearer
token of $ROMEGW_TOKEN (never a flag: command lines end up in logs), and speak
TLS when told to (--tls, --tls-ca, --tls-client-cert) or when the server's own
$ROMEGW_TLS_CERT is set (so ``rome-gateway health`` beside a TLS server works
with the server's environment alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from romegw_client import TRACE_KINDS, Client, EditInfo, GatewayError, TraceResult

log = logging.getLogger("romegw")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"ROMEGW_{name.upper()}", default)


def _int_env(name: str, default: int) -> int:
    return int(_env(name, str(default)))


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ------------------------------------------------------------------ serve


def add_serve(sub: argparse._SubParsersAction) -> None:
    from rome_engine.engine import EngineLimits

    d = EngineLimits()
    p = sub.add_parser("serve", help="serve a model over gRPC")
    p.add_argument("--model", default=_env("model"), help="hub id or local folder (default: the embedded model)")
    p.add_argument("--host", default=_env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_int_env("port", 50051))
    p.add_argument("--device", default=_env("device", "auto"), help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=_env("dtype", "auto"), help="auto, float32, float16, bfloat16")
    p.add_argument("--max-prompt-tokens", type=int, default=_int_env("max_prompt_tokens", d.max_prompt_tokens))
    p.add_argument("--max-new-tokens", type=int, default=_int_env("max_new_tokens", d.max_new_tokens))
    p.add_argument(
        "--default-max-new-tokens", type=int, default=_int_env("default_max_new_tokens", d.default_max_new_tokens)
    )
    p.add_argument(
        "--max-concurrent-streams", type=int, default=_int_env("max_concurrent_streams", d.max_concurrent_streams)
    )
    p.add_argument(
        "--max-concurrent-rpcs", type=int, default=_int_env("max_concurrent_rpcs", 256),
        help="calls in progress at once, all RPCs together (0: no limit); more are RESOURCE_EXHAUSTED",
    )
    p.add_argument("--grace-seconds", type=float, default=float(_env("grace_seconds", "10")))
    p.add_argument(
        "--prestop-seconds",
        type=float,
        default=float(_env("prestop_seconds", "0")),
        help="after SIGTERM, answer health NOT_SERVING but keep serving this long before the grace period",
    )
    p.add_argument("--edit-store", type=Path, default=_env("edit_store"), help="folder of the edit layers")
    p.add_argument("--cache-dir", type=Path, default=_env("cache_dir"), help="converted models, statistics")
    p.add_argument("--corpus", type=Path, default=_env("corpus"), help="text (.txt/.jsonl) for ROME's statistics")
    p.add_argument("--metrics-port", type=int, default=_opt_int("metrics_port"), help="Prometheus /metrics port")
    p.add_argument(
        "--tokens-file",
        type=Path,
        default=_env("tokens_file"),
        help="bearer tokens with roles (see server/auth.py); also $ROMEGW_TOKENS",
    )
    p.add_argument("--tls-cert", type=Path, default=_env("tls_cert"), help="server certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, default=_env("tls_key"), help="server private key (PEM)")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        default=_env("tls_client_ca"),
        help="CA of client certificates: turns on mutual TLS",
    )
    p.add_argument(
        "--insecure-allow-remote",
        action="store_true",
        default=_env("insecure_allow_remote", "") in ("1", "true", "yes"),
        help="serve a non-loopback address without tokens",
    )
    p.add_argument("--edit-drain-timeout", type=float, default=float(_env("edit_drain_timeout", d.edit_drain_timeout)))
    p.add_argument(
        "--max-import-files", type=int, default=_int_env("max_import_files", d.max_import_files),
        help="layer files one ImportEdits call may send",
    )
    p.add_argument(
        "--max-import-bytes", type=int, default=_int_env("max_import_bytes", d.max_import_bytes),
        help="total bytes of the layer files of one ImportEdits call",
    )
    p.add_argument(
        "--max-update-norm-ratio", type=float,
        default=float(_env("max_update_norm_ratio", d.max_update_norm_ratio)),
        help="refuse an imported or stored layer whose update norm exceeds this times its matrix's norm",
    )
    _add_admission_flags(p, d)
    p.set_defaults(func=cmd_serve)


# the admission-control and edit-size limits: each a flag, a ROMEGW_* variable and an EngineLimits field
_ADMISSION_LIMITS = (
    ("max_concurrent_traces", "Trace calls running at once, 0: no limit"),
    ("max_concurrent_scores", "Score calls running at once, 0: no limit"),
    ("max_tokens_in_flight", "prompt + new tokens of all running generate/score/trace/edit work, 0: no limit"),
    ("max_request_memory_mb", "refuse a call whose memory estimate is above this many MB, 0: no limit"),
    ("max_memory_in_flight_mb", "refuse work when the running calls' estimates would sum above this, 0: no limit"),
    ("max_continuation_chars", "characters of one Score continuation"),
    ("max_edit_chars", "characters of an edit's prompt, subject or target"),
    ("max_edit_prompt_tokens", "tokens of an edit's prompt"),
    ("max_edit_subject_tokens", "tokens of an edit's subject"),
    ("max_edit_target_tokens", "tokens of an edit's target"),
)


def _add_admission_flags(p: argparse.ArgumentParser, d: object) -> None:
    for name, what in _ADMISSION_LIMITS:
        default = getattr(d, name)
        p.add_argument(
            "--" + name.replace("_", "-"), type=int, default=_int_env(name, default),
            help=f"{what} (default {default}; $ROMEGW_{name.upper()})",
        )  # fmt: skip


def _opt_int(name: str) -> int | None:
    value = _env(name)
    return int(value) if value else None


def cmd_serve(args: argparse.Namespace) -> int:
    from rome_engine.engine import EngineLimits
    from rome_engine.errors import EngineError

    from .auth import load_tokens
    from .main import ServerConfig, TlsConfig, serve

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)

    limits = EngineLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        default_max_new_tokens=args.default_max_new_tokens,
        max_concurrent_streams=args.max_concurrent_streams,
        edit_drain_timeout=args.edit_drain_timeout,
        max_import_files=args.max_import_files,
        max_import_bytes=args.max_import_bytes,
        max_update_norm_ratio=args.max_update_norm_ratio,
        **{name: getattr(args, name) for name, _ in _ADMISSION_LIMITS},
    )
    config = ServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        limits=limits,
        grace_seconds=args.grace_seconds,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        prestop_seconds=args.prestop_seconds,
        edit_store=args.edit_store,
        cache_dir=args.cache_dir,
        corpus=args.corpus,
        metrics_port=args.metrics_port,
        tokens=load_tokens(args.tokens_file),
        tls=tls,
        insecure_allow_remote=args.insecure_allow_remote,
    )
    try:
        asyncio.run(serve(config))
    except (ValueError, EngineError) as e:  # a bad flag, a damaged checkpoint or edit store: say what, exit 2
        log.error("%s", e)
        return 2
    return 0


# ---------------------------------------------------------------- clients


def _client(args: argparse.Namespace) -> Client:
    """A client with the TLS settings of the flags, else of the environment.

    TLS is on with --tls, --tls-ca or a client certificate, and also when $ROMEGW_TLS_CERT is set:
    that is the server's own certificate, so a client command run beside the server (the
    container's HEALTHCHECK) speaks TLS exactly when the server does.
    """
    from romegw_client import tls_credentials

    if bool(args.tls_client_cert) != bool(args.tls_client_key):
        raise SystemExit("--tls-client-cert and --tls-client-key go together ($ROMEGW_TLS_CLIENT_CERT/_KEY)")
    credentials = None
    if args.tls or args.tls_ca or args.tls_client_cert or _env("tls_cert"):
        credentials = tls_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key)
    return Client(
        args.target,
        token=_env("token"),
        timeout=args.timeout,
        credentials=credentials,
        tls_server_name=args.tls_server_name,
    )


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=_env("target", "127.0.0.1:50051"), help="the server's host:port")
    common.add_argument("--timeout", type=float, default=600.0, help="deadline of the call, seconds")
    common.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    common.add_argument("--tls-ca", type=Path, default=_env("tls_ca"), help="CA certificate of the server (PEM)")
    common.add_argument(
        "--tls-client-cert", type=Path, default=_env("tls_client_cert"), help="client certificate (mutual TLS)"
    )
    common.add_argument("--tls-client-key", type=Path, default=_env("tls_client_key"), help="its private key")
    common.add_argument(
        "--tls-server-name",
        default=_env("tls_server_name"),
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
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", parents=[common], help="log-probabilities of continuations")
    p.add_argument("prompt")
    p.add_argument("continuations", nargs="+")
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
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("edit", parents=[common], help="rewrite a fact (ROME) as a new version")
    p.add_argument("prompt", help='a template with {} for the subject ("{} is located in"), or a prompt with it')
    p.add_argument("--subject", required=True)
    p.add_argument("--object", required=True, dest="new_object", help='the new object, e.g. " Rome"')
    p.add_argument("--layer", type=int)
    p.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE", help="override (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="compute and report, change nothing")
    p.add_argument("--force", action="store_true", help="apply even if the target already is the model's answer")
    p.add_argument("--expected-version", type=int, help="refuse if the head version is not this one")
    p.add_argument("--author", default=_env("author", os.environ.get("USER", "")))
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
    p.add_argument("--author", default=_env("author", os.environ.get("USER", "")))
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


def cmd_generate(args: argparse.Namespace) -> int:
    params = {
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
            _out(chunk.text)
            last = chunk
    _out("\n")
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
        result = c.score(args.prompt, args.continuations)
    width = max(len(repr(s.continuation)) for s in result.scores)
    for s in sorted(result.scores, key=lambda s: -s.total_logprob):
        _out(f"{s.continuation!r:<{width}}  total {s.total_logprob:9.4f}  mean {s.mean_logprob:9.4f}\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.model_info()
    for key, value in vars(info).items():
        if key != "extra":
            _out(f"{key:>24}: {value}\n")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.health(timeout=min(args.timeout, 5.0))  # a health check answers fast or not at all
    _out(status + "\n")
    return 0 if status == "SERVING" else 1


def cmd_trace(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .plotting import draw_trace

    options = {k: getattr(args, k) for k in ("answer", "kind", "samples", "window", "noise", "seed")}
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
    _out(
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


def _parse_hparams(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--hparam wants NAME=VALUE, got {item!r}")
        out[name.strip()] = float(value)
    return out


def cmd_edit(args: argparse.Namespace) -> int:
    with _client(args) as c, _spinner("computing the edit"):
        r = c.apply_edit(
            args.prompt,
            args.subject,
            args.new_object,
            layer=args.layer,
            hparams=_parse_hparams(args.hparam),
            dry_run=args.dry_run,
            expected_version=args.expected_version,
            author=args.author,
            comment=args.comment,
            force=args.force,
        )
    e = r.edit
    _out(("dry run (nothing changed): " if r.dry_run else f"applied as version {e.version}: ") + _edit_line(e))
    _out(
        f"  P({e.old_object!r}) {e.old_before:.3f} -> {e.old_after:.3f}; computed in {e.compute_seconds:.1f} s; "
        f"head version {r.head_version}\n"
    )
    return 0


def cmd_edits(args: argparse.Namespace) -> int:
    token = ""
    with _client(args) as c:
        while True:
            page = c.list_edits(page_size=args.page_size, page_token=token, include_inactive=args.all)
            for e in page.edits:
                _out(_edit_line(e))
            token = page.next_page_token
            if not token:
                break
    _out(f"head version {page.head_version}\n")
    return 0


def cmd_show_edit(args: argparse.Namespace) -> int:
    import json

    with _client(args) as c:
        e = c.get_edit(args.edit_id)
    _out(json.dumps({**e.header, "active": e.active, "served_version": e.version}, indent=2) + "\n")
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.revert_edit(to_version=args.to_version, edit_id=args.edit_id, author=args.author, comment=args.comment)
    _out(
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
    _out(f"{len(files)} layer files written to {args.folder} (order in export.json)\n")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from romegw_client import LayerFile

    files = [LayerFile(p.name, p.read_bytes(), 0, "", "") for p in args.files]
    with _client(args) as c:
        imported = c.import_edits(files)
    for e in imported:
        _out("imported " + _edit_line(e))
    return 0


@contextlib.contextmanager
def _spinner(what: str):
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


def add_local_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that load a model in this process (no server)."""
    local = argparse.ArgumentParser(add_help=False)
    local.add_argument("--model", default=_env("model"), help="hub id or local folder (default: the embedded model)")
    local.add_argument("--device", default=_env("device", "auto"))
    local.add_argument("--dtype", default=_env("dtype", "auto"))

    p = sub.add_parser("trace-summary", parents=[local], help="average causal effect by layer over many facts")
    p.add_argument("--data", type=Path, required=True, help="known_1000.json (subject, attribute, template, prompt)")
    p.add_argument("--n", type=int, default=50, help="facts to average")
    p.add_argument("--kind", choices=list(TRACE_KINDS), default="mlp")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--min-prob", type=float, default=0.05, help="skip facts the model gives less than this")
    p.add_argument("--out", type=Path, default=Path("trace_summary.png"))
    p.add_argument("--json", type=Path, help="also write the numbers as JSON")
    p.set_defaults(func=cmd_trace_summary)

    p = sub.add_parser("eval", parents=[local], help="CounterFact evaluation of ROME edits (edit, measure, undo)")
    p.add_argument("--data", type=Path, required=True, help="CounterFact records (EasyEdit or ROME format)")
    p.add_argument("--n", type=int, default=100, help="records to evaluate")
    p.add_argument("--start", type=int, default=0, help="first record")
    p.add_argument("--layer", type=int)
    p.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE", help="override (repeatable)")
    p.add_argument("--cache-dir", type=Path, default=_env("cache_dir"))
    p.add_argument("--corpus", type=Path, default=_env("corpus"))
    p.add_argument("--json", type=Path, help="write the report (with per-record scores) as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_trace_summary(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from tqdm import tqdm

    from rome_engine.loading import load_model
    from rome_engine.tracing import load_known_facts, trace_summary

    from .plotting import draw_summary

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    facts = load_known_facts(args.data)
    with tqdm(total=len(facts), unit="fact", desc=f"tracing ({args.kind})", file=sys.stderr) as bar:
        summary = trace_summary(
            loaded, facts, kind=args.kind, samples=args.samples, window=args.window, min_clean_prob=args.min_prob,
            max_facts=args.n, progress=lambda done, _total: bar.update(done - bar.n),
        )
    draw_summary(
        {"last subject token": summary.last_subject_effect, "last token": summary.last_token_effect},
        kind=args.kind, n_facts=summary.n_facts, out_path=args.out,
    )
    _out(f"{summary.n_facts} facts ({summary.n_skipped} skipped), {summary.seconds:.0f} s\n")
    _out("layer  IE@last-subject  IE@last-token\n")
    for layer, (a, b) in enumerate(zip(summary.last_subject_effect, summary.last_token_effect, strict=True)):
        _out(f"{layer:5d}  {a:15.4f}  {b:13.4f}\n")
    _out(f"peak at layer {summary.peak_layer} (last subject token); figure written to {args.out}\n")
    if args.json:
        args.json.write_text(json.dumps(asdict(summary), indent=1))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rome_engine.evaluation import load_counterfact, run_eval
    from rome_engine.loading import default_cache_dir, load_model
    from rome_engine.rome import RomeCache

    loaded = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    records = load_counterfact(args.data, start=args.start, n=args.n)
    cache = RomeCache(args.cache_dir or default_cache_dir(), corpus=args.corpus)
    with tqdm(total=len(records), unit="edit", desc="evaluating", file=sys.stderr) as bar:
        report = run_eval(
            loaded, records, cache, hparams=_parse_hparams(args.hparam), layer=args.layer,
            progress=lambda _stage, done, _total: bar.update(done - bar.n),
        )
    _out(report.format_table() + "\n")
    if args.json:
        args.json.write_text(report.to_json())
        _out(f"report written to {args.json}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rome-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=_env("log_level", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)
    add_client_commands(sub)
    add_local_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except GatewayError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
