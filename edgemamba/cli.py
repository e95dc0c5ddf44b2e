"""The `edgemamba` command line. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import json
import sys

import click

from edgemamba import __version__
from edgemamba.errors import EdgeMambaError


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeMambaError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgemamba")
def main():
    """edgemamba: compile Mamba language models for edge devices and stream tokens with O(1) state.

    \b
    Typical use:
      edgemamba inspect CKPT
      edgemamba compile CKPT --target ort-cpu --precision fp32 -o model.em
      edgemamba run model.em --prompt "def main():" --max-new-tokens 64
      edgemamba bench model.em
    """


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(checkpoint, as_json):
    """Print a checkpoint's spec, parameter count, weight bytes by dtype and state bytes.

    \b
    Example:
      edgemamba inspect ./mamba-130m-hf --json
    """
    from edgemamba.checkpoint import read_spec

    spec, by_dtype = read_spec(checkpoint)
    info = {
        "spec": spec.to_dict(),
        "spec_hash": spec.spec_hash(),
        "n_params": spec.n_params,
        "weight_bytes_by_dtype": by_dtype,
        "state_bytes_per_sequence": spec.state_bytes(1),
        "conv_state_shape": list(spec.conv_state_shape(1)),
        "ssm_state_shape": list(spec.ssm_state_shape(1)),
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(spec.describe())
    click.echo(f"parameters     {spec.n_params:,}")
    click.echo("weights        " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(by_dtype.items())))
    click.echo(
        f"state          {_fmt_bytes(spec.state_bytes(1))} per sequence (fp32), constant in context length; "
        f"per layer conv {spec.conv_state_shape(1)} + ssm {spec.ssm_state_shape(1)}"
    )
