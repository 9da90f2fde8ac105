"""The ``gradlab`` command line: parses options, calls the library, prints. No logic of its own.

Every error a user can cause (unknown model, bad option, missing or corrupt file) is printed as
one line on stderr with exit code 2; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from gradlab.config import ConfigError
from gradlab.models import ModelError


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (imported lazily: the report stack is heavy)."""
    from gradlab.data import DataError
    from gradlab.runs import RunError

    errors: list[type[BaseException]] = [ModelError, ConfigError, DataError, RunError]
    for mod, cls in (("gradlab.report", "ReportError"), ("gradlab.suites", "SuiteError"),
                     ("gradlab.dashboard", "DashboardError")):
        if mod in sys.modules and hasattr(sys.modules[mod], cls):
            errors.append(getattr(sys.modules[mod], cls))
    return tuple(errors)


def _fail(message: str) -> None:
    typer.echo(f"gradlab: error: {message}", err=True)
    sys.exit(2)


class _OneLineErrors(TyperGroup):
    """Turns usage errors and gradlab's input errors into one stderr line and exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Exit as e:
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("gradlab: interrupted", err=True)
            sys.exit(130)
        except typer.TyperException as e:  # click's usage errors: bad option, bad value
            if type(e).__name__ == "NoArgsIsHelpError" and getattr(e, "ctx", None) is not None:
                typer.echo(e.ctx.get_help())
                sys.exit(0)
            # (typer words a rejected choice "Value error, 'gpu' is not one of ...")
            _fail(" ".join(e.format_message().replace("Value error, ", "").split()))
        except _input_errors() as e:
            _fail(" ".join(str(e).split()))
        except OSError as e:  # unwritable output folder, full disk, ...
            _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=_OneLineErrors,
    help="Measure gradient and signal flow in plain and residual networks, and test the claims "
         "of He et al. (2015, 2016) on your own runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class DatasetName(str, Enum):
    digits = "digits"
    cifar10 = "cifar10"
    synthetic = "synthetic"


class DeviceName(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Shortcut(str, Enum):
    A = "A"
    B = "B"


class Amp(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    off = "off"


class Switch(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class OnNonFinite(str, Enum):
    stop = "stop"
    skip = "skip"


@app.command()
def probe(
    model: Annotated[str, typer.Option(help="Model name, e.g. resnet56 or plain20 (any 6n+2 "
                                            "depth); `gradlab models` lists them.")] = "resnet56",
    dataset: Annotated[DatasetName, typer.Option(help="digits: scikit-learn's bundled 8x8 "
                                                      "digits (offline); cifar10: the python "
                                                      "batches; synthetic: random CIFAR-shaped "
                                                      "tensors for timing.")] = DatasetName.digits,
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding cifar-10-batches-py "
                                                       "(downloaded there when missing and a "
                                                       "network exists).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps to train (default 600 "
                                                   "unless --epochs is given).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs to train, when --steps is not "
                                                      "given.")] = None,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Learning rate; divided by 10 at 50% and 75% of "
                                           "training.")] = 0.1,
    warmup_steps: Annotated[int, typer.Option(help="Steps trained at --warmup-lr before the full "
                                                   "rate (the paper's ResNet-110 warm-up).")] = 0,
    warmup_lr: Annotated[float, typer.Option(help="Learning rate during warm-up.")] = 0.01,
    every: Annotated[int, typer.Option(help="Record every metric at step 0 and every N steps "
                                            "(and at the last step).")] = 10,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate on the test split every N "
                                                        "steps (default: 10 times per run) "
                                                        "and at the end.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Write checkpoints/last.pt every "
                                                              "N steps (default: about 4 per "
                                                              "run, at most every 1000).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialization, data split and order, "
                                           "augmentation.")] = 0,
    shortcut: Annotated[Shortcut, typer.Option(help="Residual shortcut at downsampling blocks: "
                                                    "A = zero-padded identity, B = 1x1 "
                                                    "projection.")] = Shortcut.A,
    zero_init_residual: Annotated[bool, typer.Option(help="Start each residual block's last BN "
                                                          "gamma at 0 (Goyal et al. 2017); plain "
                                                          "nets ignore it.")] = False,
    device: Annotated[DeviceName, typer.Option(help="auto: cuda, then mps, then cpu.")
                      ] = DeviceName.auto,
    amp: Annotated[Amp, typer.Option(help="bf16 autocast (auto: on for CUDA GPUs with "
                                           "bf16, and on CPUs with native bf16 for images of "
                                           "32x32 or more).")
                   ] = Amp.auto,
    channels_last: Annotated[Switch, typer.Option(help="NHWC memory format (auto: on for CUDA "
                                                       "and CPU).")] = Switch.auto,
    compile: Annotated[bool, typer.Option(help="torch.compile the model (probes are attached "
                                               "first and stay correct).")] = False,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Train without random crops "
                                                                  "and flips.")] = False,
    on_nonfinite: Annotated[OnNonFinite, typer.Option(help="On a non-finite loss or gradient: "
                                                           "stop (run marked failed) or skip "
                                                           "the step.")] = OnNonFinite.stop,
    out: Annotated[Path, typer.Option(help="Parent folder of run directories.")] = Path("runs"),
    name: Annotated[str | None, typer.Option(help="Run directory name (default "
                                                  "MODEL-DATASET-sSEED).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run directory from its last "
                                              "checkpoint.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing run directory of this "
                                             "name.")] = False,
    no_tensorboard: Annotated[bool, typer.Option("--no-tensorboard", help="Do not write "
                                                 "TensorBoard event files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a model with probes attached and write a run directory (metrics, TensorBoard)."""
    from gradlab.config import TrainConfig
    from gradlab.training import train

    cfg = TrainConfig(
        model=model, dataset=dataset.value, data_dir=str(data_dir) if data_dir else None,
        steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        warmup_lr=warmup_lr, every=every, eval_every=eval_every,
        checkpoint_every=checkpoint_every, seed=seed, device=device.value,
        shortcut=shortcut.value, zero_init_residual=zero_init_residual, amp=amp.value,
        channels_last=channels_last.value, compile=compile, augment=not no_augment,
        nonfinite=on_nonfinite.value,
    )
    from gradlab.training import NonFiniteError

    try:
        result = train(cfg, out, name, resume=resume, force=force, progress=not quiet,
                       dashboard=not no_tensorboard)
    except NonFiniteError as e:
        typer.echo(f"gradlab: run failed: {e}", err=True)
        sys.exit(1)
    final = ", ".join(f"{k} {v:.4g}" for k, v in result.final.items())
    # (train() returns at once, unchanged, a completed run that --resume finds)
    took = "already completed" if resume and result.seconds == 0 else f"{result.seconds:.1f} s"
    typer.echo(f"{result.status}: {result.run_dir} ({result.steps} steps, {took})"
               f"{'; ' + final if final else ''}")
    if result.status == "interrupted":
        sys.exit(128 + (result.signal or 2))  # the shell's convention: 130 SIGINT, 143 SIGTERM


@app.command()
def models() -> None:
    """List the registered models with their depth and parameter count."""
    from gradlab.models import create_model, list_models, model_info

    typer.echo(f"{'name':<12}{'family':<8}{'depth':>6}{'parameters':>13}")
    for name in list_models():
        info = model_info(name)
        n = sum(p.numel() for p in create_model(name).parameters())
        typer.echo(f"{name:<12}{info.family:<8}{info.depth or '':>6}{n:>13,}")
    typer.echo("Any depth 6n+2 works too (e.g. resnet26); --shortcut B adds 1x1 projections.")


def _formats(text: str) -> tuple[str, ...]:
    """The --format list ("html,pdf"), blanks dropped; report building rejects unknown ones.

    A list with no format at all ("", ",") is refused: the command would write nothing.
    """
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    if not formats:
        raise typer.BadParameter(f"no format in {text!r} (give html, pdf or html,pdf)",
                                 param_hint="'--format'")
    return formats


def _print_report(rep) -> None:
    for c in rep.claims:
        why = f" ({c.reason})" if c.verdict == "inconclusive" and c.reason else ""
        typer.echo(f"  {c.id:<18} {c.verdict}{why}")
    for path, reason in rep.skipped:
        typer.echo(f"  skipped {path}: {reason}", err=True)
    for p in (rep.html_path, rep.pdf_path):
        if p is not None:
            typer.echo(f"wrote {p}")


@app.command("run")
def run_cmd(
    suite: Annotated[str, typer.Argument(help="A bundled suite's name (near-identity, "
                                              "he2015-cifar10) or the path of a suite TOML.")],
    runs: Annotated[Path, typer.Option(help="Parent folder of the suites' runs.")] = Path("runs"),
    reports: Annotated[Path, typer.Option(help="Parent folder of the suites' reports.")
                       ] = Path("reports"),
    format: Annotated[str, typer.Option(help="Report formats, comma-separated: html,pdf.")
                      ] = "html,pdf",
    no_report: Annotated[bool, typer.Option("--no-report", help="Train only.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run every run a probe suite needs (skipping completed ones, resuming interrupted ones),
    then write its report to REPORTS/<suite>/."""
    from gradlab.suites import run_suite

    formats = () if no_report else _formats(format)
    res = run_suite(suite, runs_root=runs, reports_root=reports, progress=not quiet,
                    formats=formats, report=not no_report,
                    on_run=lambda name, what: typer.echo(f"{what} {name}"))
    stopped = (f", stopped at {res.interrupted}" if res.interrupted
               else ", stopped before the report" if res.signal is not None else "")
    typer.echo(f"suite {res.suite.name}: {len(res.trained)} trained, {len(res.resumed)} "
               f"resumed, {len(res.skipped)} skipped, {len(res.failed)} failed{stopped} "
               f"({res.seconds:.0f} s) in {res.runs_dir}")
    if res.interrupted or res.signal is not None:
        if res.interrupted is None:
            where = "after the last run, before the report"
        elif res.interrupted_at is None:
            where = f"before {res.runs_dir / res.interrupted} started"
        else:
            where = f"{res.runs_dir / res.interrupted} at step {res.interrupted_at}"
        typer.echo(f"interrupted: {where}; run the same command again to resume the suite")
        sys.exit(128 + (res.signal or 2))  # as `gradlab probe`: 130 SIGINT, 143 SIGTERM
    if res.report is not None:
        _print_report(res.report)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories, or folders of runs "
                                                        "(e.g. runs/near-identity).")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: reports/<name of "
                                                  "the first folder>).")] = None,
    format: Annotated[str, typer.Option(help="Formats, comma-separated: html,pdf.")
                      ] = "html,pdf",
    claims: Annotated[str | None, typer.Option(help="Claims to test, comma-separated "
                                                    "(default: all).")] = None,
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
) -> None:
    """Test the claims on runs and write report.html (self-contained) and report.pdf."""
    from gradlab.report import build_report

    formats = _formats(format)
    out = out or Path("reports") / (run_dirs[0].resolve().name or "report")
    wanted = [c.strip() for c in claims.split(",")] if claims else None
    rep = build_report(list(run_dirs), out, formats=formats, claims=wanted, title=title)
    _print_report(rep)


@app.command()
def dashboard(
    runs_dir: Annotated[Path, typer.Argument(help="A run directory or a folder of runs.")],
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 6006,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Start TensorBoard on the runs' event files; Ctrl-C stops it."""
    from gradlab.dashboard import serve

    serve(runs_dir, host=host, port=port,
          on_ready=lambda url: typer.echo(f"TensorBoard at {url} (Ctrl-C to stop)"))


def main() -> None:
    """Entry point of the ``gradlab`` script."""
    app()


if __name__ == "__main__":
    main()
