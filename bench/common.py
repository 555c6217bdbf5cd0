"""Shared helpers for the benchmark scripts: config composition, machine info, RSS, venvs.

Nothing here imports torch or stackllama at module import time, so a worker running in the
separate TRL virtualenv can import it too.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The TRL venv's workers import this file too, and have no stackllama installed: the working tree's
# copy is importable from here (stackllama.memory itself imports nothing beyond the standard library)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from stackllama.memory import rss_now_mb  # noqa: E402  one reading of VmRSS, shared with the package

BENCH = REPO / "bench"
RESULTS = BENCH / "results"
TRL_VENV = BENCH / ".venv-trl"

# What the TRL 1.12 side runs with: the last TRL with PPOTrainer (trl.experimental.ppo),
# and the same torch/transformers as our venv so the comparison is about the trainers.
TRL_VERSION = "1.12.0"
TORCH_VERSION = "2.13.0"
TRANSFORMERS_VERSION = "5.24.0"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- memory
def rss_breakdown_mb() -> dict[str, float]:
    """VmRSS, RssAnon (heap, tensors) and RssFile (mapped files, e.g. a safetensors file) in MiB."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    """Peak RSS of this process so far (MiB): getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


class RssSampler:
    """Samples VmRSS every ``interval`` s in a daemon thread; max RSS per labelled phase.

    Set ``sampler.phase = "rollout"`` (etc.) as the program moves on; the label sticks
    until the next assignment. Reading /proc/self/status takes microseconds, so sampling
    every 10 ms costs nothing measurable next to a training step.
    """

    def __init__(self, interval: float = 0.01, cycle_start: str = "rollout", track_anon: bool = False):
        import threading

        self.track_anon = track_anon
        self.peak_anon = 0.0
        self.interval = interval
        self.phase = "setup"
        self.peaks: dict[str, float] = {}
        # The allocator keeps freed memory, so after the first cycle every phase reads the
        # high-water mark of the ones before it: ``first_cycle`` holds the first cycle's
        # (first PPO step's) peaks only, which is what each phase itself needs.
        self.first_cycle: dict[str, float] = {}
        self.cycle_start = cycle_start
        self.cycle = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.track_anon:
                anon = rss_breakdown_mb().get("RssAnon", 0.0)
                self.peak_anon = max(self.peak_anon, anon)
            rss = rss_now_mb()
            phase = self.phase
            if rss > self.peaks.get(phase, 0.0):
                self.peaks[phase] = rss
            if self.cycle <= 1 and rss > self.first_cycle.get(phase, 0.0):
                self.first_cycle[phase] = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def wrap(self, fn, phase_of):
        """``fn`` that first sets the phase to ``phase_of(*args, **kwargs)`` (None: leave it)."""

        def wrapper(*args, **kwargs):
            name = phase_of(*args, **kwargs)
            if name:
                if name == self.cycle_start and self.phase != name:
                    self.cycle += 1
                self.phase = name
            return fn(*args, **kwargs)

        return wrapper


def malloc_trim_rss() -> float:
    """glibc ``malloc_trim(0)`` (hand freed heap pages back to the OS), then the RSS (MiB).

    Loading a model allocates and frees large buffers (e.g. float32 tensors before int8
    quantization); glibc keeps much of that as free heap, which RSS still counts. Trimming
    shows what the loaded model itself holds. No-op where glibc is absent.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_now_mb()


# ---------------------------------------------------------------------------- config
def compose(overrides: list[str]):
    """The app's config exactly as the CLI composes it (as tests/conftest.py compose_cfg)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    sys.path.insert(0, str(REPO))
    from stackllama.config import register_configs
    from stackllama.train import config_dir

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return hydra_compose(config_name="config", overrides=["logger=none", *overrides])


# ---------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id() -> str:
    """The CPU model name with its family and model numbers: two machines can share a name
    ("AMD EPYC" for both a Zen 3 and a Zen 5 here) yet not their speed or instruction sets."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "cpu family" in fields and "model" in fields:
        return f"{cpu_model()} (family {fields['cpu family']}, model {fields['model']})"
    return cpu_model()


def describe_cpu(machine: dict[str, Any]) -> str:
    """A results JSON's machine as the table names it: ``cpu_id`` where recorded (older JSONs:
    the model name only)."""
    return machine.get("cpu_id") or machine.get("cpu_model") or "unknown CPU"


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:  # pragma: no cover - no git
        return "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def _cpu_bf16() -> bool | None:
    """avx512_bf16 / amx_bf16 in /proc/cpuinfo (stackllama.precision's test); None where unreadable (TRL venv)."""
    try:
        from stackllama.precision import cpu_has_fast_bf16
    except ImportError:  # stackllama.precision imports torch: present in both venvs, but be safe
        return None
    return bool(cpu_has_fast_bf16())


# Environment variables that cap the instruction set torch's own kernels, MKL and oneDNN dispatch to.
# With "avx2" a CPU that has AVX-512 / AVX512-BF16 / AMX runs the code paths an AVX2-only CPU runs
# (not its clock, cache or memory bandwidth): how ratios measured here are checked for such machines.
CPU_ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def limit_cpu_isa(name: str) -> None:
    """Cap this process's (and its workers') CPU instruction set; call before torch is imported."""
    if name != "native":
        if "torch" in sys.modules:
            raise RuntimeError("limit_cpu_isa must run before torch is imported")
        os.environ.update(CPU_ISA_ENV[name])


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels dispatch to (e.g. AVX512, AVX2)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    import torch

    info = {
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_bf16_instructions": _cpu_bf16(),
        "cpu_capability": cpu_capability(),  # torch's kernel dispatch (capped by --cpu-isa)
        "cpu_isa_env": {k: os.environ[k] for env in CPU_ISA_ENV.values() for k in env if k in os.environ},
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "trl": version("trl"),
        "trl_baseline": TRL_VERSION,
        "peft": version("peft"),
        "bitsandbytes": version("bitsandbytes"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
        "load_average_at_start": load_average(),
    }
    return info


# ---------------------------------------------------------------------------- TRL venv
def trl_python() -> Path:
    """The interpreter of the TRL 1.12 side: $STACKLLAMA_TRL_PYTHON where set (a machine with no
    package registry, as bench/gpu_check.sh sets up from carried wheels), else bench/.venv-trl's."""
    override = os.environ.get("STACKLLAMA_TRL_PYTHON")
    return Path(override) if override else TRL_VENV / "bin" / "python"


def _trl_venv_ok() -> bool:
    py = trl_python()
    if not py.exists():
        return False
    ok = f"m.version('trl') == '{TRL_VERSION}'"
    if not os.environ.get("STACKLLAMA_TRL_PYTHON"):  # an interpreter given there shares the machine's transformers
        ok += f" and m.version('transformers') == '{TRANSFORMERS_VERSION}'"
    probe = f"import importlib.metadata as m, sys; ok = {ok}; import trl.experimental.ppo; sys.exit(0 if ok else 1)"
    return subprocess.run([str(py), "-c", probe], capture_output=True, timeout=300).returncode == 0


def ensure_trl_venv(rebuild: bool = False) -> Path:
    """bench/.venv-trl with trl==1.12.0 (reused when it already has the right versions).

    torch is pinned to the same release as ours; pip picks the local CPU wheel (the
    ``+cpu`` local version sorts above the plain PyPI one, which would pull several GB of
    CUDA libraries) when a find-links/extra index has it.
    """
    if not rebuild and _trl_venv_ok():
        return trl_python()
    if os.environ.get("STACKLLAMA_TRL_PYTHON"):
        raise RuntimeError(f"$STACKLLAMA_TRL_PYTHON={trl_python()} does not import trl=={TRL_VERSION}'s PPOTrainer")
    log(f"creating {TRL_VENV} (trl=={TRL_VERSION}); this takes a few minutes once")
    if rebuild and TRL_VENV.exists():
        import shutil

        shutil.rmtree(TRL_VENV)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(trl_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch first, alone, so the CPU build is the one that satisfies the later requirement.
    cpu_pin = [f"torch=={TORCH_VERSION}+cpu"]
    if subprocess.run(pip + cpu_pin).returncode != 0:
        log(f"no torch=={TORCH_VERSION}+cpu wheel found; trying the CPU index")
        if (
            subprocess.run(
                pip + [f"torch=={TORCH_VERSION}", "--index-url", "https://download.pytorch.org/whl/cpu"]
            ).returncode
            != 0
        ):
            subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(
        pip
        + [
            f"trl=={TRL_VERSION}",
            f"transformers=={TRANSFORMERS_VERSION}",
            "peft",
            "accelerate",
            "datasets",
            f"torch=={TORCH_VERSION}",
        ],
        check=True,
    )
    if not _trl_venv_ok():
        raise RuntimeError(f"{TRL_VENV} was created but does not import trl.experimental.ppo at trl=={TRL_VERSION}")
    return trl_python()


# ---------------------------------------------------------------------------- output
def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":  # python bench/common.py --venv : build/check the TRL venv only
    if "--venv" in sys.argv:
        print(ensure_trl_venv(rebuild="--rebuild" in sys.argv))
