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
        except click.UsageError as e:  # a bad option value: one line too, saying where to look
            if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                raise  # a bare group: click shows its help
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
            click.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
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


def _load(checkpoint):
    from edgemamba.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Directory to write step.onnx, prefill.onnx, weights.bin.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
def export(checkpoint, output, force):
    """Export the step and prefill ONNX graphs (standard operators, explicit state).

    \b
    Example:
      edgemamba export ./mamba-130m-hf -o ./mamba-130m-onnx
    """
    from pathlib import Path

    from edgemamba.artifact import atomic_dir
    from edgemamba.export import export as export_graphs

    ckpt = _load(checkpoint)
    with atomic_dir(Path(output), force) as tmp:
        files = export_graphs(ckpt, tmp)
    for f in files.values():
        click.echo(f"wrote {Path(output) / f.name}")


@main.command(name="compile")
@click.argument("checkpoint", type=click.Path())
@click.option("--target", default=None, help="Deployment target (default: ort-cpu, or the --device's first that builds).")
@click.option("--precision", default=None, help="Weight/activation precision (default: fp32, or the --device's first).")
@click.option("--device", help="Device profile (`edgemamba devices`): picks defaults, refuses a model that does not fit.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Artifact directory to create.")
@click.option("--recipe", type=click.Path(), help="YAML recipe: per-layer overrides (block_size, keep, skip_layers, ...).")
@click.option("--arch", default=None, help="GPU architecture for tvm-cuda (e.g. sm_87 for Jetson Orin, sm_90 for H100).")
@click.option("--calib", type=click.Path(), help="Calibration text or token ids (w8a8: static activation scales).")
@click.option("--calib-tokens", default=1024, show_default=True, type=click.IntRange(16, 1 << 20))
@click.option("--verify-text", type=click.Path(), help="Held-out text: print a short accuracy report after compiling.")
@click.option("--force", is_flag=True, help="Replace the artifact if it exists.")
def compile_cmd(checkpoint, target, precision, output, recipe, arch, calib, calib_tokens, verify_text, force, device):
    """Compile a checkpoint into a deployable artifact (manifest + graphs + weights + tokenizer).

    Precisions for ort-cpu: fp32, fp16 (16-bit weights, float32 islands and state), int8 and int4
    (block-wise weights on ONNX Runtime's MatMulNBits, int8 embedding).

    \b
    Examples:
      edgemamba compile ./mamba-130m-hf --target ort-cpu --precision fp32 -o mamba.em
      edgemamba compile ./mamba-130m-hf --precision int4 --recipe recipe.yaml -o mamba-int4.em
    """
    from edgemamba.artifact import check_target, compile_artifact

    fit_note = None
    if device:  # target/precision defaults for the device, and the memory fit check (spec only, no load)
        from edgemamba.devices.cli import compile_choice

        target, precision, fit_note = compile_choice(checkpoint, device, target, precision)
    target, precision = target or "ort-cpu", precision or "fp32"
    from edgemamba.passes.pipelines import Recipe

    check_target(target, precision)  # refuse before the (possibly long) load
    parsed = Recipe.load(recipe)
    ckpt = _load(checkpoint)
    calib_ids = None
    if calib:
        from edgemamba.session import _load_tokenizer
        from edgemamba.verify import read_ids

        calib_ids = read_ids(calib, _load_tokenizer(ckpt.tokenizer_path, ckpt.spec.vocab_size), calib_tokens)
    options = {"arch": arch} if arch else {}
    art = compile_artifact(ckpt, output, target, precision, force, parsed, calib_ids, **options)
    files = art.manifest["files"]
    total = sum(f["bytes"] for f in files.values())
    spec = art.spec
    click.echo(f"compiled {spec.source or 'model'} ({spec.n_params:,} parameters) for {target}/{precision} -> {output}")
    parts = ", ".join(f"{name} {_fmt_bytes(info['bytes'])}" for name, info in files.items())
    click.echo(f"  artifact size   {_fmt_bytes(total)} ({parts})")
    click.echo(f"  state           {_fmt_bytes(art.manifest['state_bytes_per_sequence'])} per sequence, constant in context length")
    # what the runtime holds: the engines (each holds its own weights) where there are engines, else weights.bin
    engines = [info["bytes"] for name, info in files.items() if name.endswith(".engine")]
    resident = sum(engines) if engines else files["weights.bin"]["bytes"]
    click.echo(f"  expected memory ~{_fmt_bytes(resident + art.manifest['state_bytes_per_sequence'])} weights + state, "
               "plus runtime workspace")
    if fit_note:
        click.echo(f"  device          {fit_note}")
    if verify_text:
        from edgemamba.session import _load_tokenizer
        from edgemamba.verify import read_ids, summary, verify_artifact

        ids = read_ids(verify_text, _load_tokenizer(art.tokenizer_path, art.spec.vocab_size), 256)
        click.echo("  accuracy        " + summary(verify_artifact(art.path, checkpoint, ids, 32)))
    elif precision == "fp32":
        click.echo("  accuracy        fp32: same numerics as the reference (checked by the test suite)")
    else:
        click.echo(f"  accuracy        run `edgemamba verify {output} --reference {checkpoint} --text FILE` to measure it")



@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--reference", "reference", required=True, type=click.Path(), help="The checkpoint it was compiled from.")
@click.option("--text", required=True, type=click.Path(), help="Held-out text (or a file of token ids).")
@click.option("--tokens", default=512, show_default=True, type=click.IntRange(2, 1 << 20), help="Tokens to evaluate.")
@click.option("--greedy-tokens", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--threads", default=None, type=int)
@click.option("--json", "as_json", is_flag=True)
def verify(artifact, reference, text, tokens, greedy_tokens, threads, as_json):
    """Measure an artifact's accuracy against the float32 reference of its checkpoint.

    Teacher-forced over --tokens tokens: top-1 agreement, mean KL, max abs logit error, perplexity
    of both, state error after N tokens, identical greedy continuation. Exits 1 when a figure is
    past the threshold for the artifact's precision.

    \b
    Example:
      edgemamba verify mamba-int8.em --reference ./mamba-130m-hf --text heldout.txt --tokens 1024
    """
    from edgemamba.session import _load_tokenizer
    from edgemamba.artifact import load_artifact
    from edgemamba.verify import read_ids, summary, verify_artifact

    art = load_artifact(artifact)
    ids = read_ids(text, _load_tokenizer(art.tokenizer_path, art.spec.vocab_size), tokens)
    report = verify_artifact(art.path, reference, ids, greedy_tokens, threads)
    click.echo(json.dumps(report, indent=2) if as_json else summary(report))
    if not report["passed"]:
        sys.exit(1)


def _prompt_ids(session, prompt, prompt_ids):
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    if prompt_ids is not None:
        try:
            return [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            from edgemamba.errors import EdgeMambaError

            raise EdgeMambaError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
    return session.encode(prompt)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", help="Prompt text (needs a tokenizer in the artifact).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("-n", "--max-new-tokens", default=64, show_default=True, type=click.IntRange(0, 1 << 40))
@click.option("--greedy", is_flag=True, help="Greedy decoding (the default unless --temperature is set).")
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-k", default=0, type=int, help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", default=1.0, type=float, help="Nucleus sampling mass.")
@click.option("--seed", default=None, type=int)
@click.option("--stop-id", "stop_ids", multiple=True, type=int, help="Stop token id (repeatable; default: eos).")
@click.option("--state-in", type=click.Path(), help="Resume from a saved state file (prompt continues it).")
@click.option("--state-out", type=click.Path(), help="Save the final state here.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: physical cores).")
@click.option("--no-verify", is_flag=True, help="Skip artifact checksum verification on load.")
@click.option("--engine", type=click.Choice(["auto", "native", "ort"]), default="auto", show_default=True,
              help="ort-cpu artifacts: edgemamba's native CPU engine, ONNX Runtime, or native where supported.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def run(artifact, prompt, prompt_ids, max_new_tokens, greedy, temperature, top_k, top_p, seed, stop_ids, state_in,
        state_out, threads, no_verify, engine, as_json):
    """Stream tokens from an artifact.

    \b
    Examples:
      edgemamba run mamba.em --prompt "def fibonacci(n):" -n 80
      edgemamba run mamba.em --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 1 --json
      edgemamba run mamba.em --prompt "x = 1" --state-out chat.state
      edgemamba run mamba.em --prompt "\\ny = " --state-in chat.state
    """
    import time

    from edgemamba.sampling import SamplingParams
    from edgemamba.session import Session

    if greedy and temperature:
        raise click.UsageError("--greedy and --temperature are exclusive")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    session = Session(artifact, threads=threads, verify=not no_verify, engine=engine)
    ids = _prompt_ids(session, prompt, prompt_ids)
    if state_in:
        session.load_state(state_in)
    stop = list(stop_ids) if stop_ids else None
    text_mode = session.tokenizer is not None and not as_json
    t0 = time.perf_counter()
    first = None
    out: list[int] = []
    gen = session.generate(ids, max_new_tokens, sampling=params, stop=stop)
    emitted = ""
    for token in gen:
        first = first or time.perf_counter()
        out.append(token)
        if text_mode:
            text = session.decode(out)
            if not text.endswith("\ufffd"):
                click.echo(text[len(emitted):], nl=False)
                emitted = text
        elif not as_json:
            click.echo(f"{token} ", nl=False)
    elapsed = time.perf_counter() - t0
    decode_s = time.perf_counter() - (first or t0)
    tps = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0
    if state_out:
        session.save_state(state_out)
    if as_json:
        result = {"prompt_tokens": len(ids), "tokens": out, "decode_tokens_per_s": tps, "seconds": elapsed,
                  "time_to_first_token_s": (first - t0) if first else None}
        if session.tokenizer is not None:
            result["text"] = session.decode(out)
        click.echo(json.dumps(result))
    else:
        click.echo("")
        click.echo(f"[{len(ids)} prompt tokens, {len(out)} new tokens, {tps:.1f} tokens/s decode]", err=True)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--tokens", default=256, show_default=True, type=click.IntRange(16, 1 << 20), help="Decode steps timed.")
@click.option("--prompt-len", default=512, show_default=True, type=click.IntRange(1, 1 << 20), help="Prefill length.")
@click.option("--context", default=0, show_default=True, type=click.IntRange(0, 1 << 24),
              help="Decode after this many context tokens (prefilled first).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 100), help="Prefill timing repeats.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: physical cores).")
@click.option("--predict", "predict_device", metavar="DEVICE",
              help="Also predict on a device: a name from `edgemamba devices`, 'this', or a profile JSON.")
@click.option("--no-measure", is_flag=True, help="With --predict: the prediction only, nothing measured here.")
@click.option("--contexts", help="Decode latency and memory at these context lengths instead, e.g. 64,1k,8k,64k.")
@click.option("--plot", type=click.Path(), help="With --contexts: write the plot (PNG) here and its data beside it (.json).")
@click.option("--engine", type=click.Choice(["auto", "native", "ort"]), default="auto", show_default=True,
              help="ort-cpu artifacts: edgemamba's native CPU engine, ONNX Runtime, or native where supported.")
@click.option("--json", "as_json", is_flag=True)
def bench(artifact, tokens, prompt_len, context, repeats, threads, predict_device, no_measure, contexts, plot, engine,
          as_json):
    """Measure decode latency (p50/p90/p99), prefill throughput, peak RSS and state bytes.

    \b
    Examples:
      edgemamba bench mamba.em --tokens 256 --prompt-len 512 --json
      edgemamba bench mamba.em --predict orin-nano-8gb --no-measure
      edgemamba bench mamba.em --predict this          # prediction beside measurement, with its error
      edgemamba bench mamba.em --contexts 64,1k,8k,64k --tokens 64 --plot context.png
    """
    from edgemamba.measure import bench_artifact

    if contexts or plot:
        from edgemamba.devices.cli import bench_contexts

        return bench_contexts(artifact, contexts, plot, tokens, threads, as_json)
    if no_measure and not predict_device:
        raise click.UsageError("--no-measure needs --predict DEVICE")
    result = {} if no_measure else bench_artifact(artifact, tokens=tokens, prompt_len=prompt_len, context=context,
                                                  repeats=repeats, threads=threads, progress=not as_json,
                                                  engine=engine)
    if predict_device:
        from edgemamba.devices.cli import bench_prediction, echo_prediction

        result["prediction"] = bench_prediction(artifact, predict_device, prompt_len, result or None, engine=engine,
                                                threads=threads)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if not no_measure:
        d = result["decode_ms"]
        click.echo(f"decode      p50 {d['p50']:.2f} ms/token   p90 {d['p90']:.2f}   p99 {d['p99']:.2f}   "
                   f"({result['tokens']} tokens at context {result['context']})")
        click.echo(f"prefill     {result['prefill_tokens_per_s']:.0f} tokens/s ({prompt_len}-token prompt, "
                   f"median of {repeats})")
        click.echo(f"peak RSS    {_fmt_bytes(result['peak_rss_bytes'])}   weights {_fmt_bytes(result['weight_bytes'])}")
        click.echo(f"state       {_fmt_bytes(result['state_bytes'])} per sequence")
        click.echo(f"engine      {result['engine']}" + (f" (native engine not used: {result['fallback_reason']})"
                                                         if result.get("fallback_reason") else ""))
    if predict_device:
        echo_prediction(result["prediction"])


from edgemamba.devices.cli import devices_cmd  # noqa: E402

main.add_command(devices_cmd)
