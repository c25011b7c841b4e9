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


@pytest.mark.parametrize("flags,loop,http", [([], "auto", "auto"), (["--loop", "asyncio", "--http", "h11"], "asyncio", "h11")],
                         ids=["auto", "asyncio-h11"])
def test_serve_passes_the_event_loop_and_http_parser_to_uvicorn(monkeypatch, flags, loop, http):
    """--loop / --http reach uvicorn as given (auto by default: uvloop and httptools, which the serve
    extra installs, when they import)."""
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    try:
        assert main(["serve", "--model", "xlstm-tiny", "--device", "cpu", "--no-warmup", "--port", "0", *flags]) == 0
    finally:
        gc.unfreeze()
    assert (seen["loop"], seen["http"]) == (loop, http)


@pytest.mark.parametrize("flag,module", [("--loop", "uvloop"), ("--http", "httptools")])
def test_serve_names_a_missing_event_loop_or_parser_package(monkeypatch, capsys, flag, module):
    """Asking for uvloop or httptools where it is not installed stops before the model loads, with
    the package to install, instead of uvicorn's traceback after start-up."""
    import importlib.util

    import uvicorn

    from fast_xlstm.server import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("uvicorn started"))
    assert main(["serve", "--model", "xlstm-tiny", "--device", "cpu", "--no-warmup", "--port", "0", flag, module]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {module} needs the {module} package" in err and "uvicorn[standard]" in err
    with pytest.raises(SystemExit):
        main(["serve", flag, "bogus"])


def test_serve_trickle_options_reach_the_scheduler(monkeypatch):
    """--trickle-tokens / --trickle-backlog / --trickle-max-decode reach the scheduler; off CUDA trickle
    is off unless asked for (mixed steps need the Triton kernels), and the backlog defaults to 64N."""
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app))
    for flags, want in (([], (0, 0, None)), (["--trickle-tokens", "8"], (8, 512, 128)),
                        (["--trickle-tokens", "8", "--trickle-backlog", "5000", "--trickle-max-decode", "40"],
                         (8, 5000, 40))):
        try:
            assert main(["serve", "--model", "xlstm-tiny", "--device", "cpu", "--no-warmup", "--port", "0",
                         *flags]) == 0
        finally:
            gc.unfreeze()
        engine = seen["app"].state.ctx.engine.engine
        scheduler = engine.scheduler
        assert (scheduler.trickle_tokens, scheduler.trickle_backlog, scheduler.trickle_max_decode) == want, flags
        assert engine.mixed_steps == bool(want[0])


def test_trickle_defaults_on_cuda():
    """On CUDA trickle is on by default: 256-token pieces while at most 64 pieces' worth waits and at
    most 128 requests decode."""
    from fast_xlstm.cli import build_parser
    from fast_xlstm.server.cli import trickle_options

    def resolved(*flags: str, cuda: bool = True):
        return trickle_options(build_parser().parse_args(["serve", *flags]), cuda)

    assert resolved() == {"trickle_tokens": 256, "trickle_backlog": 16384, "trickle_max_decode": 128}
    assert resolved(cuda=False) == {"trickle_tokens": 0}
    assert resolved("--trickle-tokens", "0") == {"trickle_tokens": 0}
    assert resolved("--trickle-tokens", "64", "--max-num-seqs", "8") == {
        "trickle_tokens": 64, "trickle_backlog": 4096, "trickle_max_decode": 128}


@pytest.mark.parametrize("flags,error", [
    (["--trickle-backlog", "100"], "need --trickle-tokens N > 0"),
    (["--trickle-max-decode", "100"], "need --trickle-tokens N > 0"),
    (["--trickle-tokens", "8", "--trickle-backlog", "-1"], "--trickle-backlog must be >= 0"),
    (["--trickle-tokens", "-8"], "--trickle-tokens must be >= 0"),
    (["--trickle-tokens", "8", "--trickle-max-decode", "15"], "--trickle-max-decode must be >= 16"),
])
def test_serve_rejects_bad_trickle_options(monkeypatch, capsys, flags, error):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("uvicorn started"))
    assert main(["serve", "--model", "xlstm-tiny", "--device", "cpu", "--no-warmup", "--port", "0", *flags]) == 2
    assert error in capsys.readouterr().err
