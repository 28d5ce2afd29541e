"""The `srae` application: command groups, and the one place user errors become one line + exit 1.

Heavy modules (torch, transformers, the engine) are imported inside command bodies, so `srae --help`
stays fast. Set SRAE_DEBUG=1 to get the full traceback of an error instead of the one line.
"""

from __future__ import annotations

import os
import sys

import typer
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


class _SraeGroup(TyperGroup):
    """Root group, the one error path: an SraeError anywhere below, a file-system error, or a usage error prints
    `error: <one line>` and exits non-zero (1; 130 when interrupted). SRAE_DEBUG=1 shows the traceback instead."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
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
    name="srae",
    help="Scale-RAE made usable: data, decoder and unified-model training, generation, understanding, test-time scaling.",
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
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
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

    train_app = typer.Typer(help="Train the RAE decoder and the unified model.", no_args_is_help=True)
    train_app.command("decoder", epilog=train_decoder.EPILOG)(train_decoder.decoder)
    train_app.command("stage1", epilog=train_unified.STAGE1_EPILOG)(train_unified.stage1)
    train_app.command("stage2", epilog=train_unified.STAGE2_EPILOG)(train_unified.stage2)
    train_app.command("dit", epilog=train_dit.EPILOG)(train_dit.dit)
    app.add_typer(train_app, name="train")
    data.app.command("npz", epilog=data_npz.EPILOG)(data_npz.npz)
    app.add_typer(data.app, name="data")
    app.command("stat", epilog=stat.EPILOG)(stat.stat)
    eval_app = typer.Typer(help="Evaluate models.", no_args_is_help=True)
    eval_app.command("recon", epilog=eval_recon.EPILOG)(eval_recon.recon)
    eval_app.command("shapes", epilog=eval_shapes.EPILOG)(eval_shapes.shapes)
    eval_app.command("fid", epilog=eval_fid.EPILOG)(eval_fid.fid)
    eval_app.command("probe", epilog=eval_probe.EPILOG)(eval_probe.probe)
    app.add_typer(eval_app, name="eval")
    convert_app = typer.Typer(help="Convert released checkpoints into srae's format.", no_args_is_help=True)
    convert_app.command("decoder", epilog=convert.EPILOG)(convert.convert_decoder)
    app.add_typer(convert_app, name="convert")
    app.add_typer(profiles.app, name="profiles")
    app.add_typer(tpu.app, name="tpu")
    app.command("generate", epilog=generate.EPILOG)(generate.generate)
    app.command("understand", epilog=understand.EPILOG)(understand.understand)
    latent.app.command("cache", epilog=latent_cache.EPILOG)(latent_cache.cache)
    app.add_typer(latent.app, name="latent")
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
