"""One configuration object for the whole product.

Precedence: environment variable ``HONE_<FIELD>`` > TOML file > default.
The TOML file is ``$HONE_CONFIG`` if set, else ``$HONE_HOME/hone.toml`` if it exists.
Everything stateful lives under ``home`` (``$HONE_HOME``, default ``~/.hone``).

Every field, its default and its meaning is listed in docs/configuration.md; keep the two in step
(tests/test_config.py checks that every field is documented).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"


class ConfigError(ValueError):
    """A setting could not be read. The message names the setting and where it came from."""


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path.home() / ".hone")

    # HTTP server
    host: str = "127.0.0.1"
    port: int = 8080
    api_tokens: dict[str, str] = field(default_factory=dict)  # caller name -> bearer token
    admin_token: str | None = None
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 300.0

    # Model and engine
    model: Path | None = None  # HF model dir; None = the embedded SmolLM2, prepared under home
    served_model_name: str = "hone-base"
    vllm_url: str | None = None  # use an external vLLM instead of starting one
    vllm_port: int = 0  # 0 = pick a free port on 127.0.0.1
    vllm_dtype: str = "auto"  # auto: bfloat16 on a GPU or a CPU with native bf16, else float32 (engine.py)
    vllm_kv_cache_gb: int = 2
    vllm_max_model_len: int = 4096
    vllm_max_lora_rank: int = 16
    vllm_max_loras: int = 2
    vllm_extra_args: str = ""
    vllm_cpu_reserved_cores: str = "auto"  # auto: none on a host of <= 2 cores, else vLLM's default (engine.py)
    vllm_block_size: str = "auto"  # KV block size = prefix-cache granularity; auto: 32 on a CPU, else vLLM's (engine.py)
    vllm_grouped_lora: bool = True  # CPU: one LoRA matmul per adapter, not per token (runtime/vllm_lora_cpu.py)
    vllm_startup_timeout_s: float = 600.0

    # Agent
    max_steps: int = 6
    max_tokens: int = 256
    temperature: float = 0.0

    # Tools
    python_cpu_s: float = 5.0
    python_wall_s: float = 10.0
    python_memory_mb: int = 512
    python_output_bytes: int = 16_384
    storage_max_key_chars: int = 256
    storage_max_value_bytes: int = 65_536
    storage_max_keys: int = 1_000
    # A run records its namespace's contents at start when they fit in this many bytes, so the
    # learner can re-run it from the same state (a recall turn needs what an earlier turn stored).
    storage_snapshot_max_bytes: int = 4096

    # Learner: triggers (a cycle starts on whichever comes first, or on demand)
    learner_enabled: bool = True  # `hone serve` starts the learner process
    learner_min_new_labels: int = 50  # labelled serving runs since the last cycle; 0 = off
    learner_interval_s: float = 3600.0  # seconds since the last cycle; 0 = off
    learner_poll_s: float = 10.0
    learner_threads: int = 0  # torch threads for training; 0 = half the cores (serving keeps the rest)
    # Learner: data
    val_fraction: float = 0.2  # share of tasks held out for the gate, never trained on
    pairs_per_task: int = 1  # more let a few tasks' habits dominate a cycle (docs/benchmarks.md)
    max_pairs: int = 64  # newest pairs trained per cycle
    min_pairs: int = 2  # fewer: the cycle is skipped
    # A run whose next prompt re-rendered the end of the previous step's output as other tokens (same
    # text): trim = train on it up to that point (exact: docs/learner.md), exclude = leave it out.
    pairs_on_drift: str = "trim"  # trim | exclude
    # Keep "a over b" calculator-operation pairs only as often as "b over a": a few dozen pairs otherwise
    # teach their net operator direction as a rule for every question (learner/pairs.py).
    pairs_balance_operations: bool = True
    explore_attempts: int = 4  # sampled re-runs of a task that lacks contrast
    explore_budget: int = 256  # rollouts per cycle: most of a cycle's pairs come from exploration
    explore_temperature: float = 0.7
    explore_concurrency: int = 8
    # After free sampling, try numerically checked tasks once per calculator operation (the first call
    # may only be `a op b`): those never solved, and the other operations on those solved
    # (learner/explore.py). Off until a loop run measures it.
    explore_operator_trials: bool = False
    explore_trial_budget: int = 256  # trial rollouts per cycle, on top of explore_budget
    # Learner: DPO and LoRA
    dpo_beta: float = 0.1
    dpo_lr: float = 1e-4
    dpo_epochs: int = 2
    dpo_batch_size: int = 4
    dpo_max_length: int = 2048
    dpo_nll_weight: float = 1.0  # RPO's NLL on the chosen run: DPO alone barely moved self-generated pairs
    # The KL anchor: the base model every cycle, or the parent (what serves, where the policy starts),
    # as iterative DPO does (Xu et al. 2023; Pang et al. 2024). Measured: docs/benchmarks.md.
    dpo_reference: str = "base"  # base | parent
    # Keep what serves now likely on the tools no pair of the cycle uses (learner/retain.py): + weight *
    # the NLL of up to dpo_retain_runs of its served runs that called only such tools. 0 = off.
    dpo_retain_weight: float = 0.0
    dpo_retain_runs: int = 32
    dpo_autocast: str = "auto"  # auto (bf16 where the CPU has native bf16) | bf16 | fp32
    dpo_device: str = "auto"  # auto (cuda when torch sees a GPU, else cpu) | cpu | cuda
    dpo_gradient_checkpointing: bool = False  # recompute activations: far less memory, ~30% slower
    dpo_forward_tokens: int = 4096  # most token positions one forward runs: a batch's pairs share forwards up to it
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    train_seed: int = 0
    # Learner: gate and swap
    gate_tasks: int = 32  # validation tasks run per side (candidate, current)
    gate_margin: float = 0.0  # promote if candidate rate >= current rate + margin
    gate_max_p: float = 0.25  # promote only if also McNemar p <= this (1.0 = off): no promotion on noise
    gate_candidates: int = 1  # adapters gated per cycle: the last N epochs'; the best one may be promoted
    gate_tasks_file: Path | None = None  # extra held-out tasks (JSONL: id, question, answer)
    # Tasks of other kinds (say, storage) the candidate must not solve fewer of than what serves now:
    # training on arithmetic traffic alone can cost the other tools (docs/benchmarks.md, run 21).
    gate_guard_file: Path | None = None
    # With a guard: run it even when the gate's p alone is too high, and decide gate_max_p on the gate's
    # and the guard's tasks pooled in one McNemar test (each kind still may not lose). An arithmetic-only
    # gate turned away candidates that gained on storage at p = 0.0007 (docs/benchmarks.md, run 25).
    gate_pool_guard: bool = False
    gate_reuse: bool = True  # reuse what serves now's recorded per-task gate results instead of re-running it
    swap_tolerance: float = 0.1  # max mean |vLLM - local| probe log-prob (nats) to accept a swap
    keep_adapters: int = 2  # adapters kept loaded in vLLM: the active one and its rollback target

    log_level: str = "info"

    # ---- derived locations (not settings) ----
    @property
    def db_path(self) -> Path:
        return self.home / "hone.db"

    @property
    def checkpoints_path(self) -> Path:
        return self.home / "checkpoints.db"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        """Caches, sockets and temp files of the engine: vLLM would otherwise use ~/.cache and /tmp."""
        return self.home / "run"

    @property
    def model_path(self) -> Path:
        return self.model if self.model is not None else self.models_dir / DEFAULT_MODEL_DIRNAME

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.lora_targets.split(",") if m.strip())

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens) or self.admin_token is not None

    def ensure_dirs(self) -> None:
        for d in (self.home, self.models_dir, self.adapters_dir, self.logs_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)

    def replace(self, **changes: typing.Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, env: typing.Mapping[str, str] | None = None, **overrides: typing.Any) -> Settings:
        """Read settings from the environment and the TOML file; ``overrides`` win over both."""
        env = os.environ if env is None else env
        home = Path(env.get("HONE_HOME") or overrides.get("home") or Path.home() / ".hone").expanduser()
        raw: dict[str, tuple[typing.Any, str]] = {}
        toml_path = Path(env["HONE_CONFIG"]).expanduser() if env.get("HONE_CONFIG") else home / "hone.toml"
        if env.get("HONE_CONFIG") and not toml_path.is_file():
            raise ConfigError(f"HONE_CONFIG points to {toml_path}, which is not a file")
        if toml_path.is_file():
            try:
                data = tomllib.loads(toml_path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{toml_path}: invalid TOML: {e}") from None
            data = data.get("hone", data)  # allow either a [hone] table or top-level keys
            if "home" in data:  # the file may live in a home; and `hone bench loop` must keep its own
                raise ConfigError(f"{toml_path}: 'home' cannot be set in a config file; set HONE_HOME")
            for k, v in data.items():
                raw[k] = (v, f"{toml_path} key {k!r}")
        for f in dataclasses.fields(cls):
            name = "HONE_" + f.name.upper()
            if name in env and f.name != "home":
                raw[f.name] = (env[name], f"environment variable {name}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            src = raw[unknown[0]][1]
            raise ConfigError(f"unknown setting {unknown[0]!r} ({src}); known settings: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        values: dict[str, typing.Any] = {"home": home}
        for name, (value, src) in raw.items():
            values[name] = _coerce(hints[name], value, name, src)
        values.update(overrides)
        values["home"] = Path(values["home"]).expanduser()
        settings = cls(**values)
        try:
            settings.validate()
        except ConfigError as e:  # name where an out-of-range value came from, as type errors do
            named = [src for name, (_, src) in raw.items() if re.search(rf"\b{name}\b", str(e))]
            raise ConfigError(f"{e} (set by {' and '.join(named)})" if named else str(e)) from None
        return settings

    def validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")

        for name in (
            "port", "max_body_bytes", "request_timeout_s", "vllm_kv_cache_gb",
            "vllm_max_model_len", "vllm_max_lora_rank", "vllm_max_loras", "vllm_startup_timeout_s",
            "max_steps", "max_tokens", "python_cpu_s", "python_wall_s", "python_memory_mb",
            "python_output_bytes", "storage_max_key_chars", "storage_max_value_bytes", "storage_max_keys",
            "learner_poll_s", "pairs_per_task", "max_pairs", "min_pairs", "explore_concurrency", "dpo_beta",
            "dpo_lr", "dpo_epochs", "gate_candidates", "dpo_batch_size", "dpo_max_length", "dpo_forward_tokens", "lora_rank", "lora_alpha",
            "gate_tasks",
            "swap_tolerance", "keep_adapters",
        ):
            positive(name)
        for name in ("learner_min_new_labels", "learner_interval_s", "learner_threads", "explore_attempts",
                     "explore_budget", "explore_trial_budget", "dpo_nll_weight", "dpo_retain_weight",
                     "dpo_retain_runs", "storage_snapshot_max_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.vllm_cpu_reserved_cores != "auto" and not self.vllm_cpu_reserved_cores.isdigit():
            raise ConfigError("vllm_cpu_reserved_cores must be 'auto' or a whole number of cores,"
                              f" got {self.vllm_cpu_reserved_cores!r}")
        if self.vllm_block_size != "auto" and not (self.vllm_block_size.isdigit() and int(self.vllm_block_size) > 0):
            raise ConfigError(f"vllm_block_size must be 'auto' or a whole number of tokens > 0, got {self.vllm_block_size!r}")
        if not -1.0 <= self.gate_margin <= 1.0:
            raise ConfigError(f"gate_margin must be in [-1, 1], got {self.gate_margin}")
        if not 0.0 < self.gate_max_p <= 1.0:
            raise ConfigError(f"gate_max_p must be in (0, 1], got {self.gate_max_p}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 < self.explore_temperature <= 2.0:
            raise ConfigError(f"explore_temperature must be in (0, 2], got {self.explore_temperature}")
        if self.lora_rank > self.vllm_max_lora_rank:
            raise ConfigError(f"lora_rank ({self.lora_rank}) exceeds vllm_max_lora_rank ({self.vllm_max_lora_rank}):"
                              " vLLM could not load the adapters")
        if not self.target_modules:
            raise ConfigError("lora_targets must name at least one module, e.g. q_proj,v_proj")
        if self.gate_candidates > self.dpo_epochs:
            raise ConfigError(f"gate_candidates ({self.gate_candidates}) exceeds dpo_epochs ({self.dpo_epochs}):"
                              " a cycle saves one adapter per epoch to gate")
        if self.keep_adapters > self.vllm_max_loras:
            raise ConfigError(f"keep_adapters ({self.keep_adapters}) exceeds vllm_max_loras ({self.vllm_max_loras})")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in [1, 65535], got {self.port}")
        if self.dpo_autocast not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"dpo_autocast must be auto, bf16 or fp32, got {self.dpo_autocast!r}")
        if self.pairs_on_drift not in ("trim", "exclude"):
            raise ConfigError(f"pairs_on_drift must be trim or exclude, got {self.pairs_on_drift!r}")
        if self.dpo_reference not in ("base", "parent"):
            raise ConfigError(f"dpo_reference must be base or parent, got {self.dpo_reference!r}")
        if self.dpo_device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"dpo_device must be auto, cpu or cuda, got {self.dpo_device!r}")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(f"log_level must be critical, error, warning, info or debug, got {self.log_level!r}")
        reserved = {"local", "admin", "cli"} & set(self.api_tokens)
        if reserved:
            raise ConfigError(f"api_tokens: caller name {sorted(reserved)[0]!r} is reserved; pick another name")
        if not 0 <= self.vllm_port < 65536:
            raise ConfigError(f"vllm_port must be in [0, 65535], got {self.vllm_port}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"temperature must be in [0, 2], got {self.temperature}")
        tokens = list(self.api_tokens.values()) + ([self.admin_token] if self.admin_token else [])
        if len(tokens) != len(set(tokens)):
            raise ConfigError("api_tokens and admin_token must all be different")
        if any(len(t) < 8 for t in tokens):
            raise ConfigError("every token must be at least 8 characters")


def _coerce(hint: typing.Any, value: typing.Any, name: str, src: str) -> typing.Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        return _coerce(inner, value, name, src)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true/false, got {value!r}")
        if hint in (int, float):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return hint(value)
        if hint is Path:
            return Path(str(value)).expanduser()
        if hint is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(f"expected a string, got {value!r}")
            return str(value)
        if origin is dict:
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
            # "alice:token1,bob:token2"
            out: dict[str, str] = {}
            for part in str(value).split(","):
                part = part.strip()
                if not part:
                    continue
                caller, sep, token = part.partition(":")
                if not sep or not caller.strip() or not token.strip():
                    raise ValueError("expected name:token pairs separated by commas")
                out[caller.strip()] = token.strip()
            return out
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} ({src}): {e}") from None
    raise ConfigError(f"{name} ({src}): unsupported type {hint}")
