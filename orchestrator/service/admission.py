"""What a spec must pass before the server queues it: valid, owned by the caller, and inside
the caller's boundary. Every problem is reported at once, naming its field; nothing is queued
unless there are none."""

from __future__ import annotations

from typing import Any

from lorajobs.jobspecs.failures import SpecError
from lorajobs.orchestrator.capability import unrunnable
from lorajobs.orchestrator.tokens import Principal
from lorajobs.storage.boundaries import PINNED, Boundary, is_hub_id, owner_root


def parse_body(body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(the validated spec, the mapping as sent) of a request body: `{"spec": {...}}` or
    `{"yaml": "..."}`. The mapping tells whether the spec named an owner itself."""
    from lorajobs.jobspecs import parse_spec
    from lorajobs.jobspecs.loader import load_yaml

    if isinstance(body.get("yaml"), str):
        data = load_yaml(body["yaml"], "spec")
    elif "spec" in body:
        data = body["spec"]
    else:
        raise SpecError("request", ['give the spec as {"spec": {...}} or {"yaml": "..."}'])
    spec = parse_spec(data, "spec")  # a mapping from here on: parse_spec refuses anything else
    return spec, data


def admit(
    principal: Principal,
    body: dict[str, Any],
    boundary: Boundary,
    ray_address: str | None = None,
) -> tuple[Any, str]:
    """(the spec as it will be queued, its output URI), or SpecError listing every problem.
    `ray_address`: the deployment's Ray (None: this machine's), to refuse a job that needs a
    CUDA GPU none of its nodes has (`capability.unrunnable`)."""
    spec, raw = parse_body(body)
    named_owner = raw.get("owner")
    problems: list[str] = []
    if (cuda := unrunnable(spec, ray_address)) is not None:
        problems.append(cuda)
    owner = principal.owner
    if named_owner is not None and named_owner != principal.owner:
        if principal.is_admin:
            owner = str(named_owner)
        else:
            problems.append(
                f"owner: {named_owner!r} is not yours: this token submits for {principal.owner!r}"
            )
    try:
        root = owner_root(boundary.bucket, owner)
    except ValueError as err:
        raise SpecError("spec", [f"owner: {err}"]) from None
    spec = spec.model_copy(update={"owner": owner})
    if boundary.hub and is_hub_id(spec.base_model) and not PINNED.search(spec.base_model):
        try:
            spec = spec.model_copy(update={"base_model": pin_hub_id(spec.base_model)})
        except ValueError as err:
            problems.append(f"base_model: {err}")
    output_uri = spec.output or root
    from lorajobs.jobspecs import spec_to_dict

    problems += boundary.problems(owner, spec_to_dict(spec), output_uri)
    if problems:
        raise SpecError("spec", problems)
    return spec, output_uri


def pin_hub_id(ref: str) -> str:
    """`org/name[@branch]` -> `org/name@<commit>`: what the hub resolves it to now, so the job
    trains on the same bytes whenever it runs (and the sidecar records which)."""
    repo, _, revision = ref.partition("@")
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo, revision=revision or None)
    except Exception as err:  # noqa: BLE001 - any failure: the id cannot be pinned
        raise ValueError(f"{ref!r}: cannot be resolved on the hub ({type(err).__name__})") from None
    if not info.sha:
        raise ValueError(f"{ref!r}: the hub gave no commit for it")
    return f"{repo}@{info.sha}"
