"""Render deploy/kubernetes without a cluster or the kustomize binary.

Only the part of Kustomize those manifests use, with Kustomize's meaning: ``resources``
(files and directories with their own ``kustomization.yaml``), ``namespace``, ``images``
(``newName``, ``newTag``, ``digest`` on the containers of pod templates) and ``patches``
whose file or inline text is a JSON 6902 patch (applied with ``jsonpatch``) on the
resources its ``target`` selects. Anything else in a kustomization is refused, so a
manifest change this renderer cannot honour fails the checks instead of being skipped.
Where ``kubectl`` is installed, tests/test_kubernetes.py compares this output with
``kubectl kustomize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonpatch
import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}


class KustomizeError(ValueError):
    """A kustomization this renderer does not support, or a patch that does not apply."""


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _group_version(obj: dict[str, Any]) -> tuple[str, str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    return group, version


def _selected(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, version = _group_version(obj)
    wanted = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
    }
    unknown = set(target) - set(wanted)
    if unknown:
        raise KustomizeError(f"patch target fields not supported: {sorted(unknown)}")
    return all(wanted[key] == value for key, value in target.items())


def _containers(node: Any) -> list[dict[str, Any]]:
    """Every container of every pod template in ``node`` (Kustomize's image field specs)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += [c for c in value if isinstance(c, dict)]
            else:
                found += _containers(value)
    elif isinstance(node, list):
        for value in node:
            found += _containers(value)
    return found


def _set_image(container: dict[str, Any], rule: dict[str, Any]) -> None:
    image = container.get("image", "")
    name, digest = image.split("@", 1) if "@" in image else (image, None)
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    if name != rule["name"]:
        return
    name = rule.get("newName", name)
    if "digest" in rule:
        container["image"] = f"{name}@{rule['digest']}"
        return
    tag = rule.get("newTag", tag)
    suffix = f":{tag}" if tag else ""
    container["image"] = f"{name}{suffix}" + (f"@{digest}" if digest and not tag else "")


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build directory`` would print (in resource order)."""
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED
    if unsupported:
        raise KustomizeError(f"{directory}: fields not supported: {sorted(unsupported)}")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else _load_all(path)
    for patch in kustomization.get("patches", []):
        text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise KustomizeError(f"{directory}: only JSON 6902 patches are supported")
        targets = [i for i, obj in enumerate(objects) if _selected(obj, patch["target"])]
        if not targets:
            raise KustomizeError(f"{directory}: patch target {patch['target']} matches nothing")
        for i in targets:
            try:
                objects[i] = jsonpatch.apply_patch(objects[i], ops)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise KustomizeError(f"{directory}: {patch['target']}: {exc}") from exc
    for rule in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj.get("spec")):
                _set_image(container, rule)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects
