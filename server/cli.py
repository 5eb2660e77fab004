"""The ``rome-gateway`` command: ``serve`` runs the server; the other
subcommands are clients of a running server (through the client SDK).

    rome-gateway serve [--model ID_OR_PATH] [--host H] [--port P] [--device D] [--dtype T]
    rome-gateway trace-summary --data known_1000.json [--n 50] [--kind mlp] [--out trace_summary.png]
    rome-gateway eval --data counterfact.json [--n 100] [--hparam NAME=VALUE]
    rome-gateway eval --data counterfact.json --sequential 1000 --checkpoints 10,100,300 --method rome \
        --known known_1000.json [--start 1000] [--json seq.json] [--plot seq.png]

This module owns ``serve`` and the two jobs that load a model in this process
(``trace-summary``, ``eval``: argument handling around one call into ``rome_engine.jobs``).
The client commands (generate, score, info, health, trace, edit, edits, show-edit,
revert, export, import) and the pictures live in the client SDK, ``romegw_client.cli``
and ``romegw_client.plotting``; ``build_parser`` puts both halves under one command.

Every flag also reads an environment variable (ROMEGW_<FLAG>), e.g.
ROMEGW_MODEL, ROMEGW_PORT, ROMEGW_TARGET.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from romegw_client import TRACE_KINDS
from romegw_client.cli import EDIT_METHODS, add_client_commands, env, float_env, int_env, out, parse_hparams, run
from romegw_client.cli import build_parser as build_command_parser

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger("romegw")

# the served default: an edit that leaves its target less likely than not on its own prompt did not take
# (seen: P(target) 0.004 -> 0.010 after 30 s of v* steps); the library's EngineLimits default is 0
DEFAULT_MIN_TARGET_PROB = 0.5


# ------------------------------------------------------------------ serve


def add_serve(sub: argparse._SubParsersAction) -> None:
    from rome_engine.engine import EngineLimits

    d = EngineLimits()
    p = sub.add_parser("serve", help="serve a model over gRPC")
    p.add_argument("--model", default=env("model"), help="hub id or local folder (default: the embedded model)")
    p.add_argument("--host", default=env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int_env("port", 50051))
    p.add_argument("--device", default=env("device", "auto"), help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=env("dtype", "auto"), help="auto, float32, float16, bfloat16")
    p.add_argument("--max-prompt-tokens", type=int, default=int_env("max_prompt_tokens", d.max_prompt_tokens))
    p.add_argument("--max-new-tokens", type=int, default=int_env("max_new_tokens", d.max_new_tokens))
    p.add_argument(
        "--default-max-new-tokens", type=int, default=int_env("default_max_new_tokens", d.default_max_new_tokens)
    )
    p.add_argument(
        "--max-concurrent-streams", type=int, default=int_env("max_concurrent_streams", d.max_concurrent_streams)
    )
    p.add_argument(
        "--max-batch-size", type=int, default=int_env("max_batch_size", d.max_batch_size),
        help="streams decoded together in one forward pass (0: each stream on its own thread)",
    )
    p.add_argument(
        "--max-concurrent-rpcs", type=int, default=int_env("max_concurrent_rpcs", 256),
        help="calls in progress at once, all RPCs together (0: no limit); more are RESOURCE_EXHAUSTED",
    )
    p.add_argument("--grace-seconds", type=float, default=float_env("grace_seconds", 10.0))
    p.add_argument(
        "--prestop-seconds",
        type=float,
        default=float_env("prestop_seconds", 0.0),
        help="after SIGTERM, answer health NOT_SERVING but keep serving this long before the grace period",
    )
    p.add_argument(
        "--edit-store", type=edit_store_arg, default=env("edit_store"),
        help="folder of the edit layers, or postgresql://user@host/db?schema=NAME: a history replicas share",
    )
    p.add_argument("--cache-dir", type=Path, default=env("cache_dir"), help="converted models, statistics")
    p.add_argument("--corpus", type=Path, default=env("corpus"), help="text (.txt/.jsonl) for ROME's statistics")
    p.add_argument("--metrics-port", type=int, default=_opt_int("metrics_port"), help="Prometheus /metrics port")
    p.add_argument(
        "--tokens-file",
        type=Path,
        default=env("tokens_file"),
        help="bearer tokens with roles (see server/auth.py); also $ROMEGW_TOKENS",
    )
    p.add_argument("--tls-cert", type=Path, default=env("tls_cert"), help="server certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, default=env("tls_key"), help="server private key (PEM)")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        default=env("tls_client_ca"),
        help="CA of client certificates: turns on mutual TLS",
    )
    p.add_argument(
        "--insecure-allow-remote",
        action="store_true",
        default=env("insecure_allow_remote", "") in ("1", "true", "yes"),
        help="serve a non-loopback address without tokens",
    )
    p.add_argument(
        "--version-cache-mb", type=int, default=int_env("version_cache_mb", d.version_cache_mb),
        help="memory for the side paths of pinned edit versions (requests on a version other than the head)",
    )
    p.add_argument(
        "--max-version-wait", type=float, default=float_env("max_version_wait", d.max_version_wait),
        help="seconds a request's min_edit_version may wait for the server to know that version",
    )
    p.add_argument(
        "--max-import-files", type=int, default=int_env("max_import_files", d.max_import_files),
        help="layer files one ImportEdits call may send",
    )
    p.add_argument(
        "--max-import-bytes", type=int, default=int_env("max_import_bytes", d.max_import_bytes),
        help="total bytes of the layer files of one ImportEdits call",
    )
    p.add_argument(
        "--max-update-norm-ratio", type=float,
        default=float_env("max_update_norm_ratio", d.max_update_norm_ratio),
        help="refuse an imported or stored layer whose update norm exceeds this times its matrix's norm",
    )
    p.add_argument(
        "--edit-method", default=env("edit_method", d.edit_method), choices=["auto", *EDIT_METHODS],
        help="how an edit is computed unless its request names a method (auto: gated on the embedded model, "
        "the null-space projected mode on the MEMIT paper's GPT-2 XL and GPT-J ranges, rome otherwise)",
    )
    p.add_argument(
        "--max-batch-facts", type=int, default=int_env("max_batch_facts", d.max_batch_facts),
        help="facts of one ApplyEdits call (one layer, one version)",
    )
    p.add_argument(
        "--min-target-prob", type=float, default=float_env("min_target_prob", DEFAULT_MIN_TARGET_PROB),
        help="refuse an edit whose P(target) on its prompt after the edit stays below this (a request may "
        "set its own; 0 accepts every edit)",
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
            "--" + name.replace("_", "-"), type=int, default=int_env(name, default),
            help=f"{what} (default {default}; $ROMEGW_{name.upper()})",
        )  # fmt: skip


def edit_store_arg(value: str) -> Path | str:
    """A folder, or a PostgreSQL URL kept as given (as a Path its "//" would fold)."""
    return value if value.startswith(("postgresql://", "postgres://")) else Path(value)


def _opt_int(name: str) -> int | None:
    return int_env(name, 0) if env(name) else None


def check_serve_numbers(args: argparse.Namespace) -> None:
    """Every numeric serve flag (limits, ports, seconds) must be a finite number >= 0: SystemExit naming it."""
    for name, value in sorted(vars(args).items()):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")


def cmd_serve(args: argparse.Namespace) -> int:
    from rome_engine.engine import EngineLimits
    from rome_engine.errors import EngineError

    from .auth import load_tokens
    from .main import ServerConfig, TlsConfig, serve

    check_serve_numbers(args)
    if args.min_target_prob > 1:
        raise SystemExit(f"--min-target-prob is a probability in [0, 1], got {args.min_target_prob}")
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
        max_batch_size=args.max_batch_size,
        version_cache_mb=args.version_cache_mb,
        max_version_wait=args.max_version_wait,
        max_import_files=args.max_import_files,
        max_import_bytes=args.max_import_bytes,
        max_update_norm_ratio=args.max_update_norm_ratio,
        min_target_prob=args.min_target_prob,
        edit_method=args.edit_method,
        max_batch_facts=args.max_batch_facts,
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


def add_local_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that load a model in this process (no server)."""
    local = argparse.ArgumentParser(add_help=False)
    local.add_argument("--model", default=env("model"), help="hub id or local folder (default: the embedded model)")
    local.add_argument("--device", default=env("device", "auto"))
    local.add_argument("--dtype", default=env("dtype", "auto"))

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

    p = sub.add_parser("store", help="edit store maintenance (no model is loaded)")
    ssub = p.add_subparsers(dest="store_command", required=True)
    m = ssub.add_parser("migrate", help="copy a folder store's whole history into a new PostgreSQL schema")
    m.add_argument("--from", dest="source", type=Path, required=True, help="the folder store (--edit-store DIR)")
    m.add_argument("--to", dest="target", required=True, help="postgresql://user@host/db?schema=NAME (empty)")
    m.set_defaults(func=cmd_store_migrate)

    p = sub.add_parser("eval", parents=[local], help="CounterFact evaluation of ROME edits (edit, measure, undo)")
    p.add_argument("--data", type=Path, required=True, help="CounterFact records (EasyEdit or ROME format)")
    p.add_argument("--n", type=int, default=100, help="records to evaluate")
    p.add_argument("--start", type=int, default=0, help="first record")
    p.add_argument("--layer", type=int)
    p.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE", help="override (repeatable)")
    p.add_argument("--cache-dir", type=Path, default=env("cache_dir"))
    p.add_argument("--corpus", type=Path, default=env("corpus"))
    p.add_argument("--json", type=Path, help="write the report (with per-record scores) as JSON")
    s = p.add_argument_group("sequential evaluation (edits one after another, never reverted)")
    s.add_argument("--sequential", type=int, metavar="N", help="apply N records in a row instead of one at a time")
    s.add_argument("--checkpoints", help="edit counts to measure at, e.g. 10,100,300,1000 (N is always one)")
    s.add_argument("--method", default="rome", help="editing methods side by side, comma-separated")
    s.add_argument("--known", type=Path, help="known_1000.json: facts whose retention is measured")
    s.add_argument("--known-n", type=int, help="use the first K known facts (default: all)")
    s.add_argument("--fluency-tokens", type=int, default=40, help="greedy tokens per record for fluency (0: off)")
    s.add_argument("--store", type=Path, help="folder of the methods' edit stores (default: a temporary one)")
    s.add_argument("--plot", type=Path, default=Path("sequential_eval.png"), help="metric vs edits, per method")
    p.set_defaults(func=cmd_eval)


def cmd_store_migrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rome_engine.edit_store import MANIFEST, EditStore, Manifest
    from rome_engine.errors import EngineError
    from rome_engine.pg_store import PostgresEditStore, is_database_url, redacted

    if not is_database_url(args.target):
        log.error("--to must be a postgresql:// URL, got %r", args.target[:200])
        return 2
    try:
        model_id = Manifest.from_json((args.source / MANIFEST).read_bytes()).model_id
    except (OSError, ValueError) as e:
        log.error("%s is not a readable edit store (%s)", args.source, e)
        return 2
    try:
        folder = EditStore(args.source, model_id)
        target = PostgresEditStore(args.target, model_id)
        try:
            with tqdm(total=None, unit="layer", desc="copying layers", file=sys.stderr) as bar:
                n = target.copy_from(folder, progress=lambda done, total: _advance(bar, done, total))
        finally:
            target.close()
    except (EngineError, ValueError) as e:
        log.error("nothing was migrated: %s", e)
        return 2
    out(f"{n} history entries and {len(folder.manifest.apply_entries())} layers of {model_id} copied to "
        f"{target.location}; serve it with --edit-store {redacted(args.target)}\n")  # fmt: skip
    return 0


def cmd_trace_summary(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from tqdm import tqdm

    from rome_engine.jobs import summarize_facts, summary_table
    from romegw_client.plotting import draw_summary

    with tqdm(total=None, unit="fact", desc=f"tracing ({args.kind})", file=sys.stderr) as bar:
        summary = summarize_facts(
            args.model, args.data, device=args.device, dtype=args.dtype, kind=args.kind, samples=args.samples,
            window=args.window, min_clean_prob=args.min_prob, max_facts=args.n,
            progress=lambda done, total: _advance(bar, done, total),
        )  # fmt: skip
    draw_summary(
        {"last subject token": summary.last_subject_effect, "last token": summary.last_token_effect},
        kind=args.kind, n_facts=summary.n_facts, out_path=args.out,
    )
    out(summary_table(summary))
    out(f"peak at layer {summary.peak_layer} (last subject token); figure written to {args.out}\n")
    if args.json:
        args.json.write_text(json.dumps(asdict(summary), indent=1))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.sequential is not None:
        return cmd_eval_sequential(args)

    from rome_engine.jobs import evaluate_counterfact

    with tqdm(total=None, unit="edit", desc="evaluating", file=sys.stderr) as bar:
        report = evaluate_counterfact(
            args.model, args.data, device=args.device, dtype=args.dtype, start=args.start, n=args.n,
            cache_dir=args.cache_dir, corpus=args.corpus, hparams=parse_hparams(args.hparam), layer=args.layer,
            progress=lambda _stage, done, total: _advance(bar, done, total),
        )  # fmt: skip
    out(report.format_table() + "\n")
    if args.json:
        args.json.write_text(report.to_json())
        out(f"report written to {args.json}\n")
    return 0


def cmd_eval_sequential(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rome_engine.errors import EngineError
    from rome_engine.jobs import evaluate_sequential
    from rome_engine.sequential import SequentialConfig, parse_checkpoints

    json_path = args.json or Path("sequential_eval.json")
    with (
        tqdm(total=None, unit="edit", desc="sequential edits", file=sys.stderr, smoothing=0) as edits,
        tqdm(total=None, unit="seq", desc="measuring", file=sys.stderr, leave=False) as measuring,
    ):

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "edit":
                _advance(edits, done, total)
                return
            if stage != measuring.desc or done < measuring.n:  # a new measurement, or a new part of one
                measuring.reset(total)
                measuring.set_description_str(stage)
            _advance(measuring, done, total)

        try:
            config = SequentialConfig(
                checkpoints=parse_checkpoints(args.checkpoints, args.sequential),
                methods=tuple(m.strip() for m in args.method.split(",") if m.strip()),
                hparams=parse_hparams(args.hparam), layer=args.layer, fluency_tokens=args.fluency_tokens,
            )  # fmt: skip
            report = evaluate_sequential(
                args.model, args.data, config, device=args.device, dtype=args.dtype, start=args.start,
                known=args.known, known_n=args.known_n, cache_dir=args.cache_dir, corpus=args.corpus,
                store_dir=args.store, out=json_path, progress=progress,
                on_checkpoint=lambda r, cp: tqdm.write(r.format_checkpoint(cp.n_edits) + "\n", file=sys.stdout),
            )  # fmt: skip
        except EngineError as e:  # a bad flag (checkpoints, method), too few records, a used store folder
            log.error("%s", e)
            return 2
    out(report.format_tables())
    out(f"report written to {json_path}\n")
    try:
        from romegw_client.plotting import draw_sequential
    except ImportError as e:  # matplotlib is optional: the numbers are in the JSON
        log.warning("no plot (%s): pip install 'romegw-client[plot]'", e)
        return 0
    title = f"{report.model_id}: {len(report.case_ids)} sequential CounterFact edits"
    draw_sequential(report.curves(), out_path=args.plot, title=title)
    out(f"plot written to {args.plot}\n")
    return 0


def _advance(bar: tqdm, done: int, total: int) -> None:
    bar.total = total
    bar.update(done - bar.n)


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n\n")[0]
    return build_command_parser(add_serve, add_client_commands, add_local_commands, description=description)


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
