"""``mist-cloud``: run a frozen timm backbone over images and write Gather* summed features.

The click conventions and flag types come from ``mist.kit``, shared with the device CLI; ``push`` is
``mist.ship.commands.push``, registered here.

torch and timm are imported inside the commands, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from mist.kit.cli import CONTEXT, completion_help, one_line_errors, os_error_message, package_version, teach
from mist.kit.flags import SEED, LazyChoice, Size, finite_float, memory_flag, memory_limit, memory_option
from mist.kit.progress import MODES
from mist.ship import commands as ship_commands
from mist.ship import trust as ship_trust

from .errors import CloudError


def _storage_dtypes() -> tuple[str, ...]:
    from mist.formats.quant import STORAGE_DTYPES  # NumPy: loaded once a value is checked, never at import

    return STORAGE_DTYPES


STORAGE_DTYPE = LazyChoice(_storage_dtypes)  # --dtype: float16, float32 and every scheme of formats/quant.py


def _log(message: str) -> None:
    click.echo(message, err=True)


def _user_error_message(e: Exception) -> str | None:
    """Bad flags, data, weights or feature sets: one line. Anything else is a bug and keeps its traceback.

    Under torchrun the line names the rank, since every rank's stderr lands in the same terminal."""
    message = _one_line(e)
    if message is not None and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: {message}"
    return message


def _one_line(e: Exception) -> str | None:
    from mist.formats import FormatError
    from mist.formats.quant import QuantError

    if isinstance(e, (CloudError, FormatError, QuantError)):  # QuantError: sums an int8/int4 set cannot hold
        return str(e)
    if isinstance(e, ImportError) and (e.name or "").split(".")[0] in ("torch", "timm", "torchvision"):
        return f"mist-cloud needs the [cloud] extra ({e.name} is not installed): pip install 'mist-tuning[cloud]'"
    if isinstance(e, OSError):
        return os_error_message(e)
    return None


@click.group(cls=one_line_errors(_user_error_message, interrupted="interrupted; rerun the same command to resume"),
             context_settings=CONTEXT)
@click.version_option(package_version(), prog_name="mist-cloud")
def main() -> None:
    """MIST on the cloud: a frozen timm backbone turns images into Gather* summed features.

    `mist-cloud info MODEL` lists the layers you can tap; `mist-cloud extract` writes a feature set that
    `mist-device` trains on. The README walks through both sides, end to end.
    """


def _json_object(ctx: click.Context, _param: click.Parameter, value: str | None) -> dict | None:
    if value is None:
        return None
    import json

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e.msg})", ctx=ctx) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"depth\": 12}'", ctx=ctx)
    return parsed


_MODEL_KWARGS = click.option(
    "--model-kwargs", default=None, callback=_json_object,
    help="JSON object of extra timm.create_model arguments, e.g. '{\"depth\": 12, \"patch_size\": 4}'; "
         "recorded in the manifest.")


def _weights_choice(pretrained: bool, weights: str | None, random_init: bool) -> str:
    chosen = [flag for flag, on in (("--pretrained", pretrained), ("--weights", weights is not None),
                                    ("--random-init", random_init)) if on]
    if len(chosen) != 1:
        got = ", ".join(chosen) if chosen else "none"
        raise click.UsageError(f"pass exactly one of --pretrained, --weights FILE, --random-init (got {got})")
    return "pretrained" if pretrained else "file" if weights is not None else "random-init"


@main.command()
@click.option("--model", required=True, help="A timm model name, e.g. tf_efficientnet_lite0, vit_base_patch16_224.")
@click.option("--pretrained", is_flag=True,
              help="Pretrained weights: an installed weights package if there is one (tf_efficientnet_lite0), "
                   "else the timm hub.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="A local .safetensors/.pth/.pt state dict for --model.")
@click.option("--random-init", is_flag=True, help="Random weights (seeded by --seed); stamped in the manifest.")
@click.option("--data", required=True,
              help="An ImageFolder directory, a segmentation folder (images/, masks/, classes.txt), a CSV/text file "
                   "of 'path,label' lines, or fashion-mnist[:DIR].")
@click.option("--split", type=click.Choice(["train", "test"]), default="train",
              help="Which Fashion-MNIST split; for other sources, only recorded in the manifest.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The feature-set directory.")
@click.option("--groups", default="auto",
              help="Gather* layer groups, each summed into one map: auto (the longest run of layers of equal "
                   "shape, valid for every model), all, each, last, 12, 0-12, 0-6,7-12. "
                   "`mist-cloud info MODEL` lists the layers.")
@click.option("--scale", type=click.Choice(["none", "mean"]), default="none",
              help="Divide each group's sum by its size (mean) or not.")
@click.option("--dtype", type=STORAGE_DTYPE, default="float16",
              help="Storage dtype. int8/int4: the fp32 sums quantised with one fp16 scale per token.")
@click.option("--batch-size", type=click.IntRange(1), default=16)
@click.option("--workers", type=click.IntRange(0, 256), default=1, help="DataLoader processes that decode images.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="torch threads for the forward. Default: torch's.")
@click.option("--shard-rows", type=click.IntRange(1), default=512,
              help="Rows per shard, rounded up to a multiple of --batch-size.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Extract a random subset of this many images.")
@click.option("--per-class", type=click.IntRange(1), default=None,
              help="Extract this many random images of each class.")
@click.option("--seed", type=SEED, default=0, help="Seeds the subsets and --random-init.")
@click.option("--img-size", type=click.IntRange(1), default=None, help="Input size override (default: the model's).")
@click.option("--crop-pct", type=finite_float(0, min_open=True), default=None,
              help="Fraction of the resized image the centre crop keeps; 1.0 keeps it all (default: the model's, "
                   "e.g. 0.875 for Lite0). Recorded in the manifest.")
@click.option("--crop-mode", type=click.Choice(["center", "squash", "border"]), default=None,
              help="How the image is resized before the crop: center (shorter side, then crop), squash "
                   "(both sides, no aspect kept) or border (fit, then pad). Default: the model's.")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]), default=None,
              help="Resize interpolation (default: the model's). Recorded in the manifest.")
@click.option("--pool", type=click.Choice(["none", "mean", "cls"]), default="none",
              help="Ship each summed map pooled to one token (T=1): the mean of its tokens, or the class token. "
                   "A probe then ships d values per map instead of T x d.")
@click.option("--label-multiple", type=click.IntRange(1, 16), default=4,
              help="Segmentation folders: label maps ship at this multiple of the token grid (1 byte a pixel).")
@_MODEL_KWARGS
@click.option("--overwrite", is_flag=True, help="Replace an existing set instead of resuming it.")
@click.option("--device", default="cpu",
              help="Where the backbone runs: cpu, cuda, cuda:N, or auto (cuda when available).")
@click.option("--progress", type=click.Choice(MODES), default="auto",
              help="auto: a bar on a terminal, periodic lines otherwise.")
@click.option("--autocast", type=click.Choice(["auto", "off", "bf16", "fp16"]), default="auto",
              help="Forward in bf16/fp16 autocast (sums stay fp32). auto: bf16 for ViTs on CUDA, else off; "
                   "recorded in the manifest when on.")
@ship_trust.sign_key_option("the feature set's manifest")
@memory_option
def extract(model: str, pretrained: bool, weights: str | None, random_init: bool, data: str, split: str,
            out: str, groups: str, scale: str, dtype: str, batch_size: int, workers: int, threads: int | None,
            shard_rows: int, limit: int | None, per_class: int | None, seed: int, img_size: int | None,
            crop_pct: float | None, crop_mode: str | None, interpolation: str | None, pool: str,
            label_multiple: int, model_kwargs: dict | None, overwrite: bool, device: str, progress: str, autocast: str,
            sign_key) -> None:
    """Extract Gather* features of --data through --model into the feature set --out.

    Rerunning the same command after an interruption resumes after the last whole shard. Under `torchrun
    --nproc-per-node N -m mist.cloud extract ...` the ranks share the work (README: "Extracting at scale").
    """
    from .extract import ExtractConfig
    from .extract import extract as run

    cfg = ExtractConfig(
        model=model, weights=_weights_choice(pretrained, weights, random_init), weights_file=weights,
        data=data, out=Path(out), split=split, groups=groups, scale=scale, dtype=dtype, batch_size=batch_size,
        workers=workers, threads=threads, shard_rows=shard_rows, limit=limit, per_class=per_class, seed=seed,
        overwrite=overwrite, img_size=img_size, model_kwargs=model_kwargs, device=device, progress=progress,
        crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation, pool=pool,
        autocast=autocast, sign_key=sign_key, label_multiple=label_multiple,
        max_memory=memory_limit(memory_flag())[0],
    )
    run(cfg, log=_log)


@main.command()
@click.argument("feature_set", type=click.Path(exists=True, file_okay=False))
@click.option("--dtype", type=STORAGE_DTYPE, required=True,
              help="The storage dtype of the new set.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The new feature-set directory.")
@click.option("--shard-rows", type=click.IntRange(1), default=None,
              help="Rows per shard of the new set. Default: the source set's.")
@click.option("--overwrite", is_flag=True, help="Replace an existing set at --out instead of resuming it.")
@ship_trust.sign_key_option("the new set's manifest")
def convert(feature_set: str, dtype: str, out: str, shard_rows: int | None, overwrite: bool, sign_key) -> None:
    """Re-encode FEATURE_SET in another storage dtype into --out, without the backbone.

    The rows are decoded to fp32 and encoded again (int8/int4: quantised per token). Rerunning the same
    command after an interruption resumes after the last whole shard.
    """
    from .convert import convert as run

    run(Path(feature_set), Path(out), dtype, shard_rows=shard_rows, overwrite=overwrite, log=_log, signer=sign_key)


@main.command()
@click.argument("model")
@click.option("--img-size", type=click.IntRange(1), default=None, help="Input size override (default: the model's).")
@_MODEL_KWARGS
@memory_option
def info(model: str, img_size: int | None, model_kwargs: dict | None) -> None:
    """List MODEL's tappable layers with their (T, d), and suggest --groups. Needs no weights."""
    from .backbones import create_backbone
    from .gather import format_groups, same_shape_runs
    from .resources import address_space_limit
    from .taps import find_layers, probe, recipe_for

    limit = memory_limit(memory_flag())[0]
    if img_size and limit is not None and 4 * 3 * img_size**2 > limit:
        raise CloudError(f"--img-size {img_size}: one input image alone needs more than the memory allowed")
    with address_space_limit(limit, f"{model} at its input size"):
        backbone = create_backbone(model, "random-init", img_size=img_size, log=lambda _m: None,
                                   model_kwargs=model_kwargs)
        layers = find_layers(backbone.model)
        shapes = probe(backbone.model, layers, backbone.data_config["input_size"])
    recipe = recipe_for(backbone.model)
    size = "x".join(str(s) for s in backbone.data_config["input_size"])
    has_head = recipe.head is not None and layers[-1].name == recipe.head
    blocks = len(layers) - 1 - has_head
    click.echo(f"{model} ({type(backbone.model).__name__}, {recipe.layout}), input {size}, {len(layers)} layers: "
               f"0 = input of the first block, 1..{blocks} = block outputs"
               + (f", {len(layers) - 1} = head ({recipe.head})" if has_head else ""))
    click.echo(f"{'layer':>5}  {'module':<24} {'T':>6} {'d':>5}  {'prefix':>6}  grid")
    for layer, shape in zip(layers, shapes):
        grid = "x".join(map(str, shape.grid)) if shape.grid else "-"
        click.echo(f"{layer.index:>5}  {layer.name:<24} {shape.tokens:>6} {shape.dim:>5}  {shape.prefix:>6}  {grid}")
    runs = same_shape_runs([s.td for s in shapes])
    click.echo("runs of equal (T, d), each a valid group: " + "  ".join(format_groups([r]) for r in runs))
    longest = max(runs, key=len)
    examples = ["last"] + ([format_groups([longest])] if len(longest) > 1 else [])
    if len(longest) >= 4:
        half = longest[: len(longest) // 2], longest[len(longest) // 2:]
        examples.append(format_groups(half))
    examples.append("each")
    click.echo("try: " + " | ".join(f"--groups {e}" for e in examples))
    from .gather import auto_groups

    click.echo(f"default: --groups auto = {format_groups(auto_groups([s.td for s in shapes]))}")


@main.command()
@click.option("--model", required=True, help="A timm model name, as for extract.")
@click.option("--pretrained", is_flag=True, help="Pretrained weights, as for extract.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="A local state dict for --model.")
@click.option("--random-init", is_flag=True, help="Random weights (seeded by --seed).")
@click.option("--groups", default="auto", help="Gather* layer groups, exactly as extract takes them.")
@click.option("--scale", type=click.Choice(["none", "mean"]), default="none", help="As for extract.")
@click.option("--pool", type=click.Choice(["none", "mean", "cls"]), default="none", help="As for extract.")
@click.option("--crop-pct", type=finite_float(0, min_open=True), default=None, help="As for extract.")
@click.option("--crop-mode", type=click.Choice(["center", "squash", "border"]), default=None, help="As for extract.")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]), default=None,
              help="As for extract.")
@click.option("--dtype", type=STORAGE_DTYPE, default="float16",
              help="Dtype of the answers; int8/int4 are quantised per token as extract --dtype does.")
@click.option("--seed", type=SEED, default=0, help="Seeds --random-init.")
@click.option("--img-size", type=click.IntRange(1), default=None, help="Input size override (default: the model's).")
@_MODEL_KWARGS
@click.option("--device", default="cpu", help="cpu, cuda, cuda:N, or auto.")
@click.option("--autocast", type=click.Choice(["auto", "off", "bf16", "fp16"]), default="auto", help="As for extract.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads for the forward.")
@click.option("--host", default="127.0.0.1", help="Address to bind; anything but loopback is reachable by others.")
@click.option("--port", type=click.IntRange(0, 65535), default=8750, help="TCP port; 0 picks a free one.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the bearer token clients must send. Default: $MIST_SERVE_TOKEN, else no token.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, help="PEM certificate: serve HTTPS.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="PEM private key of --tls-cert.")
@click.option("--max-batch", type=click.IntRange(1), default=16, help="Images per backbone forward; 1: one at a time.")
@click.option("--max-wait-ms", type=finite_float(0), default=5.0,
              help="How long a forward waits for more requests to batch.")
@click.option("--max-queue", type=click.IntRange(1), default=64,
              help="Images queued or in the forward; more requests get 503.")
@click.option("--max-images", type=click.IntRange(1), default=16, help="Images in one request.")
@click.option("--max-body-bytes", type=Size(1), default="16M", metavar="SIZE", help="Largest request body, e.g. 16M.")
@click.option("--max-pixels", type=click.IntRange(1), default=25_000_000,
              help="Largest image (width x height), checked before decoding: the decompression-bomb guard.")
@click.option("--client-timeout", type=finite_float(0.1), default=10.0,
              help="Seconds a client has to send its headers, and again its body.")
@click.option("--max-connections", type=click.IntRange(1), default=64, help="Open connections; more get 503.")
def serve(model: str, pretrained: bool, weights: str | None, random_init: bool, groups: str, scale: str, pool: str,
          crop_pct: float | None, crop_mode: str | None, interpolation: str | None, dtype: str, seed: int,
          img_size: int | None, model_kwargs: dict | None, device: str, autocast: str, threads: int | None, host: str,
          port: int, token_file: str | None, tls_cert: str | None, tls_key: str | None, max_batch: int,
          max_wait_ms: float, max_queue: int, max_images: int, max_body_bytes: int, max_pixels: int,
          client_timeout: float, max_connections: int) -> None:
    """Serve --model's Gather* sums over HTTP for `mist-device predict --server` (README: "Classifying new
    images: separated inference").

    POST /v1/features (one image as the body, or several as multipart/form-data) answers a safetensors
    feature shard; GET /v1/layout the layout; GET /healthz liveness.
    """
    from .serve import ServeConfig
    from .serve import serve as run
    from .serve_guard import check_safety, read_token

    cfg = ServeConfig(host=host, port=port, token=read_token(token_file), tls_cert=tls_cert, tls_key=tls_key,
                      scale=scale, dtype=dtype, max_batch=max_batch, max_wait_ms=max_wait_ms,
                      max_queue=max(max_queue, max_images), max_images=max_images, max_body_bytes=max_body_bytes,
                      max_pixels=max_pixels, client_timeout=client_timeout, max_connections=max_connections)
    check_safety(cfg, _log)  # before torch and the backbone load: a bad token or certificate fails at once
    import torch

    from .frozen import load_frozen

    if threads:
        torch.set_num_threads(threads)
    overrides = {"crop_pct": crop_pct, "crop_mode": crop_mode, "interpolation": interpolation}
    try:  # Ctrl-C stops a server: nothing to resume, and not an error
        frozen = load_frozen(model, _weights_choice(pretrained, weights, random_init), weights, img_size, seed,
                             groups, pool, {k: v for k, v in overrides.items() if v is not None}, device, autocast,
                             _log, model_kwargs=model_kwargs)
        run(frozen, cfg, log=_log)
    except KeyboardInterrupt:
        _log("serve: stopped")


# ---- help that teaches: summaries, examples, environment variables, metavars, option groups -----------------

_SHORT_HELP = {
    "extract": "Extract Gather* summed features of images into a feature set.",
    "info": "List a model's tappable layers and suggest --groups.",
    "convert": "Re-encode a feature set in another dtype (int8, int4), no backbone.",
    "serve": "Serve Gather* sums of new images over HTTP (predict --server).",
}

_EPILOGS = {
    "extract": """\b
Examples:
  mist-cloud extract --model tf_efficientnet_lite0 --pretrained --data photos/train --out feats/train
  mist-cloud extract --model tf_efficientnet_lite0 --pretrained --data photos/test --out feats/test
  mist-cloud extract --model tf_efficientnet_lite0 --pretrained --data fashion-mnist --split test \\
      --limit 2000 --groups 12-15 --out feats/test
  mist-cloud extract --model tf_efficientnet_lite0 --pretrained --data photos/train --groups 17 \\
      --pool mean --out feats/probe             # a pooled vector per image, for a linear probe
  mist-cloud extract --model vit_base_patch16_224 --weights vit.safetensors --data list.csv \\
      --groups 0-6,7-12 --scale mean --device auto --out feats/vit
--data is an ImageFolder (one subfolder per class), a segmentation folder (images/, masks/ label maps,
classes.txt), a CSV of 'path,label' lines, or fashion-mnist[:DIR].
Every set made for one adaptor (train, validation, test) needs the same --model, weights, --groups,
--scale, --pool and data options; the device refuses to mix sets that differ.""",
    "convert": """\b
Examples:
  mist-cloud convert feats/train --dtype int8 --out feats/train-int8     # 50.5% of the float16 bytes (d=192)
  mist-cloud convert feats/train --dtype int4 --out feats/train-int4     # 25.5%
  mist-cloud convert feats/train-int8 --dtype float16 --out feats/back --shard-rows 256
Start from float32 or float16 when you can: int8 -> int4 quantises twice. The formulas are in §12 of
the format spec, installed with mist as mist/formats/SPEC.md.""",
    "serve": """\b
Examples:
  mist-cloud serve --model tf_efficientnet_lite0 --pretrained --groups 12-15 --token-file token
  mist-cloud serve --model tf_efficientnet_lite0 --pretrained --groups 12-15 --host 0.0.0.0 \\
      --token-file token --tls-cert cert.pem --tls-key key.pem
Take the backbone options the training set was extracted with; the device refuses a server that differs.""",
    "info": """\b
Examples:
  mist-cloud info tf_efficientnet_lite0
  mist-cloud info vit_base_patch16_224 --img-size 384
  mist-cloud info test_vit --model-kwargs '{"depth": 12}'""",
}

_SECTIONS = {
    "extract": {
        "Model and weights": ["model", "pretrained", "weights", "random_init", "model_kwargs", "img_size"],
        "Images": ["data", "split", "limit", "per_class", "seed", "crop_pct", "crop_mode", "interpolation"],
        "What ships": ["out", "groups", "scale", "pool", "dtype", "label_multiple", "shard_rows", "overwrite"],
        "Speed and progress": ["device", "autocast", "batch_size", "workers", "threads", "progress", "max_memory"],
    },
}

_METAVARS = {"model": "MODEL", "weights": "FILE", "data": "SOURCE", "out": "FEATURE_SET", "groups": "SPEC",
             "model_kwargs": "JSON", "device": "DEVICE"}

_OPTION_HELP = {
    "batch_size": "Images per forward pass; a shard holds a whole number of batches.",
}

main.epilog = """\b
Start here:
  mist-cloud info tf_efficientnet_lite0           # layers, shapes, the default --groups
  mist-cloud extract --model tf_efficientnet_lite0 --pretrained --data photos/train --out feats/train
Then copy feats/ to the device: mist-device train feats/train --out run.

\b
Every option also reads an environment variable, MIST_<COMMAND>_<OPTION>, the
flag in capitals: MIST_EXTRACT_DEVICE=cuda (each --help names them).

""" + completion_help("mist-cloud")

for command in (ship_commands.push, ship_trust.keygen, ship_trust.sign):
    main.add_command(command)

teach(main, _SHORT_HELP, _EPILOGS, _SECTIONS, _METAVARS, _OPTION_HELP)
