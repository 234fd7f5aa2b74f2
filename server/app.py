"""Flower ServerApp: a run's setup (server.run), Flower's round loop under the run's strategy,
the per-round recorder (server.recorder), and teardown.

The server is the authority on configuration: it validates the run config once and sends
the resolved keys to every client in each round's ConfigRecord, so clients behave the same
under ``flwr run``, ``fedlearn simulate`` and a real deployment.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlearn.config import RunConfig
from server.grid import sampling_with
from server.recorder import RoundCallback, RoundRecorder, TargetReached, log_round
from server.resume import ResumedStrategy
from server.run import (
    ClientMetrics,
    fail_run,
    finish_run,
    global_model,
    initial_arrays,
    start_run,
)

__all__ = ["app", "global_model", "initial_arrays", "make_server_app", "run_federation"]


def run_federation(
    grid: Grid, config: RunConfig, on_round: RoundCallback = log_round, run_id: str | None = None
) -> dict:
    """Run every round of ``config`` on ``grid`` and write the run directory. Returns the summary.

    With ``resume-from`` set, continue that run directory from its checkpoint instead: its own
    config, model, strategy state, round number, random state and audit chain."""
    metrics = ClientMetrics()
    run = start_run(grid, config, metrics, run_id)
    config = run.config
    recorder = RoundRecorder(run, metrics, on_round)
    offset = run.offset
    if run.checkpoint is not None:
        run.checkpoint.restore_random(run.sampling)
    else:
        run.sampling.seed(config.seed)
    stopped_early = False
    try:
        run.strategy.prepare(run.grid, run.audit)  # before any round (he-threshold: the key ceremony)
        with sampling_with(run.sampling):
            _start(run, recorder, offset)
    except TargetReached:
        stopped_early = True
    except BaseException as exc:
        fail_run(run, exc)
        raise
    return finish_run(run, recorder.arrays, stopped_early)


def _start(run, recorder: RoundRecorder, offset: int) -> None:
    """Flower's round loop over the run's strategy (from the checkpoint's round when resumed)."""
    config = run.config
    (ResumedStrategy(run.strategy, offset) if offset else run.strategy).start(
        grid=run.grid,
        initial_arrays=run.initial,
        num_rounds=config.num_rounds - offset,
        timeout=config.round_timeout,
        train_config=ConfigRecord(config.to_flat()),
        evaluate_config=ConfigRecord(config.to_flat()),
        evaluate_fn=recorder.resumed_round if offset else recorder.after_round,
    )


def make_server_app(
    config: RunConfig | None = None,
    on_round: RoundCallback = log_round,
    on_finish: Callable[[dict], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config``; without one it reads Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        resolved = config or RunConfig.from_flat(context.run_config)
        summary = run_federation(grid, resolved, on_round)
        log(INFO, "fedlearn run finished: %s", summary["run_dir"])
        if on_finish:
            on_finish(summary)

    return app


# The App that `flwr run .` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
