"""The asyncio client against a real server."""

from __future__ import annotations

import asyncio

import pytest

from romegw_client import AsyncClient, Client, InvalidArgument


def test_async_client_generate_score_info(tiny_llama, serve) -> None:
    srv = serve(tiny_llama)
    with Client(srv.target) as c:
        sync_ids = c.generate_text("Hello world", max_new_tokens=6).token_ids

    async def main() -> None:
        async with AsyncClient(srv.target, timeout=30) as c:
            chunks = [ch async for ch in c.generate("Hello world", max_new_tokens=6)]
            assert tuple(i for ch in chunks for i in ch.token_ids) == sync_ids
            assert chunks[-1].finish_reason in ("length", "eos")
            done = await c.generate_text("Hello world", max_new_tokens=6)
            assert done.token_ids == sync_ids
            scored = await c.score("Hello", [" world", " there"])
            assert len(scored.scores) == 2
            info = await c.model_info()
            assert info.family == "llama"
            assert await c.health() == "SERVING"
            with pytest.raises(InvalidArgument, match="top_p"):
                await c.generate_text("Hello", top_p=0.0)
            # concurrent streams from one async client
            outs = await asyncio.gather(*(c.generate_text("Hello world", max_new_tokens=6) for _ in range(3)))
            assert all(o.token_ids == sync_ids for o in outs)

    asyncio.run(main())
