"""`fedlearn simulate`: one federated job in Flower's simulation runtime, with a live display."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clients.app import app as client_app
from fedlearn import data
from fedlearn.config import RunConfig
from fedlearn.paths import writable_directory
from fedlearn.runs import RoundRecord, client_drift
from fedlearn.training import select_device
from server.app import make_server_app
from server.privacy import preflight
from simulations import engine


def run(config: RunConfig, *, console: Console | None = None, verbose: bool = False) -> dict:
    """Run ``config`` with simulated clients; return the run summary (also in summary.json)."""
    console = console or Console()
    # Preflight: an unwritable output directory, a missing or corrupt dataset, an impossible
    # split or a missing GPU fails here, with its own message, before the simulation runtime
    # starts (loads are cached).
    writable_directory(config.resume_from or config.out_dir, "resume-from" if config.resume_from else "out-dir (--out)")
    select_device(config.device)
    preflight(config)
    data.client_split(config, 0, config.num_clients)
    console.print(training_line(config), markup=False, soft_wrap=True)
    summary: dict = {}
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    history: list[RoundRecord] = []
    warned: list[str] = []
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("rounds", total=config.num_rounds, status="starting simulation runtime")

        def on_round(record: RoundRecord) -> None:
            status = f"accuracy {record.accuracy:.4f}  loss {record.loss:.4f}"
            if record.round:
                progress.console.print(
                    f"round {record.round:>3}  acc={record.accuracy:.4f} loss={record.loss:.4f} "
                    f"t={record.seconds:.2f}s clients={record.clients} "
                    + (f"rejected={record.rejected} " if record.rejected else "")
                    + f"up={_size(record.bytes_up)} down={_size(record.bytes_down)}",
                    no_wrap=True, overflow="ellipsis",
                )
            progress.update(task, completed=record.round, status=status)
            history.append(record)
            drift = client_drift(history, data.spec(config.dataset).num_classes, config)
            if drift and not warned:  # the first time it shows; the summary repeats the latest
                warned.append(drift)
                progress.console.print(f"warning: {drift}", style="yellow", markup=False)

        def on_finish(result: dict) -> None:
            summary.update(result)
            status = "target accuracy reached" if result["stopped_at_target"] else "done"
            progress.update(task, total=result["rounds"], completed=result["rounds"], status=status)

        server_app = make_server_app(config, on_round=on_round, on_finish=on_finish)
        engine.simulate(server_app, client_app, config.num_clients, verbose=verbose,
                        num_cpus_per_client=config.client_resources_num_cpus,
                        num_gpus_per_client=config.client_resources_num_gpus, ray_address=config.ray_address)
    if not summary:
        raise RuntimeError("the simulation ended without a result; rerun with --verbose to see Flower's logs")
    console.print(summary_table(summary))
    for warning in summary.get("warnings", []):
        console.print(f"warning: {warning}", style="yellow", markup=False)
    return summary


def training_line(config: RunConfig) -> str:
    """The local training the run uses, and which of it is the recipe's (fedlearn.recipes)."""
    momentum = f" momentum={config.momentum:g}" if config.optimizer == "momentum" else ""
    line = (f"local training: optimizer={config.optimizer}{momentum} lr={config.lr:g} local-epochs={config.local_epochs} "
            f"batch-size={config.batch_size}")
    followed = config.recipe_fields()
    if followed:
        keys = ", ".join(name.replace("_", "-") for name in followed)
        line += f" ({keys}: recommended for {config.model} on {config.dataset})"
    return line


def summary_table(summary: dict) -> Table:
    table = Table(title=f"run {summary['run_id']}", show_header=False)
    rows = [
        ("strategy / privacy", f"{summary['strategy']} / {summary['privacy']}"),
        ("model / dataset", f"{summary['model']} on {summary['dataset']}"),
        ("clients", str(summary["num_clients"])),
        ("rounds", str(summary["rounds"])),
        ("final accuracy", f"{summary['final_accuracy']:.4f}"),
        ("final loss", f"{summary['final_loss']:.4f}"),
        ("total time", f"{summary['total_seconds']:.1f} s"),
        ("bytes up / down", f"{_size(summary['bytes_up'])} / {_size(summary['bytes_down'])}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _size(n: float) -> str:
    """Human-readable byte count (binary units)."""
    if n < 1024:
        return f"{n:.0f}B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f}{unit}"
