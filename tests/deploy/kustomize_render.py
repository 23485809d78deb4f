"""Render a kustomization: with `kustomize build` or `kubectl kustomize` where present,
else with a small merge covering what deploy/k8s uses (resources, labels with selectors,
images, strategic-merge patches keyed by `name`)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import yaml


def render(directory: Path) -> tuple[list[dict], str]:
    """The rendered resources and the renderer's name."""
    for command in (["kustomize", "build"], ["kubectl", "kustomize"]):
        if shutil.which(command[0]):
            result = subprocess.run([*command, str(directory)], capture_output=True,
                                    text=True, timeout=120, check=True)
            return [doc for doc in yaml.safe_load_all(result.stdout) if doc], command[0]
    return merge_render(directory), "test-side merge"


def merge_render(directory: Path) -> list[dict]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources: list[dict] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources += merge_render(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch_entry in spec.get("patches", []):
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        for resource in resources:
            if (resource["kind"], resource["metadata"]["name"]) == (
                    patch["kind"], patch["metadata"]["name"]):
                _merge(resource, patch)
    for label_set in spec.get("labels", []):
        for resource in resources:
            _add_labels(resource, label_set["pairs"], label_set.get("includeSelectors", False))
    for image in spec.get("images", []):
        for resource in resources:
            _set_image(resource, image)
    return resources


def _merge(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif (isinstance(value, list) and isinstance(target.get(key), list)
              and all(isinstance(item, dict) and "name" in item for item in value)):
            by_name = {item["name"]: item for item in target[key]}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    target[key].append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def _add_labels(resource: dict, pairs: dict, selectors: bool) -> None:
    resource["metadata"].setdefault("labels", {}).update(pairs)
    spec = resource.get("spec", {})
    if "template" in spec:
        spec["template"]["metadata"].setdefault("labels", {}).update(pairs)
    if not selectors:
        return
    if resource["kind"] == "Service":
        spec.setdefault("selector", {}).update(pairs)
    elif "selector" in spec:
        spec["selector"].setdefault("matchLabels", {}).update(pairs)


def _set_image(resource: dict, image: dict) -> None:
    pod = resource.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        if container["image"] == image["name"]:
            container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
