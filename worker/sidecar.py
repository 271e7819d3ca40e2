"""The adapter's metadata: the `lorajobs.json` sidecar and a model card `README.md`.

The sidecar is built only from the spec and facts the worker measured (hashes, versions,
hardware, timings): never from environment variables, so no credential can leak into a bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lorajobs.jobspecs.cuda import base_quantization
from lorajobs.jobspecs.loader import spec_to_dict
from lorajobs.jobspecs.models import AnyJobSpec
from lorajobs.storage.transfer import sha256_file
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.serving import card_lines, serving_of

FORMAT = "lorajobs.adapter/v1"
SIDECAR = "lorajobs.json"
MODEL_CARD = "README.md"
_PACKAGES = ["lorajobs", "torch", "diffusers", "transformers", "peft", "safetensors"]
_URI_FIELDS = ("base_model", "dataset", "output")


def canonical_json(data: Any) -> str:
    """Sorted keys, indent 2, trailing newline: the same data always gives the same bytes."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def redact_uri(uri: str) -> str:
    """Drop `user:password@` and any query string (presigned URLs carry signatures there)."""
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return uri  # a plain path or a hub id: nothing to hide
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def file_manifest(root: Path, *, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """`{relpath: {"sha256", "size"}}` for every file under `root` (or `root` itself if a file)."""
    if root.is_file():
        return {root.name: {"sha256": sha256_file(root), "size": root.stat().st_size}}
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def tree_digest(root: Path, *, hash_cache: Path | None = None) -> str:
    """The content digest of a file or folder: `lorajobs.storage.staging.manifest_digest` over its
    (relpath, size, sha256), hidden names skipped. It equals the `<digest>` a staged copy has
    in the bucket (`models/<digest>/`, `datasets/<digest>/`), so the two can be matched.

    Hashing a 70B model's folder takes minutes, so it is avoided where the answer is known:
    a staged entry pulled into the node cache is named `sha256-<digest>` (the pull verified
    every file against that manifest), and otherwise hashes are reused from `hash_cache` while
    a file keeps its size, mtime and inode.
    """
    from lorajobs.storage.staging import local_manifest, manifest_digest

    m = _PULLED_ENTRY.match(root.name)
    if m is not None and root.is_dir():
        return m.group(1)
    return manifest_digest(local_manifest(root, hash_cache=hash_cache))


# The node-cache folder of a staged entry (worker.pull): named by its manifest digest.
_PULLED_ENTRY = re.compile(r"^sha256-([0-9a-f]{64})$")


def hash_cache_for(cache_dir: Path, root: Path) -> Path:
    """The node-local file that remembers the hashes of the files under `root`."""
    name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return cache_dir / "hashes" / f"{name}.json"


def library_versions() -> dict[str, str | None]:
    """Versions of python and the libraries that decide the adapter's numbers and format."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware(device: str, threads: int) -> dict[str, Any]:
    """What the attempt ran on."""
    info: dict[str, Any] = {
        "device": device,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "gpu": None,
        "gpu_count": 0,
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _device_of(output: TrainOutput) -> str:
    device = output.resolved.get("device")
    if isinstance(device, str):
        return device.split(":")[0]
    import torch  # the trainer did not say: it used what the node has

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_sidecar(
    spec: AnyJobSpec,
    ctx: WorkerContext,
    *,
    adapter_dir: Path,
    model_dir: Path,
    data_path: Path,
    output: TrainOutput,
    timings: dict[str, float | None],
) -> dict[str, Any]:
    """The sidecar dict for an adapter folder whose files (model card included) are written."""
    spec_dict = spec_to_dict(spec)
    for key in _URI_FIELDS:
        if isinstance(spec_dict.get(key), str):
            spec_dict[key] = redact_uri(spec_dict[key])
    return {
        "format": FORMAT,
        "job_id": ctx.job_id,
        "name": spec.name,
        "kind": spec.kind,
        "attempt": ctx.attempt,
        "spec": spec_dict,
        "seed": spec.training.seed,
        "base_model": redact_uri(spec.base_model),
        "base_model_sha256": tree_digest(
            model_dir, hash_cache=hash_cache_for(ctx.cache_dir, model_dir)
        ),
        "dataset": redact_uri(spec.dataset),
        "dataset_sha256": tree_digest(
            data_path, hash_cache=hash_cache_for(ctx.cache_dir, data_path)
        ),
        "resolved": output.resolved,
        # How the frozen base was quantized while training (None: it was not); the adapter
        # itself is fp32 and loads on the unquantized base.
        "base_quantization": _base_quantization(spec),
        "versions": library_versions(),
        "hardware": hardware(_device_of(output), ctx.threads),
        "node": ctx.node or platform.node(),
        "metrics": output.metrics,
        "timings": timings,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": file_manifest(adapter_dir, exclude=(SIDECAR,)),
        # What `lorajobs reproduce` compares: files whose bytes the same spec, data, base model
        # and thread count always reproduce (the kohya file carries timestamps: not these).
        "deterministic_files": sorted(output.deterministic),
        # Text: whether vLLM can serve it as a LoRA (else: export --merge), `worker.serving`.
        "serving": serving_of(adapter_dir) if spec.kind == "text" else None,
        "extra": ctx.extra,
    }


def _base_quantization(spec: AnyJobSpec) -> dict[str, Any] | None:
    return base_quantization(getattr(spec.training, "quantize_base", None))


def model_card(spec: AnyJobSpec, output: TrainOutput, serving: dict[str, Any] | None = None) -> str:
    """README.md: what the adapter is, how it was trained, how it did, how to load it (and,
    for a text adapter, how to serve it).

    Built from the spec and the trainer's figures only (no times), so it repeats with the run.
    """
    lines = _card_intro(spec, output)
    lines += _card_training(spec, output.resolved)
    lines += _card_results(output.metrics)
    lines += ["## Files", ""]
    for name in output.files:
        lines.append(f"- `{name}`")
    lines += [f"- `{SIDECAR}`: the full record (spec, hashes, versions, hardware, metrics)", ""]
    lines += _card_loading(spec, output.resolved)
    if serving is not None:
        lines += ["", *card_lines(serving, spec.name)]
    return "\n".join(lines) + "\n"


_CARD_SETTINGS = (
    "rank", "alpha", "dropout", "use_dora", "use_rslora", "steps", "epochs", "batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "warmup_steps",
    "weight_decay", "max_grad_norm", "optimizer", "mixed_precision", "gradient_checkpointing",
    "quantize_base", "resolution", "max_seq_length", "prediction_type", "seed", "device", "threads",
)  # fmt: skip


def _card_intro(spec: AnyJobSpec, output: TrainOutput) -> list[str]:
    """Front matter (library, tags, base model, trigger), title, one paragraph, pictures."""
    steps = output.metrics.get("steps", spec.training.steps)
    library = "peft" if spec.kind == "text" else "diffusers"
    lines = ["---", f"library_name: {library}", "tags:", "- lora", "- lorajobs"]
    if spec.kind == "image":
        lines.append("- text-to-image")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec.base_model):  # a hub id: the hub links it
        lines.append(f"base_model: {spec.base_model}")
    trigger = output.resolved.get("trigger_phrase")
    if trigger:
        lines.append(f"instance_prompt: {json.dumps(trigger)}")
    lines += [
        "---",
        "",
        f"# {spec.name}",
        "",
        f"A {spec.kind} LoRA (rank {spec.lora.rank}, alpha {spec.lora.alpha:g}) trained by "
        f"lorajobs on `{redact_uri(spec.dataset)}` for {steps} steps "
        f"(seed {spec.training.seed}).",
        "",
    ]
    if trigger:
        lines += [f"Trigger phrase: `{trigger}`", ""]
    if "loss.png" in output.files:
        lines += ["![training loss](loss.png)", ""]
    if "samples.png" in output.files:  # validation prompts rendered with the final adapter
        lines += ["![validation samples](samples.png)", ""]
    return lines


def _card_training(spec: AnyJobSpec, resolved: dict[str, Any]) -> list[str]:
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    lines.append(f"| base model | `{redact_uri(spec.base_model)}` |")
    # The trainer's own list where it resolved one (Flux's defaults differ from SD's).
    targets = resolved.get("target_modules") or spec.target_modules()
    lines.append(f"| target modules | {', '.join(targets)} |")
    lines += [f"| {key} | {resolved[key]} |" for key in _CARD_SETTINGS if key in resolved]
    return [*lines, ""]


def _card_results(m: dict[str, Any]) -> list[str]:
    results = [f"- First loss: {m['first_loss']:.4f}"] if "first_loss" in m else []
    if "final_loss" in m:
        results.append(f"- Final loss: {m['final_loss']:.4f}")
    for key, label in (
        ("images", "Training images"),
        ("examples", "Training examples"),
        ("tokens", "Tokens seen"),
    ):
        if key in m:
            results.append(f"- {label}: {m[key]}")
    return ["## Results", "", *results, ""] if results else []


def _card_loading(spec: AnyJobSpec, resolved: dict[str, Any]) -> list[str]:
    """How to load it: PEFT or diffusers code, and the kohya file for the UIs."""
    base = redact_uri(spec.base_model)
    # from_pretrained reads a hub id or a local path, not a bucket URI: point at a local copy.
    local_base = base if "://" not in base else "path/to/base-model"
    copy_note = [] if local_base == base else [f"# path/to/base-model: a local copy of {base}"]
    lines = ["## Load it", ""]
    quant = resolved.get("quantize_base")
    if quant:
        lines += [
            f"Trained on a base quantized to {quant} (QLoRA); the adapter itself is unquantized "
            "and loads on the full-precision base as below, or on the same quantized base.",
            "",
        ]
    if spec.kind == "text":
        return lines + [
            "```python",
            "from transformers import AutoModelForCausalLM",
            "from peft import PeftModel",
            "",
            *copy_note,
            f'base = AutoModelForCausalLM.from_pretrained("{local_base}")',
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
            "```",
            "",
            "A merged full model: `lorajobs export <job or this folder> --merge -o merged/`.",
        ]
    lines += [
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        *copy_note,
        f'pipe = DiffusionPipeline.from_pretrained("{local_base}")',
        'pipe.load_lora_weights("path/to/this/folder", '
        'weight_name="pytorch_lora_weights.safetensors")',
        "```",
    ]
    kohya = resolved.get("kohya_file")
    if kohya:
        lines += [
            "",
            f"A1111 / Forge / ComfyUI: copy `{kohya}` (kohya format, `ss_*` metadata) into "
            "the LoRA models folder.",
        ]
    return lines


def write_metadata(
    spec: AnyJobSpec,
    ctx: WorkerContext,
    *,
    adapter_dir: Path,
    model_dir: Path,
    data_path: Path,
    output: TrainOutput,
    timings: dict[str, float | None],
) -> dict[str, Any]:
    """Write README.md then lorajobs.json into `adapter_dir`; return the sidecar dict.

    The card goes first so the sidecar's `files` covers it.
    """
    serving = serving_of(adapter_dir) if spec.kind == "text" else None
    (adapter_dir / MODEL_CARD).write_text(model_card(spec, output, serving), encoding="utf-8")
    sidecar = build_sidecar(
        spec,
        ctx,
        adapter_dir=adapter_dir,
        model_dir=model_dir,
        data_path=data_path,
        output=output,
        timings=timings,
    )
    (adapter_dir / SIDECAR).write_text(canonical_json(sidecar), encoding="utf-8")
    return sidecar
