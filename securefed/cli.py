"""The ``securefed`` command line.

* ``securefed run [--config FILE] [--set key=value ...]``: run an experiment;
  ``securefed run --resume RUN_DIR`` continues one after its last finished round.
* ``securefed assets [--prepare]``: list (and prepare) the embedded model and data.
* ``securefed attack RUN_DIR --attack NAME``: run an attack on the server views a
  run recorded (``attack.record = true``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from securefed.errors import RunError, SecurefedError
from securefed.protocols.errors import ProtocolError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Privacy-preserving federated fine-tuning of LMs.")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _fail(err: Exception) -> None:
    typer.secho(f"error: {type(err).__name__}: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config (default: the shipped default experiment)")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. --set train.rounds=2")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="output directory (default runs/<run.name>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue the run in this directory after its "
                                                "last finished round (with its own config.toml)")] = None,
) -> None:
    """Run a federated fine-tuning experiment and write runs/<name>/ (or resume one)."""
    _quiet_libraries()
    from tqdm import tqdm

    from securefed.config import load_config
    from securefed.fl.runner import Progress, run_experiment

    try:
        if resume is not None:
            if config is not None or overrides or run_dir is not None:
                raise RunError("--resume reads RUN_DIR/config.toml; drop --config, --set and --run-dir")
            config, run_dir = resume / "config.toml", resume
            if not config.exists():
                raise RunError(f"{resume} holds no run to resume (no config.toml)")
        cfg = load_config(config, overrides or [])
    except SecurefedError as err:
        _fail(err)
    bars: dict[str, tqdm] = {}

    def on_round(r: int, n: int) -> None:
        if "rounds" not in bars:
            bars["rounds"] = tqdm(total=n, desc="rounds", position=0, disable=quiet)
        elif r > 1:
            bars["rounds"].update(1)

    def on_client(r: int, i: int, n: int) -> None:
        if i == 0:
            if "clients" in bars:
                bars["clients"].close()
            bars["clients"] = tqdm(total=n, desc=f"round {r} clients", position=1, leave=False, disable=quiet)
        else:
            bars["clients"].update(1)

    def on_step(k: int) -> None:
        if "steps" not in bars:
            bars["steps"] = tqdm(desc="local steps", position=2, leave=False, disable=quiet)
        bars["steps"].update(k)

    def on_message(s: str) -> None:
        if not quiet:
            tqdm.write(s)

    try:
        summary = run_experiment(cfg, run_dir, Progress(on_round, on_client, on_step, on_message),
                                 resume=resume is not None)
    except (SecurefedError, ProtocolError) as err:
        _fail(err)
    finally:
        for b in bars.values():
            b.close()
    base, final = summary.get("baseline_eval") or {}, summary.get("final_eval") or {}
    out = Path(run_dir) if run_dir else Path(cfg.run.output_dir) / cfg.run.name
    typer.echo("")
    typer.echo(f"run {summary['run']}: {summary['model']} + {summary['peft_method']} on {summary['dataset']}, "
               f"{summary['clients']} clients, {summary['rounds']} rounds, aggregation {summary['aggregation']}")
    for k in sorted(set(base) | set(final)):
        if k == "eval_examples":
            continue
        b = base.get(k)
        f = final.get(k)
        typer.echo(f"  {k}: before {b:.4f} -> after {f:.4f}" if b is not None and f is not None else f"  {k}: {f}")
    spent = (summary.get("privacy") or {}).get("spent") or {}
    for level in ("sample", "user"):
        if f"{level}_epsilon" in spent:
            typer.echo(f"  {level}-level DP: epsilon {spent[f'{level}_epsilon']:.3f} at delta {spent[f'{level}_delta']:.1e} "
                       f"({spent['accountant']}); see privacy-report.md")
    if summary.get("stopped"):
        typer.echo(f"  stopped before round {summary['stopped']['round']}: {summary['stopped']['message']}")
    typer.echo(f"  wall time {summary['time_seconds']['total']:.0f} s; outputs in {out}/ (report.md, summary.json)")


@app.command()
def assets(
    prepare: Annotated[bool, typer.Option("--prepare", help="dequantize SmolLM2 into the cache (once)")] = False,
    cache: Annotated[Path | None, typer.Option("--cache", help="cache directory (default $SECUREFED_CACHE or XDG)")] = None,
) -> None:
    """List the embedded models and data sets; --prepare readies them for offline use."""
    _quiet_libraries()
    from securefed.assets.data import DATASETS
    from securefed.assets.models import MODEL_ASSETS, cache_dir, is_prepared, prepare_model

    try:
        if prepare:
            prepare_model("smollm2-135m", cache)
        typer.echo(f"cache: {cache_dir(cache)}")
        typer.echo("models:")
        for name, a in MODEL_ASSETS.items():
            state = "ready" if is_prepared(name, cache) else "run `securefed assets --prepare`"
            typer.echo(f"  {name:14s} {a.kind:11s} {a.description} [{a.package}, {a.license}] {state}")
        typer.echo("data sets:")
        for d in DATASETS:
            typer.echo(f"  {d}")
    except SecurefedError as err:
        _fail(err)


@app.command()
def attack(
    run_dir: Annotated[Path, typer.Argument(help="a run directory recorded with attack.record = true")],
    name: Annotated[str, typer.Option("--attack", "-a", help="registered attack name, e.g. dager")] = "dager",
    targets: Annotated[str, typer.Option("--targets", help="'all', 'aggregate' or 'individual'")] = "all",
) -> None:
    """Run an attack on exactly what the server held in each recorded round."""
    _quiet_libraries()
    from securefed.attacks import run_attack
    from securefed.attacks.errors import AttackError

    try:
        report = run_attack(run_dir, name, targets=targets)
    except (AttackError, SecurefedError) as err:
        _fail(err)
    typer.echo(json.dumps(report["summary"], indent=1))
    typer.echo(f"details in {run_dir / 'attacks' / (name + '.json')}")


@app.command("privacy-report")
def privacy_report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory with a privacy ledger")],
) -> None:
    """Write privacy-report.md, .json and an epsilon-per-round PNG from a run's ledger."""
    from securefed.privacy.report import write_privacy_report

    try:
        paths = write_privacy_report(run_dir)
    except SecurefedError as err:
        _fail(err)
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
