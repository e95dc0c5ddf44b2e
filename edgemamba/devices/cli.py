"""The `edgemamba devices` command, and the device options of `compile` and `bench`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgemamba.devices.profiles import GB, GiB, PROFILES, TERA, DeviceProfile, Figure, Processor, get_profile
from edgemamba.errors import EdgeMambaError


def resolve_profile(name: str, threads: int | None = None) -> DeviceProfile:
    """A profile name, 'this' (probe this machine now, its engines' costs at `threads` threads), or a
    JSON file from `devices --probe --json`."""
    from edgemamba.devices.probe import PROBE_NAME, probe

    if name == PROBE_NAME:
        return probe(threads=threads)
    if name in PROFILES or not name.endswith(".json"):
        return get_profile(name)
    path = Path(name)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise EdgeMambaError(f"{path}: cannot read device profile ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeMambaError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdgeMambaError(f"{path}: not a device profile")
    return DeviceProfile.from_dict(data)


# ---- edgemamba devices --------------------------------------------------------------------------
def _num(fig: Figure | None, scale: float, fmt: str = "{:.0f}") -> str:
    if fig is None:
        return "-"
    return ("~" if fig.estimate else "") + fmt.format(fig.value / scale)


def _summary_row(p: DeviceProfile) -> list[str]:
    fast = p.gpu or p.cpu  # the processor the preferred target runs on
    return [p.name, _num(fast.usable_memory, GiB, "{:.1f}"), _num(fast.bandwidth, GB, "{:.1f}"),
            _num(fast.peak_ops.get("fp16"), TERA, "{:.2f}"), _num(fast.peak_ops.get("int8"), TERA, "{:.2f}"),
            str(p.cpu.cores), ",".join(p.targets), ",".join(p.precisions)]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _describe_processor(proc: Processor) -> list[str]:
    def line(label, fig, scale, unit, fmt="{:.2f}"):
        return f"    {label:<22}{fmt.format(fig.value / scale)} {unit}   [{fig.source}]"

    out = [f"  {proc.kind.upper()}: {proc.name} ({proc.cores} {'cores' if proc.kind == 'cpu' else 'SMs'})",
           line("memory", proc.memory, GiB, "GiB"), line("usable memory", proc.usable_memory, GiB, "GiB"),
           line("bandwidth", proc.bandwidth, GB, "GB/s"),
           line("bandwidth efficiency", proc.bandwidth_efficiency, 1, "", "{:.2f}")]
    out += [line(f"peak {k}", v, TERA, "TOPS" if k == "int8" else "TFLOPS", "{:.3f}") for k, v in proc.peak_ops.items()]
    out.append(line("compute efficiency", proc.compute_efficiency, 1, "", "{:.2f}"))
    return out


def describe_profile(p: DeviceProfile) -> str:
    lines = [f"{p.name}: {p.title}", f"  targets     {', '.join(p.targets)}",
             f"  precisions  {', '.join(p.precisions)}"]
    if p.notes:
        lines.append(f"  notes       {p.notes}")
    for proc in (p.gpu, p.cpu):
        if proc is not None:
            lines += _describe_processor(proc)
    return "\n".join(lines)


@click.command(name="devices")
@click.argument("name", required=False)
@click.option("--probe", "do_probe", is_flag=True, help="Describe this machine, with quick measurements.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (a profile --predict accepts).")
@click.option("--tvm-library", type=click.Path(exists=True, file_okay=False), metavar="ARTIFACT",
              help="With --probe on a GPU: time this tvm-cuda artifact's prefill conv and scan kernels alone for "
                   "tvm-cuda's scan step (any library built for this GPU; weights not needed).")
def devices_cmd(name, do_probe, as_json, tvm_library):
    """List device profiles, describe one with the source of every figure, or probe this machine.

    Figures marked ~ are estimates; the others come from vendor datasheets or measurement.

    \b
    Examples:
      edgemamba devices
      edgemamba devices orin-nano-8gb
      edgemamba devices --probe --json > this.json
      edgemamba devices --probe --tvm-library model.em --json > this.json
      edgemamba bench model.em --predict this.json
    """
    if do_probe and name:
        raise click.UsageError("give a device NAME or --probe, not both")
    if tvm_library and not do_probe:
        raise click.UsageError("--tvm-library goes with --probe")
    if do_probe or name:
        from edgemamba.devices.probe import probe

        profile = probe(tvm_library=tvm_library) if do_probe else resolve_profile(name)
        click.echo(json.dumps(profile.to_dict(), indent=2) if as_json else describe_profile(profile))
        return
    if as_json:
        click.echo(json.dumps({n: p.to_dict() for n, p in PROFILES.items()}, indent=2))
        return
    header = ["device", "usable GiB", "GB/s", "fp16 TFLOPS", "int8 TOPS", "CPU cores", "targets", "precisions"]
    click.echo(_table([header] + [_summary_row(p) for p in PROFILES.values()]))
    click.echo("\n(~ estimate; GPU figures where the device has one)  details: edgemamba devices NAME")


# ---- compile --device ---------------------------------------------------------------------------
def compile_choice(checkpoint, device: str, target: str | None, precision: str | None) -> tuple[str, str, str]:
    """Target and precision for `compile --device` (the device's first preferences that can be
    built now, unless given) after checking the model fits: (target, precision, fit message)."""
    from edgemamba.artifact import TARGETS
    from edgemamba.checkpoint import read_spec
    from edgemamba.devices.fit import require_fit

    profile = resolve_profile(device)
    if target is None:
        buildable = [t for t in profile.targets if t in TARGETS]
        if not buildable:
            raise EdgeMambaError(f"none of {profile.name}'s targets ({', '.join(profile.targets)}) can be built by "
                                 f"this edgemamba (available: {', '.join(TARGETS)})")
        target = buildable[0]
    if precision is None:
        runnable = [p for p in profile.precisions if p in TARGETS.get(target, ())]
        if not runnable:
            raise EdgeMambaError(f"target {target!r} builds none of {profile.name}'s precisions "
                                 f"({', '.join(profile.precisions)})")
        precision = runnable[0]
    spec, _ = read_spec(checkpoint)  # config and file headers only: refuse before the load
    fit = require_fit(spec, profile, target, precision)
    return target, precision, fit.message()


# ---- bench --predict ----------------------------------------------------------------------------
def bench_prediction(artifact_path, device: str, prompt_len: int, measured: dict | None, engine: str = "auto",
                     threads: int | None = None) -> dict:
    """The prediction for an artifact on a device, for the engine that ran the measurement (else the one
    `engine` picks), with its error against `measured` when given; `threads`: of a probe of this machine."""
    from edgemamba.artifact import load_artifact
    from edgemamba.devices.predict import artifact_workload, predict

    art = load_artifact(artifact_path, verify=False)
    engine = (measured or {}).get("engine") or engine
    work = artifact_workload(art, engine)
    pred = predict(work, resolve_profile(device, threads), prompt_len=prompt_len).to_dict()
    if measured:
        pred["error_vs_measured"] = {
            "decode": pred["decode_ms"] / measured["decode_ms"]["p50"] - 1,
            "prefill": pred["prefill_tokens_per_s"] / measured["prefill_tokens_per_s"] - 1,
        }
    return pred


def echo_prediction(pred: dict) -> None:
    engine = f", {pred['engine']} engine" if pred.get("engine") else ""
    click.echo(f"predicted   decode {pred['decode_ms']:.2f} ms/token on {pred['device']} ({pred['target']}/"
               f"{pred['precision']}{engine}, {pred['decode_bound']}-bound: memory {pred['decode_memory_ms']:.2f} ms, "
               f"compute {pred['decode_compute_ms']:.2f} ms, overhead {pred['decode_overhead_ms']:.2f} ms)")
    click.echo(f"predicted   prefill {pred['prefill_tokens_per_s']:.0f} tokens/s ({pred['prefill_tokens']}-token prompt)")
    err = pred.get("error_vs_measured")
    if err:
        click.echo(f"prediction error   decode {err['decode']:+.0%}   prefill {err['prefill']:+.0%}")


# ---- bench --contexts --plot --------------------------------------------------------------------
def bench_contexts(artifact_path, contexts: str | None, plot: str | None, tokens: int, threads: int | None,
                   as_json: bool) -> None:
    from edgemamba.devices.context import context_sweep, parse_contexts, plot_context

    if contexts is None:
        raise click.UsageError("--plot needs --contexts (e.g. --contexts 64,1k,8k)")
    lengths = parse_contexts(contexts)
    if plot:  # refuse a missing matplotlib before the (possibly long) measurement
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EdgeMambaError("--plot needs matplotlib: pip install matplotlib") from None
    result = context_sweep(artifact_path, lengths, tokens=tokens, threads=threads, progress=not as_json)
    if plot:
        plot_context(result, plot)
        json_path = Path(plot).with_suffix(".json")
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        result["plot"], result["json"] = str(plot), str(json_path)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    gpu = all(p.get("gpu_memory_bytes") for p in result["points"])
    rows = [["context", "decode p50 ms", "p90 ms", "prefill tok/s", "RSS MiB", *(["GPU MiB"] if gpu else []),
             "state MiB", "Transformer KV MiB"]]
    for p in result["points"]:
        rows.append([str(p["context"]), f"{p['decode_ms_p50']:.2f}", f"{p['decode_ms_p90']:.2f}",
                     f"{p['prefill_tokens_per_s']:.0f}", f"{p['rss_bytes'] / 2**20:.0f}",
                     *([f"{p['gpu_memory_bytes'] / 2**20:.0f}"] if gpu else []),
                     f"{p['state_bytes'] / 2**20:.2f}", f"{p['transformer_kv_bytes'] / 2**20:.1f}"])
    click.echo(_table(rows))
    click.echo(f"Transformer: {result['transformer']['description']}")
    if plot:
        click.echo(f"wrote {result['plot']} and {result['json']}")
