"""The ``rome-gateway`` command: ``serve`` runs the server; the other
subcommands are clients of a running server (through the client SDK).

    rome-gateway serve [--model ID_OR_PATH] [--host H] [--port P] [--device D] [--dtype T]
    rome-gateway generate "The capital of France is" [--max-new-tokens N] [--target HOST:PORT]
    rome-gateway score "The Eiffel Tower is in" " Paris" " Rome"
    rome-gateway info | health

Every flag also reads an environment variable (ROMEGW_<FLAG>), e.g.
ROMEGW_MODEL, ROMEGW_PORT, ROMEGW_TARGET.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from romegw_client import Client, GatewayError

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
    p.add_argument("--grace-seconds", type=float, default=float(_env("grace_seconds", "10")))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from rome_engine.engine import EngineLimits

    from .main import ServerConfig, serve

    limits = EngineLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        default_max_new_tokens=args.default_max_new_tokens,
        max_concurrent_streams=args.max_concurrent_streams,
    )
    config = ServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        limits=limits,
        grace_seconds=args.grace_seconds,
    )
    asyncio.run(serve(config))
    return 0


# ---------------------------------------------------------------- clients


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, token=_env("token"), timeout=args.timeout)


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=_env("target", "127.0.0.1:50051"), help="the server's host:port")
    common.add_argument("--timeout", type=float, default=600.0, help="deadline of the call, seconds")

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
        status = c.health()
    _out(status + "\n")
    return 0 if status == "SERVING" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rome-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=_env("log_level", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)
    add_client_commands(sub)
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
