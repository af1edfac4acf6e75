"""The realign flow's parameters as one documented schema: the config file, the CLI flags and the deployment
parameters are all this model (tests check that it equals the flow's signature, name for name and default for default).

`lancet config` prints it with every field's documentation; `lancet realign --config run.yaml` validates a YAML file
against it; the same file's contents work as a deployment's `parameters:`. Imports no torch, prefect or mlflow, so a
bad config is refused in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lancet_core.correct.config import PairConfig, TrainConfig
from lancet_core.correct.repair import RepairConfig
from lancet_core.data.tokenize import TokenizeConfig
from lancet_core.demo.config import DemoConfig
from lancet_core.errors import LancetError
from lancet_core.evaluate.config import EvalConfig
from lancet_core.evaluate.gate import GateConfig
from lancet_core.index.config import IndexConfig
from lancet_core.recall.influence import RecallConfig
from lancet_core.recall.judges import JudgeConfig
from lancet_core.recall.undesirable import GenerationConfig

# the tokenize limit the flow starts from; raised automatically to what the corpus needs (flows/inputs.py)
DEFAULT_TOKENIZE = TokenizeConfig(max_seq_len_tokens=128)
CANONICAL_COLUMNS = ("prompt", "response", "messages", "example_id")
_RAY_ADDRESS = re.compile(r"^(auto|ray://[A-Za-z0-9._-]+(:\d{1,5})?|[A-Za-z0-9._-]+:\d{1,5})$")


def runner_problem(runner: str | None, ray_address: str | None) -> str | None:
    """Why a runner / Ray address pair cannot be used (None when it can)."""
    if runner not in (None, "local", "ray"):
        return f"runner must be 'local' or 'ray', got {runner!r}"
    if ray_address is not None:
        if runner != "ray":
            return "ray_address is only used with runner 'ray'"
        if not _RAY_ADDRESS.match(ray_address):
            return f"ray_address {ray_address!r}: expected 'auto', 'ray://host:port' or 'host:port'"
    return None


class ConfigError(LancetError):
    """A config file or parameter set that does not fit the schema (one line, naming the file and the field)."""


class RealignParams(BaseModel):
    """Parameters of the `realign` flow. Leave the five paths empty to run on the built-in demo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus_path: str | None = Field(None, description="training corpus: .jsonl/.json/.parquet/.csv or a saved HF "
                                    "dataset directory, with prompt+response or messages columns (default: the demo's)")
    model: str | None = Field(None, description="the model to correct: a local HF directory or an MLflow models:/ "
                              "URI (default: the demo's impure model)")
    probes_path: str | None = Field(None, description="prompts the model should not answer badly (prompt column); "
                                    "its flagged answers are the influence queries")
    ood_path: str | None = Field(None, description="held-out harmful prompts for evaluation (optional)")
    benign_eval_path: str | None = Field(None, description="benign prompts with reference answers (prompt, "
                                         "response): over-refusal and utility (NLL)")
    work_dir: str = Field(".lancet", description="artifact root (content-addressed, cached)")
    registered_model_name: str = Field("lancet-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                                       description="MLflow registered model name of the corrected model")
    start_from_champion: bool = Field(False, description="start from the registry's `champion` instead of `model` "
                                      "(scheduled re-alignment); False = correct exactly `model`")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                     "sqlite:///./mlflow.db)")
    experiment: str = Field("lancet", description="MLflow experiment name")
    columns: dict[str, str] | None = Field(None, description="column mapping for the corpus and eval "
                                    "files, lancet's name -> the file's name, e.g. {response: reference}")
    demo: DemoConfig = Field(DemoConfig(), description="the built-in demo (used when a path above is empty)")
    tokenize_config: TokenizeConfig = Field(DEFAULT_TOKENIZE, description="chat template + loss mask; "
                                            "max_seq_len_tokens is raised to the longest row when needed")
    index: IndexConfig = Field(IndexConfig(), description="projected-gradient store and curvature")
    runner: Literal["local", "ray"] = Field("local", description="where the gradient store's shards are computed: "
                                            "'local' (this process, one shard at a time) or 'ray' (one Prefect task "
                                            "per shard on a Ray cluster, one GPU each when the cluster has GPUs)")
    ray_address: str | None = Field(None, description="runner 'ray': the cluster, 'auto' (the one this machine "
                                    "belongs to), 'ray://host:10001' or 'host:port'; null = start a local one")
    judge: JudgeConfig = Field(JudgeConfig(), description="what counts as an undesirable answer")
    generation: GenerationConfig = Field(GenerationConfig(), description="decoding of the probe answers")
    recall: RecallConfig = Field(RecallConfig(), description="influence method and ranking")
    repair: RepairConfig = Field(RepairConfig(), description="the repaired corpus: which top-influence rows it leaves "
                                 "out (so the next fine-tune does not relearn them)")
    pairs: PairConfig = Field(PairConfig(), description="IBO pairs from the influence ranking")
    train: TrainConfig = Field(TrainConfig(), description="post-training (IBO by default, LoRA)")
    evaluation: EvalConfig = Field(EvalConfig(), description="before/after evaluation")
    gate: GateConfig = Field(GateConfig(), description="when the corrected model becomes `champion`")

    @model_validator(mode="after")
    def _check_runner(self) -> RealignParams:
        problem = runner_problem(self.runner, self.ray_address)
        if problem:
            raise ValueError(problem)
        return self

    def flow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `flows.realign.realign` (config objects kept as objects)."""
        return {name: getattr(self, name) for name in type(self).model_fields}


def _one_line(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {loc}: {first['msg']}{more}"


def parse_params(data: dict[str, Any], where: str) -> RealignParams:
    """Validate a parameter dict (from a file, flags or a deployment); ConfigError names `where` and the field."""
    try:
        return RealignParams.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, where)) from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file; ConfigError when missing, unparsable or not a mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"--config {p}: {at}not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of parameter names, got {type(data).__name__}")
    return data


def parse_columns(items: list[str]) -> dict[str, str]:
    """`--column response=reference` (repeatable) -> {'response': 'reference'}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ConfigError(f"--column {item!r}: expected NAME=FILE_COLUMN, e.g. response=reference")
        if name.strip() not in CANONICAL_COLUMNS:
            raise ConfigError(f"--column {item!r}: NAME must be one of {', '.join(CANONICAL_COLUMNS)}")
        out[name.strip()] = source.strip()
    return out


def _field_doc(instance: BaseModel, indent: int) -> list[str]:
    """YAML lines for a model instance's fields: `name: value  # description`, nested configs indented."""
    import json

    lines = []
    pad = " " * indent
    for name, f in type(instance).model_fields.items():
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:  # {f.description or ''}".rstrip())
            lines += _field_doc(value, indent + 2)
            continue
        text = json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)
        lines.append(f"{pad}{name}: {text}  # {f.description or ''}".rstrip())
    return lines


def defaults_yaml() -> str:
    """Every parameter with its default and documentation, as a YAML file a user can edit and pass to --config."""
    head = ["# lancet realign parameters (lancet realign --config FILE; the same keys are the deployment's parameters)",
            "# Leave the paths null to run on the built-in demo. Delete what you do not change."]
    return "\n".join(head + _field_doc(RealignParams(), 0)) + "\n"
