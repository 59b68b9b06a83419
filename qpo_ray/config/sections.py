"""The sections of the typed configuration (see qpo_ray.config for how a profile and
`--set` overrides fill them in). Each section checks its own fields in `validate`, next
to their definitions, and raises ConfigError naming the dotted key; `Config.validate`
adds the few checks that span two sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from qpo_ray.config.base import Section, require_all
from qpo_ray.config.features import (MbrConfig, QuerySummaryConfig, RankConfig,
                                     SummaryTrainingConfig, WideStep0Config)

# The backends' names (their registry, qpo_ray.backends.BACKENDS, is checked against this
# by tests/backends): config names them without importing the runtime registry.
BACKEND_NAMES = ("vllm", "transformers", "openai")


@dataclass
class TaskConfig(Section):
    # Registry name of a built-in task (rotten_tomatoes, ag_news, ...) or "byo".
    name: str = "rotten_tomatoes"
    # For name == "byo": path to the task's YAML description (see docs in tasks/byo.py).
    spec_path: Optional[str] = None
    # byo: let the spec's `files` leave its folder (absolute, `..`, symlinks out); off so
    # that a spec from elsewhere reads only the files beside it (docs/safety.md).
    spec_outside_files: bool = False
    # Where the task reads its files; None = the built-in default (package data or the
    # Hugging Face hub through `datasets`).
    data_dir: Optional[str] = None
    # Share of the train split kept as the collection set (queries for Step 0 and
    # augmentation); demonstrations come only from the rest (paper appendix B.2).
    collection_fraction: float = 0.1
    # Cap on the test split used by the test phase (None = all of it).
    max_test_queries: Optional[int] = None
    # Collection queries held out as a dev set, where the test phase chooses loop and
    # decoding (never on test queries); 0 = none: the last loop, test.decoding.
    dev_queries: int = 0
    # Demonstrations per prompt for few-shot; 0 = zero-shot.
    num_shots: int = 0
    # Demonstration sets per (query, prompt) in few-shot (K in eq. 3).
    num_demo_sets: int = 5

    def validate(self) -> None:
        require_all([
            (0 < self.collection_fraction < 1, "task.collection_fraction must be in (0, 1)"),
            (self.num_shots >= 0, "task.num_shots must be >= 0"),
            (self.dev_queries >= 0, "task.dev_queries must be >= 0"),
            (self.num_demo_sets >= 1, "task.num_demo_sets must be >= 1"),
            (self.name != "byo" or bool(self.spec_path),
             "task.spec_path is required when task.name is 'byo'"),
        ])


@dataclass
class PromptsConfig(Section):
    # The prompt collection: "builtin" (qpo_ray/prompts/data), an InstructEval-layout
    # directory (<method>/<task>.yaml), or a .txt / .jsonl file.
    source: str = "builtin"
    # Which InstructEval methods to read from a directory (None = every method found).
    methods: Optional[list[str]] = None
    # The manual baseline prompt: id, 0-based index (`qpo prompts` lists both) or text;
    # None = the first "manual" one, else the first prompt (announced).
    manual_prompt_id: Optional[int | str] = None


@dataclass
class TargetConfig(Section):
    # One of BACKEND_NAMES: vllm (local engines), transformers, openai (any compatible server).
    backend: str = "vllm"
    # HF model id, local path, or an embedded alias (see qpo_ray/common/models.py).
    model: str = "smollm2-135m-instruct"
    # auto = bfloat16 on GPUs that have it (else float16) and on CPUs that multiply bf16
    # in hardware (AVX512-BF16/AMX), float32 on other CPUs; or name one.
    dtype: str = "auto"
    # Wrap the formatted input in the model's chat template (chat-tuned targets).
    use_chat_template: bool = True
    max_model_len_tokens: int = 1024
    max_new_tokens: int = 16
    # vLLM only.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_space_gib: int = 2
    enable_prefix_caching: bool = True
    # KV-cache block size; 0 = 32 on CPU (vLLM-CPU's own default of 128 leaves prompts
    # under 128 tokens, i.e. most QPO inputs, uncacheable), vLLM's default on GPU.
    kv_block_size_tokens: int = 0
    # transformers only: pairs per forward pass.
    batch_size: int = 16
    # transformers only: prefixes whose first N+ tokens agree (chat template + prompt)
    # compute those tokens once per batch; shorter shared heads are not worth a pass.
    min_shared_prefix_tokens: int = 16
    # openai only: the server's URL, with or without /v1 (http://host:8000/v1).
    base_url: Optional[str] = None
    # openai only: HF id or path of the served model's tokenizer (label scoring renders
    # the chat template with it); None = target.model (a --served-model-name is not one).
    tokenizer: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout_s: float = 60.0
    max_retries: int = 3
    max_concurrent_requests: int = 8

    def validate(self) -> None:
        """What can be checked without the model or the endpoint (those are checked by
        `backends.validate_backend_config` before an engine starts)."""
        require_all([
            (self.backend in BACKEND_NAMES, f"target.backend: unknown backend "
                                            f"{self.backend!r} (known: {sorted(BACKEND_NAMES)})"),
            (self.max_new_tokens >= 1, "target.max_new_tokens must be >= 1"),
            (self.kv_block_size_tokens >= 0 and self.kv_block_size_tokens % 16 == 0,
             "target.kv_block_size_tokens must be 0 (engine default) or a multiple of 16"),
            (self.min_shared_prefix_tokens >= 1, "target.min_shared_prefix_tokens must be >= 1"),
            (self.tokenizer is None or self.backend == "openai", "target.tokenizer is for "
             "backend openai (a local engine uses target.model's own tokenizer)"),
        ] + [(value > 0, f"target.{key} must be > 0, got {value!r}") for key, value in (
            ("max_model_len_tokens", self.max_model_len_tokens),
            ("batch_size", self.batch_size), ("tensor_parallel_size", self.tensor_parallel_size),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("request_timeout_s", self.request_timeout_s))] + [
            (self.max_retries >= 0, f"target.max_retries must be >= 0, got {self.max_retries!r}"),
            (self.backend != "vllm" or 0 < self.gpu_memory_utilization <= 1,
             f"target.gpu_memory_utilization must be in (0, 1], got "
             f"{self.gpu_memory_utilization!r}"),
        ])


@dataclass
class EvaluationConfig(Section):
    # Actors in the Ray Data pool, each holding one engine; 0 = derive from the
    # cluster (GPUs / gpus_per_actor, or 1 on a CPU-only cluster).
    num_actors: int = 0
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    # Memory Ray reserves per actor (its engine: weights, KV cache, runtime); 0 =
    # estimated from the target (qpo_ray.scoring.ray_data.actor_memory_bytes).
    memory_per_actor_gib: float = 0.0
    # Most pairs per map_batches call (large enough to keep an engine busy); a call's
    # pairs are cut into equal batches, as many as a multiple of the actors.
    batch_size_pairs: int = 64
    # Times a failed batch (dead actor) is retried on a replacement actor.
    max_task_retries: int = 3
    # Custom Ray resources each engine actor asks for ({"gpu_node": 1}): the engines go
    # to the nodes started with them (`ray start --resources`).
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def engines_on_gpu(self) -> bool:
        """Whether the target's engines are placed on GPUs: the one test of it that the
        plan, the scoring pool and the run log share."""
        return self.num_gpus_per_actor > 0

    def validate(self) -> None:
        require_all([
            (self.batch_size_pairs >= 1, "evaluation.batch_size_pairs must be >= 1"),
            (self.memory_per_actor_gib >= 0, "evaluation.memory_per_actor_gib must be >= 0"),
        ])


@dataclass
class DatasetConfig(Section):
    # Step 0 groups (paper B.2): each group of prompts on its own random queries; 0 = one
    # group, every prompt on the same queries, so R_task compares them on equal terms.
    prompts_per_group: int = 40
    queries_per_group: int = 100
    # Wide Step 0 (qpo_ray.config.features; off by default).
    wide: WideStep0Config = field(default_factory=WideStep0Config)
    # Zero-shot query reward: "ppl" = correct - PPL/10 (paper eq. 3), "nll" = correct -
    # mean NLL/10 (the reference code).
    zero_shot_penalty: Literal["ppl", "nll"] = "ppl"
    # Whose answer the zero-shot penalty reads: the target's ("predicted", eq. 3 as
    # written) or the gold label's normalised likelihood ("gold", the reference code).
    query_reward: Literal["predicted", "gold"] = "predicted"
    # Keep pairs with reward >= min + expert_fraction * (max - min).
    expert_fraction: float = 0.667
    # Import an existing dataset instead of running Step 0 (Parquet or the paper's JSON).
    import_path: Optional[str] = None

    def validate(self) -> None:
        self.wide.validate()
        require_all([
            (0 <= self.expert_fraction < 1, "dataset.expert_fraction must be in [0, 1)"),
            (self.prompts_per_group >= 0,
             "dataset.prompts_per_group must be >= 0 (0 = every prompt on the same queries)"),
            (self.queries_per_group >= 1, "dataset.queries_per_group must be >= 1"),
            (not self.wide.enable or self.prompts_per_group == 0,
             "dataset.wide.enable needs dataset.prompts_per_group: 0 (R_task on shared "
             "queries picks the wide prompts)"),
        ])


@dataclass
class PolicyConfig(Section):
    # HF id, local path or embedded alias of the policy's backbone LM.
    backbone: str = "gpt2"
    # Keep only the first N transformer layers (None = all): the CPU demo's cost lever.
    backbone_num_layers: Optional[int] = None
    max_query_tokens: int = 40
    max_prompt_tokens: int = 40
    # lambda in L = NLL + lambda * MSE (paper: 0.1).
    reward_loss_weight: float = 0.1
    # "qpo" = reward-conditioned; "sft" = ablation: best prompt per query, no reward.
    mode: Literal["qpo", "sft"] = "qpo"
    # The query summary (qpo_ray/policy/summary.py; off by default: the paper's policy).
    query_summary: QuerySummaryConfig = field(default_factory=QuerySummaryConfig)

    def validate(self) -> None:
        require_all([
            (self.max_query_tokens >= 1 and self.max_prompt_tokens >= 2,
             "policy.max_query_tokens / policy.max_prompt_tokens too small"),
        ])
        self.query_summary.validate()


@dataclass
class TrainingConfig(Section):
    num_workers: int = 1
    use_gpu: bool = False
    # Ray CPUs reserved per training worker; on CPU workers also torch's thread count.
    num_cpus_per_worker: int = 1
    # Custom Ray resources per training worker, as evaluation.resources.
    resources: dict[str, float] = field(default_factory=dict)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 2
    # Autocast of training steps (weights stay float32): no | bf16 | fp16 (GPU only) |
    # auto (bf16 on bf16 GPUs and on CPUs with AVX512-BF16/AMX, fp16 on older GPUs, else no).
    mixed_precision: str = "no"
    # Global batch (paper: 128); each worker gets batch_size_global / num_workers.
    batch_size_global: int = 128
    lr_first_loop: float = 1e-3
    lr_later_loops: float = 1e-4
    epochs_first_loop: int = 100
    epochs_later_loops: int = 20
    weight_decay: float = 1e-4
    grad_clip_norm: float = 0.25
    # StepLR of the reference code.
    lr_step_epochs: int = 20
    lr_step_gamma: float = 0.65
    # Cap on optimizer steps per loop (None = no cap): sizes the CPU demo.
    max_steps_per_loop: Optional[int] = None
    # The query summary's own training phase (qpo_ray.config.features; 0 epochs = none).
    summary: SummaryTrainingConfig = field(default_factory=SummaryTrainingConfig)

    @property
    def best_row_column(self) -> str:
        """The column that names a query's best row for what the policy learns per query
        (mbr decoding's utilities, qpo_ray/policy/mbr.py): the summary part's ranking
        when it trains, else the QPO reward."""
        return self.summary.rank_by if self.summary.epochs else "reward"

    def validate(self) -> None:
        require_all([
            (self.num_workers >= 1, "training.num_workers must be >= 1"),
            (self.num_cpus_per_worker >= 1, "training.num_cpus_per_worker must be >= 1"),
            (self.zero_stage in (0, 1, 2, 3), "training.zero_stage must be 0, 1, 2 or 3"),
            (self.mixed_precision in ("no", "auto", "bf16", "fp16"),
             "training.mixed_precision must be no, auto, bf16 or fp16"),
            (self.mixed_precision != "fp16" or self.use_gpu,
             "training.mixed_precision=fp16 needs training.use_gpu=true (CPUs autocast to "
             "bf16 only)"),
            (self.mixed_precision in ("no", "auto") or self.strategy != "deepspeed"
             or self.use_gpu,
             f"training.mixed_precision={self.mixed_precision!r} under DeepSpeed needs "
             "training.use_gpu=true (DeepSpeed trains in float32 on CPUs)"),
            (self.batch_size_global >= self.num_workers,
             "training.batch_size_global must be >= training.num_workers"),
            (self.strategy != "deepspeed" or self.batch_size_global % self.num_workers == 0,
             f"training.batch_size_global={self.batch_size_global} must be divisible by "
             f"training.num_workers={self.num_workers} under DeepSpeed"),
            (self.epochs_first_loop >= 1,
             f"training.epochs_first_loop must be >= 1, got {self.epochs_first_loop}"),
            (self.epochs_later_loops >= 1,
             f"training.epochs_later_loops must be >= 1, got {self.epochs_later_loops}"),
        ])
        self.summary.validate()


@dataclass
class LoopConfig(Section):
    # T in Algorithm 1: T loops = 1 initial training + (T-1) augmentation rounds.
    num_loops: int = 4
    # Queries sampled (with repeats) from the collection set per round (paper: 1,000).
    augment_queries_per_round: int = 1000
    target_reward: float = 100.0
    top_k: int = 2
    top_p: float = 0.9

    def validate(self) -> None:
        require_all([
            (self.num_loops >= 1, "loop.num_loops must be >= 1"),
            (self.top_k >= 1, "loop.top_k must be >= 1"),
            (0 < self.top_p <= 1, "loop.top_p must be in (0, 1]"),
        ])


# How `qpo` can turn a policy into a prompt per query (qpo_ray/testphase/decoding.py).
DECODINGS = ("greedy", "rank", "mbr")


@dataclass
class TestConfig(Section):
    # Methods compared in the report (the registry in qpo_ray/testphase/methods.py);
    # majority and probe need no target call (skipped on free-text tasks).
    methods: list[str] = field(
        default_factory=lambda: ["qpo", "manual", "best_single", "nearest_neighbour",
                                 "majority", "probe"]
    )
    # Policy -> prompt per query: greedy at the target reward (the paper), rank, mbr
    # (qpo_ray/policy/ranking.py, mbr.py), or "dev": the best of dev_decodings x loops on dev.
    decoding: Literal["greedy", "rank", "mbr", "dev"] = "greedy"
    # The queries the methods are compared on: "test", or "dev" (into report-dev/, the test
    # split untouched; needs a fixed decoding: a choice made on dev is not measured there).
    split: Literal["test", "dev"] = "test"
    # The decodings "dev" chooses among (with every loop); rank costs ~10x greedy's
    # policy passes, mbr one pass per Step-0 candidate (~0.15 s a query on 2 cores).
    dev_decodings: list[str] = field(default_factory=lambda: ["greedy", "rank"])
    # The mbr and rank decodings' settings (qpo_ray.config.features).
    mbr: MbrConfig = field(default_factory=MbrConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    # Model whose mean-pooled hidden states embed queries for the `router` baseline;
    # None = the target model (the policy backbone when the target is an HTTP API).
    router_embedding_model: Optional[str] = None
    # Few-shot settings reported besides zero-shot, when the task supports them.
    shots: list[int] = field(default_factory=lambda: [0])
    # Prompts generated for a sample of queries shown in the report (paper Table 19).
    num_example_prompts: int = 5

    def validate(self) -> None:
        """Its own fields; the settings it shares with `loop` and `task` are checked by
        `Config.validate`. Method names are checked against the registry in
        `qpo_ray.testphase.methods` before a run starts (`stages.test.check_before_work`)."""
        require_all([
            (bool(self.dev_decodings) and set(self.dev_decodings) <= set(DECODINGS),
             f"test.dev_decodings must list greedy, rank and/or mbr, got "
             f"{self.dev_decodings}"),
        ])
        self.mbr.validate()
        self.rank.validate()


@dataclass
class TrackingConfig(Section):
    # None = sqlite:///<workdir>/mlflow.db with artifacts under <workdir>/mlartifacts.
    uri: Optional[str] = None
    experiment: str = "qpo"
    registered_model_name: str = "qpo-policy"
