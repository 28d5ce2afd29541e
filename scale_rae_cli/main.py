"""The `srae` application: command groups, and the one place user errors become one line + exit 1.

Heavy modules (torch, transformers, the engine) are imported inside command bodies, so `srae --help`
stays fast. Set SRAE_DEBUG=1 to get the full traceback of an error instead of the one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Annotated

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from scale_rae_core import __version__
from scale_rae_core.errors import SraeError


def _debug() -> bool:
    return os.environ.get("SRAE_DEBUG") == "1"


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print the one line and return the Exit to raise."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code)


def _os_error_line(err: OSError) -> str:
    """A file-system error a user's path caused (unwritable --out, a file where a folder is needed, /proc, a full
    disk) as one line naming the path."""
    where = f"{err.filename}: " if err.filename else ""
    what = err.strerror or type(err).__name__
    return f"{where}{what}; check the path (and its permissions / free space) and try again"


def _print_help_as_written(command: click.Command) -> None:
    """Escape rich markup in every help text, epilog and option help below ``command`` (once), so help prints as
    written: "[model]" or "[stageN].steps" in a text stays in the output instead of being read as a style tag."""
    if getattr(command, "_help_as_written", False):
        return
    command._help_as_written = True  # type: ignore[attr-defined]
    for attr in ("help", "short_help", "epilog"):
        if getattr(command, attr, None):
            setattr(command, attr, escape(getattr(command, attr)))
    for param in command.params:
        if getattr(param, "help", None):
            param.help = escape(param.help)  # type: ignore[attr-defined]
    for sub in getattr(command, "commands", {}).values():
        _print_help_as_written(sub)


class _SraeGroup(TyperGroup):
    """Root group, the one error path: an SraeError anywhere below, a file-system error, or a usage error prints
    `error: <one line>` and exits non-zero (1; 130 when interrupted). SRAE_DEBUG=1 shows the traceback instead."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _print_help_as_written(self)
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except typer.TyperException as err:  # usage errors: unknown option, bad value, missing argument
            if _debug():
                raise
            message = err.format_message()
            code = 1 if message else 0  # no message: a bare group (`srae train`) printed its help
            if message:
                ctx = getattr(err, "ctx", None)
                _fail(message + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""))
        except typer.Abort:
            typer.echo("interrupted", err=True)
            code = 130
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SraeError as err:
            if _debug():
                raise
            raise _fail(str(err), err.exit_code) from None
        except OSError as err:
            if _debug():
                raise
            raise _fail(_os_error_line(err)) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_SraeGroup,
    help="Scale-RAE made usable: data, decoder and unified-model training, generation, understanding, test-time scaling.",
    name="srae",
    epilog="Example: srae demo   (the whole pipeline on the embedded shapes world, offline, on CPU)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"srae {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Scale-RAE made usable."""


def _register() -> None:
    from scale_rae_cli import (
        convert,
        data,
        data_npz,
        demo,
        env,
        eval_fid,
        eval_probe,
        eval_recon,
        eval_shapes,
        generate,
        latent,
        latent_cache,
        profiles,
        push,
        sample,
        scale,
        stat,
        tpu,
        train_decoder,
        train_dit,
        train_unified,
        understand,
    )

    def group(name: str, help: str, *commands: tuple[str, Callable[..., None], str]) -> None:
        sub = typer.Typer(help=help, no_args_is_help=True)
        for command, function, epilog in commands:
            sub.command(command, epilog=epilog)(function)
        app.add_typer(sub, name=name)

    group("data", data.HELP, ("synth", data.synth, data.SYNTH_EPILOG), ("pack", data.pack, data.PACK_EPILOG),
          ("inspect", data.inspect, data.INSPECT_EPILOG), ("verify", data.verify, data.VERIFY_EPILOG),
          ("npz", data_npz.npz, data_npz.EPILOG))
    group("train", "Train the RAE decoder, the unified model and the class-conditional DiT.", ("decoder", train_decoder.decoder, train_decoder.EPILOG),
          ("stage1", train_unified.stage1, train_unified.STAGE1_EPILOG),
          ("stage2", train_unified.stage2, train_unified.STAGE2_EPILOG), ("dit", train_dit.dit, train_dit.EPILOG))
    app.command("stat", epilog=stat.EPILOG)(stat.stat)
    group("eval", "Evaluate models.", ("recon", eval_recon.recon, eval_recon.EPILOG),
          ("shapes", eval_shapes.shapes, eval_shapes.EPILOG), ("fid", eval_fid.fid, eval_fid.EPILOG),
          ("probe", eval_probe.probe, eval_probe.EPILOG))
    group("convert", "Convert released checkpoints into srae's format.", ("decoder", convert.convert_decoder, convert.EPILOG))
    group("profiles", profiles.HELP, ("list", profiles.list_, profiles.LIST_EPILOG), ("show", profiles.show, profiles.SHOW_EPILOG))
    group("tpu", tpu.HELP, ("clear", tpu.clear, tpu.CLEAR_EPILOG))
    app.command("generate", epilog=generate.EPILOG)(generate.generate)
    app.command("understand", epilog=understand.EPILOG)(understand.understand)
    group("latent", latent.HELP, ("decode", latent.decode, latent.DECODE_EPILOG), ("qa", latent.qa, latent.QA_EPILOG),
          ("continue", latent.continue_, latent.CONTINUE_EPILOG), ("cache", latent_cache.cache, latent_cache.EPILOG))
    app.command("sample", epilog=sample.EPILOG)(sample.sample)
    app.command("scale", epilog=scale.SCALE_EPILOG)(scale.scale)
    app.command("verify", epilog=scale.VERIFY_EPILOG)(scale.verify)
    app.command("push", epilog=push.EPILOG)(push.push)
    app.command("env", epilog=env.EPILOG)(env.env)
    app.command("demo", epilog=demo.EPILOG)(demo.demo)


_register()


def run() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    run()
