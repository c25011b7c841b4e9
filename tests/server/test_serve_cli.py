"""`fast-xlstm serve` up to the point where uvicorn takes over (uvicorn.run replaced: no socket)."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("uvicorn")

from fast_xlstm.cli import main


def test_serve_freezes_the_startup_heap_before_serving(monkeypatch):
    """The objects built at startup are moved out of the cyclic GC's reach (gc.freeze) before the first
    request, so a full collection under load does not walk the model, engine and app."""
    import uvicorn

    seen = {}

    def fake_run(app, **kwargs):
        seen["frozen"] = gc.get_freeze_count()
        seen["host"] = kwargs["host"]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    try:
        assert main(["serve", "--model", "xlstm-tiny", "--device", "cpu", "--no-warmup", "--port", "0"]) == 0
    finally:
        gc.unfreeze()  # the test process goes on: give its objects back to the collector
    assert seen["frozen"] > 1000 and seen["host"] == "127.0.0.1"


@pytest.mark.parametrize("flags,compiled", [([], False), (["--compile"], True)], ids=["cpu-default", "compile"])
def test_serve_compiles_by_default_only_on_cuda(monkeypatch, flags, compiled):
    """--compile defaults to the device: on for CUDA (the measured fast path), off on CPU, where it
    only costs start-up; --compile / --no-compile override it."""
    import uvicorn

    seen = {}

    def fake_run(app, **kwargs):
        blocks = app.state.ctx.engine.engine.model.backbone.blocks
        seen["compiled"] = [getattr(b, "_step_slots_compiled", False) for b in blocks]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    try:
        assert main(["serve", "--model", "xlstm-tiny", "--device", "cpu", "--no-warmup", "--port", "0", *flags]) == 0
    finally:
        gc.unfreeze()
    assert seen["compiled"] == [compiled] * len(seen["compiled"]) and seen["compiled"]
