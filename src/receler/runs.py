"""Finished protocol runs read back: the settings a ``results.json`` was measured with."""

from __future__ import annotations

import json
from pathlib import Path

from .attack import AttackConfig
from .protocol import PromptSets, ProtocolConfig


def read_results(run: str | Path) -> dict:
    """``RUN/results.json`` of a finished ``receler protocol`` run, with a one-line error."""
    path = Path(run) / "results.json"
    if not path.is_file():
        raise ValueError(f"{run} holds no results.json: pass the folder of a finished "
                         "`receler protocol` run")
    return json.loads(path.read_text())


def training_passes(results: dict) -> int | None:
    """UNet forward and backward passes of the training a finished run measured (both
    stages of an exported run; 0 for a closed-form edit); ``None`` when none was recorded
    (a model made elsewhere)."""
    train = results.get("train") or {}
    return train["unet_forward"] + train["unet_backward"] if "unet_forward" in train else None


def protocol_config(results: dict, run: str | Path | None = None) -> ProtocolConfig:
    """The :class:`ProtocolConfig` whose prompts, counts, detector, attack, sampler steps and
    candidate a finished run used: a model made elsewhere (``--erasers``, ``--unet``,
    ``--text-encoder``, ``--lora``) and an export's settings, so that what is measured again
    is the model the run measured (an exported run's merged UNet, not the erasers it was
    merged from). Its training settings are not needed to measure it again. ``run`` is the
    run's folder now, if it moved since."""
    from .merge import MergeConfig, recorded_settings

    c = results["config"]
    prompts = c.get("prompts")
    export = c.get("export")
    return ProtocolConfig(
        concept=results["concept"], out=Path(run if run is not None else c["out"]), model=c["model"],
        method=results["method"], detector=c["detector"], per_class=c["per_class"],
        concept_rows=c["concept_rows"], attack_images=c["attack_images"],
        attack_prompts=c["attack_prompts"], attack_prompt=c["attack_prompt"],
        device=c.get("device"), dtype=c.get("dtype"), attack=AttackConfig(**c["attack"]),
        prompts=PromptSets(**{k: Path(v) if v else None for k, v in prompts.items()})
        if prompts else None,
        base_dir=Path(c["base_dir"]) if c.get("base_dir") else None,
        erasers=Path(c["erasers"]) if c.get("erasers") else None, unet=c.get("unet"),
        text_encoder=c.get("text_encoder"), lora=Path(c["lora"]) if c.get("lora") else None,
        name=c.get("name"), sample_steps=c.get("sample_steps"),
        export=MergeConfig.from_options(recorded_settings(export)) if export else None)
