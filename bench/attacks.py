"""Re-run the attacks of the security review against a real ``rome-gateway serve`` process.

Each attack talks raw gRPC (so that the SDK's own checks do not hide what the
server does), on a tiny random Llama model saved to a temporary folder, and
reports the status code the server answered and what the attack did to the
server: the head version, files written outside ``layers/``, the served
answer, resident memory, how long health checks waited, whether the server
can start again on its store.

    python bench/attacks.py                  # table on stdout
    python bench/attacks.py --json out.json  # and the rows as JSON

Run it on two checkouts to get a before/after table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, gateway_command, write_json
from rome_engine.loading import ensure_embedded_folder
from romegw_client.pb import gateway_pb2 as pb
from romegw_client.pb import gateway_pb2_grpc as pb_grpc

log = logging.getLogger("attacks")
FAST = {"v_num_grad_steps": 3, "mom2_n_tokens": 2000, "ctx_n_short": 1, "ctx_n_long": 1}
HEALTH = "/grpc.health.v1.Health/Check"


def save_tiny(folder: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(ensure_embedded_folder())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class Gateway:
    """One ``rome-gateway serve`` process on a free loopback port."""

    def __init__(self, model: Path, store: Path, cache: Path, *extra: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = store.parent / f"serve-{self.port}.log"
        cmd = [*gateway_command(), "serve", "--model", str(model), "--edit-store", str(store),
               "--cache-dir", str(cache), "--port", str(self.port), "--device", "cpu", "--min-target-prob", "0",
               *extra]  # fmt: skip
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.RomeGatewayStub(self.channel)
        self.ps = psutil.Process(self.proc.pid)

    def serving(self, timeout: float = 120.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(grpc.RpcError):
                if self.health(2.0)[0] == "SERVING":
                    return True
            time.sleep(0.2)
        return False

    def health(self, timeout: float = 5.0) -> tuple[str, float]:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        t0 = time.perf_counter()
        try:
            r = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            status = e.code().name
        return status, time.perf_counter() - t0

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def head(self) -> int:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).head_version

    def answer(self) -> str:
        req = pb.GenerateRequest(prompt="The capital of France is", max_new_tokens=6)
        return "".join(m.text for m in self.stub.Generate(req, timeout=60))

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def code_of(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        out = fn()
        if hasattr(out, "__iter__") and not hasattr(out, "SerializeToString"):
            list(out)
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, (e.details() or "")[:120]


class _Sampler:
    """Calls ``sample()`` every ``interval`` seconds on a thread while in the with block."""

    interval = 0.05

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Sampler:
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.is_set():
                self.sample()
                time.sleep(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class RssPeak(_Sampler):
    """The peak resident memory of the server process."""

    def __init__(self, gw: Gateway) -> None:
        self.gw, self.peak = gw, gw.rss_mb()

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, self.gw.rss_mb())


class HealthProbe(_Sampler):
    """The longest health-check wait (probed every 200 ms)."""

    interval = 0.2

    def __init__(self, gw: Gateway) -> None:
        self.gw, self.worst, self.failed = gw, 0.0, 0

    def sample(self) -> None:
        status, seconds = self.gw.health(timeout=30)
        self.worst = max(self.worst, seconds)
        self.failed += status != "SERVING"


# ------------------------------------------------------------------ layer files


def mutate(data: bytes, header: Callable[[dict], None] | None = None,
           tensors: Callable[[dict], None] | None = None) -> bytes:  # fmt: skip
    """A layer file with its JSON header and/or its tensors changed."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    h = json.loads(meta["romegw"])
    if header:
        header(h)
    ts = st_load(data)
    if tensors:
        tensors(ts)
    return st_save(ts, metadata={"romegw": json.dumps(h)})


def import_files(gw: Gateway, blobs: list[bytes]) -> tuple[str, str]:
    return code_of(lambda: gw.stub.ImportEdits(iter([pb.EditLayerFile(content=b) for b in blobs]), timeout=120))


def files_outside(root: Path, before: set[Path]) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p not in before)


# ------------------------------------------------------------------ the attacks


@contextlib.contextmanager
def fresh(work: Path, model: Path, name: str, *extra: str) -> Iterator[Gateway]:
    store = work / name / "edits"
    store.parent.mkdir(parents=True)
    gw = Gateway(model, store, work / "cache", *extra)
    try:
        if not gw.serving():
            raise RuntimeError(f"{name}: server did not start:\n{gw.log.read_text()[-2000:]}")
        yield gw
    finally:
        gw.stop()


def restart_ok(work: Path, model: Path, store: Path) -> str:
    gw = Gateway(model, store, work / "cache")
    try:
        if not gw.serving(60):
            return "crash at start"
        return f"starts, head {gw.head()}"
    finally:
        gw.stop()


def attack_imports(work: Path, model: Path, layer: bytes) -> list[dict]:
    rows = []
    cases: list[tuple[str, Callable[[], bytes]]] = [
        ("import: the exported layer as it is (control)", lambda: layer),
        ("import: edit_id '../../outside/model'",
         lambda: mutate(layer, lambda h: h.update(edit_id="../../outside/model"))),
        ("import: edit_id absolute path", lambda: mutate(layer, lambda h: h.update(edit_id=str(work / "abs" / "x")))),
        ("import: NaN factors", lambda: mutate(layer, tensors=lambda t: [v.fill_(float("nan")) for v in t.values()])),
        ("import: 1e30 factors", lambda: mutate(layer, tensors=lambda t: [v.fill_(1e30) for v in t.values()])),
        ("import: factor on embed_tokens", lambda: _retarget(layer, "model.embed_tokens.weight")),
        ("import: fingerprint lists no matrices",
         lambda: mutate(layer, lambda h: h["base_fingerprint"].update(matrices={}))),
        ("import: no base_fingerprint", lambda: mutate(layer, lambda h: h.pop("base_fingerprint"))),
        ("import: version 'abc'", lambda: mutate(layer, lambda h: h.update(version="abc"))),
        ("import: matrices [{}]", lambda: mutate(layer, lambda h: h.update(matrices=[{}]))),
        ("import: edit_id a number", lambda: mutate(layer, lambda h: h.update(edit_id=12345))),
        ("import: no request", lambda: mutate(layer, lambda h: h.pop("request"))),
        ("import: u reshaped (N, 1)", lambda: mutate(layer, tensors=_reshape_u)),
    ]
    for name, make in cases:
        with fresh(work, model, name.replace(" ", "_").replace("/", "_")[:40]) as gw:
            root = work
            before = {p for p in root.rglob("*") if p.is_file()}
            answer0 = gw.answer()
            code, msg = import_files(gw, [make()])
            outside = [p for p in files_outside(root, before) if "/edits/layers/" not in "/" + p and ".log" not in p]
            outside = [p for p in outside if not p.endswith("manifest.json")]
            effect = []
            if outside:
                effect.append(f"wrote {outside[0]}")
            head = gw.head()
            effect.append(f"head {head}")
            try:
                ans = gw.answer()
                effect.append("answer unchanged" if ans == answer0 else f"answer now {ans[:20]!r}")
            except grpc.RpcError as e:
                effect.append(f"generate {e.code().name}")
            store = gw.log.parent / "edits"
        effect.append("restart: " + restart_ok(work, model, store))
        rows.append({"attack": name, "code": code, "effect": "; ".join(effect), "message": msg})
        log.info("%s -> %s %s", name, code, effect)
    # memory held by a large junk stream
    with fresh(work, model, "import_junk") as gw:
        blob = b"\0" * (15 << 20)
        with RssPeak(gw) as peak:
            base = gw.rss_mb()
            code, msg = import_files(gw, [blob] * 20)
        rows.append({"attack": "import: 20 x 15 MiB junk messages", "code": code,
                     "effect": f"RSS +{peak.peak - base:.0f} MiB", "message": msg})  # fmt: skip
    return rows


def _retarget(layer: bytes, param: str) -> bytes:
    def tensors(t: dict) -> None:
        old = sorted({k.rsplit(".", 1)[0] for k in t})[0]
        u, v = t.pop(f"{old}.u"), t.pop(f"{old}.v")
        del u, v
        t[f"{param}.u"] = torch.full((49152,), 0.01)  # (vocab,): the embedding's rows
        t[f"{param}.v"] = torch.full((64,), 0.01)  # (hidden,)

    def header(h: dict) -> None:
        h["matrices"] = [{"name": param, "shape": [49152, 64], "dtype": "float32", "update_norm": 1.0}]
        h["base_fingerprint"]["matrices"] = {}

    return mutate(layer, header, tensors)


def _reshape_u(t: dict) -> None:
    for k in list(t):
        if k.endswith(".u"):
            t[k] = t[k].reshape(-1, 1).contiguous()


def attack_requests(work: Path, model: Path) -> list[dict]:
    rows = []
    with fresh(work, model, "isolation") as gw:
        # a bad row next to a good stream
        other: dict[str, str] = {}

        def good_stream() -> None:
            req = pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=200)
            other["code"] = code_of(lambda: gw.stub.Generate(req, timeout=120))[0]

        t = threading.Thread(target=good_stream)
        t.start()
        time.sleep(0.5)
        bad = pb.GenerateRequest(prompt="Hello there", max_new_tokens=20, temperature=1e-40)
        code, msg = code_of(lambda: gw.stub.Generate(bad, timeout=60))
        t.join()
        rows.append({"attack": "generate temperature=1e-40 beside another stream", "code": code,
                     "effect": f"the other stream: {other.get('code')}", "message": msg})  # fmt: skip

    with fresh(work, model, "load") as gw:
        long_text = " word" * 500
        with RssPeak(gw) as peak, HealthProbe(gw) as hp:
            base = gw.rss_mb()
            results: list[str] = []

            def trace() -> None:
                req = pb.TraceRequest(prompt="The Eiffel Tower is in the city of" + " and" * 20,
                                      subject="The Eiffel Tower", samples=16)  # fmt: skip
                results.append(code_of(lambda: gw.stub.Trace(req, timeout=300))[0])

            def score() -> None:
                req = pb.ScoreRequest(prompt="Hi", continuations=[long_text] * 4)
                results.append(code_of(lambda: gw.stub.Score(req, timeout=300))[0])

            threads = [threading.Thread(target=trace) for _ in range(24)]
            threads += [threading.Thread(target=score) for _ in range(4)]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            small = code_of(lambda: gw.stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=2), timeout=30))
            small_s = time.perf_counter() - t0
            for th in threads:
                th.join()
        counts = {c: results.count(c) for c in sorted(set(results))}
        rows.append({"attack": "24 Traces (16 samples) + 4 Scores of 4 x 500-token continuations", "code": str(counts),
                     "effect": f"RSS +{peak.peak - base:.0f} MiB; health worst {hp.worst:.2f} s; "
                               f"small Generate {small[0]} after {small_s:.2f} s", "message": ""})  # fmt: skip

    with fresh(work, model, "edits") as gw:
        huge = "x" * (15 << 20)
        with HealthProbe(gw) as hp:
            code, msg = code_of(lambda: gw.stub.Score(pb.ScoreRequest(prompt="Hi", continuations=[huge]), timeout=120))
        rows.append({"attack": "score a 15 MB continuation", "code": code,
                     "effect": f"health worst {hp.worst:.2f} s", "message": msg})  # fmt: skip

        for name, kw in (("trace noise=3e38", {"noise": 3e38}), ("trace window=2^31-1", {"window": 2**31 - 1})):
            req = pb.TraceRequest(prompt="The Eiffel Tower is in", subject="Eiffel Tower", samples=2, **kw)
            got: list[object] = []

            def run(req: pb.TraceRequest = req, got: list = got) -> list:
                out = list(gw.stub.Trace(req, timeout=120))
                got.extend(out)
                return out

            code, msg = code_of(run)
            nan = any(m.HasField("result") and any(s != s for s in m.result.scores) for m in got)
            rows.append({"attack": name, "code": code, "effect": "NaN grid" if nan else "", "message": msg})

        with RssPeak(gw) as peak:
            base = gw.rss_mb()
            spec = pb.EditSpec(prompt="{} is in" + " the" * 3000, subject="Alice Smith", target=" Paris", hparams=FAST)
            t0 = time.perf_counter()
            code, msg = code_of(lambda: gw.stub.ApplyEdit(pb.ApplyEditRequest(edit=spec, dry_run=True), timeout=600))
        rows.append({"attack": "ApplyEdit with a 3,000-token prompt", "code": code,
                     "effect": f"RSS +{peak.peak - base:.0f} MiB in {time.perf_counter() - t0:.1f} s",
                     "message": msg})  # fmt: skip
        spec = pb.EditSpec(prompt="{} is in", subject="Alice Smith", target=" Paris",
                           hparams={**FAST, "ctx_n_short": 256, "ctx_len_short": 256})  # fmt: skip
        with RssPeak(gw) as peak:
            base = gw.rss_mb()
            t0 = time.perf_counter()
            code, msg = code_of(lambda: gw.stub.ApplyEdit(pb.ApplyEditRequest(edit=spec, dry_run=True), timeout=600))
        rows.append({"attack": "ApplyEdit ctx_n_short=256, ctx_len_short=256", "code": code,
                     "effect": f"RSS +{peak.peak - base:.0f} MiB in {time.perf_counter() - t0:.1f} s",
                     "message": msg})  # fmt: skip

    with fresh(work, model, "strings") as gw:
        big = "c" * (12 << 20)
        spec = pb.EditSpec(prompt="{} lives in", subject="Carol King", target=" Oslo", hparams=FAST)
        code, msg = code_of(lambda: gw.stub.ApplyEdit(pb.ApplyEditRequest(edit=spec, comment=big), timeout=600))
        listed = code_of(lambda: gw.stub.ListEdits(pb.ListEditsRequest(include_inactive=True), timeout=60))[0]
        rows.append({"attack": "ApplyEdit with a 12 MB comment", "code": code, "effect": f"ListEdits then: {listed}",
                     "message": msg})

        subject = "S" * (10 << 20)
        spec = pb.EditSpec(prompt="{} lives in", subject=subject, target=" Oslo", hparams=FAST)
        code, msg = code_of(lambda: gw.stub.ApplyEdit(pb.ApplyEditRequest(edit=spec, dry_run=True), timeout=600))
        longest = max((len(line) for line in gw.log.read_text(errors="replace").splitlines()), default=0)
        rows.append({"attack": "ApplyEdit with a 10 MB subject", "code": code,
                     "effect": f"longest log line {longest:,} chars", "message": msg[:60]})  # fmt: skip
    return rows


def attack_burst(work: Path, model: Path) -> list[dict]:
    """Edits whose callers give up after 1 s: do they keep computing beside the next caller's edit?"""
    with fresh(work, model, "burst") as gw:
        def dry_run(subject: str, timeout: float, steps: int) -> tuple[str, str]:
            spec = pb.EditSpec(prompt="{} lives in", subject=subject, target=" Rome",
                               hparams={**FAST, "v_num_grad_steps": steps, "v_stop_prob": 1.0})  # fmt: skip
            return code_of(lambda: gw.stub.ApplyEdit(pb.ApplyEditRequest(edit=spec, dry_run=True), timeout=timeout))

        dry_run("Warm Up", 600, 3)  # C of the layer, computed once
        t0 = time.perf_counter()
        dry_run("Bob Jones", 600, 40)
        alone = time.perf_counter() - t0
        burst = [threading.Thread(target=dry_run, args=(f"Person {i}", 1.0, 400)) for i in range(8)]
        for th in burst:
            th.start()
        for th in burst:
            th.join()
        t0 = time.perf_counter()
        code, msg = dry_run("Bob Jones", 600, 40)
        after = time.perf_counter() - t0
    return [{"attack": "8 ApplyEdits (400 steps) with 1 s deadlines, then one more", "code": code,
             "effect": f"the next edit took {after:.1f} s (alone: {alone:.1f} s)", "message": msg}]  # fmt: skip


def attack_shutdown(work: Path, model: Path) -> list[dict]:
    with fresh(work, model, "shutdown", "--grace-seconds", "3") as gw:
        spec = pb.EditSpec(prompt="{} lives in", subject="Dan Brown", target=" Lima",
                           hparams={**FAST, "v_num_grad_steps": 400, "v_stop_prob": 1.0, "mom2_n_tokens": 20000})
        th = threading.Thread(target=lambda: code_of(
            lambda: gw.stub.ApplyEdit(pb.ApplyEditRequest(edit=spec), timeout=600)), daemon=True)  # fmt: skip
        th.start()
        time.sleep(3.0)
        t0 = time.perf_counter()
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, _ = gw.health(timeout=2)
        try:
            gw.proc.wait(timeout=300)
            exited = f"exited after {time.perf_counter() - t0:.1f} s (grace 3 s)"
        except subprocess.TimeoutExpired:
            exited = "still running after 300 s"
    return [{"attack": "SIGTERM during an ApplyEdit", "code": "",
             "effect": f"health 0.3 s after SIGTERM: {status}; {exited}", "message": ""}]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=["imports", "requests", "burst", "shutdown"], action="append")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="romegw-attacks-") as tmp:
        work = Path(tmp)
        model = save_tiny(work / "model")
        rows: list[dict] = []
        only = args.only or ["imports", "requests", "burst", "shutdown"]
        if "imports" in only:
            with fresh(work, model, "source") as gw:
                spec = pb.EditSpec(prompt="{} lives in", subject="Erin Hall", target=" Kyiv", hparams=FAST)
                gw.stub.ApplyEdit(pb.ApplyEditRequest(edit=spec), timeout=600)
                layer = next(iter(gw.stub.ExportEdits(pb.ExportEditsRequest(from_version=1), timeout=60))).content
            rows += attack_imports(work, model, layer)
        if "requests" in only:
            rows += attack_requests(work, model)
        if "burst" in only:
            rows += attack_burst(work, model)
        if "shutdown" in only:
            rows += attack_shutdown(work, model)
    print("| attack | status | effect |\n|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {r['code']} | {r['effect']} |")
    if args.json:
        write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
