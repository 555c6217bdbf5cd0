"""Checks a job runs before it trains anything: the models it will need exist and are what they claim.

``check(cfg)`` runs in ``stackllama.task.run_task`` right after the settings are validated
(``stackllama.config.validate``) and before any stage starts. It reads config files and
checkpoint headers only, so a typo in a path fails in seconds, not after hours of SFT and
RM training:

* the base model (``model.name_or_path``), when this job may have to build the SFT model:
  where it would be resolved from (``stackllama.models.resolve.locate_model``: a local
  folder, the caches, the hub, or the packaged GGUF, only for the model it is a copy of);
* explicit model folders (``ppo.policy_path``, ``rm.model_path``): a readable config,
  weights and a tokenizer;
* an explicit reward model (``ppo.reward_model_path``): all of that and a score head saved
  in its checkpoint.

Which models a job needs follows the pipeline graph (``stackllama.pipeline.plan`` and
``given_paths``): the same resolution the job itself then runs.
"""

from __future__ import annotations

from typing import Any

from stackllama.config import ConfigError


def _target(cfg: Any) -> str:
    """The pipeline node this job resolves (stage=all ends with the evaluation)."""
    return "eval" if cfg.stage.name == "all" else str(cfg.stage.name)


def _needs_base_model(cfg: Any) -> bool:
    """Whether this job may build the SFT model (and so load the base model)."""
    from stackllama import artifacts
    from stackllama.pipeline import plan

    target = _target(cfg)
    builds_sft = target == "sft" or "sft" in plan(target, cfg)
    return builds_sft and not artifacts.is_trusted(artifacts.stage_dir("sft", cfg))


def _base_model_problem(cfg: Any) -> str | None:
    from stackllama.models.resolve import locate_model

    model = cfg.model
    tiny = model.name_or_path == "tiny"  # built from a config; only its tokenizer is resolved
    if tiny:
        name, key = model.tokenizer or "HuggingFaceTB/SmolLM2-135M-Instruct", "model.tokenizer"
    else:
        name, key = model.name_or_path, "model.name_or_path"
    try:
        locate_model(
            name,
            model.cache_dir,
            model.gguf_package,
            model.gguf_file,
            float(model.hub_timeout),
            model.gguf_source,
            need_weights=not tiny,
        )
    except (FileNotFoundError, ValueError) as exc:
        text = str(exc)
        return text if text.startswith(key) else f"{key}={name}: {text}"
    return None


def check(cfg: Any) -> None:
    """Raise ``ConfigError`` naming each model this job needs that is missing or not a model."""
    from stackllama.models.resolve import check_model_folder, check_reward_model
    from stackllama.pipeline import given_paths

    problems: list[str] = []
    if _needs_base_model(cfg) and (problem := _base_model_problem(cfg)):
        problems.append(problem)
    for key, path in given_paths(_target(cfg), cfg).items():
        try:
            (check_reward_model if key == "ppo.reward_model_path" else check_model_folder)(path, key)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)


__all__ = ["check"]
