"""The state-dict adapter to and from Hugging Face transformers' DiffLlama and Llama.

A DIFF V1 model becomes a ``DiffLlamaForCausalLM``, a baseline a ``LlamaForCausalLM``; both ways are
exact (the same function, up to fp32 rounding of one product per ``o_proj`` weight). The layouts
differ as SPEC.md's "Interop" section says:

- HF's ``num_attention_heads`` counts q sub-heads (``2H``) and pairs sub-head ``i`` with ``i + H``;
  here sub-heads ``2i`` and ``2i + 1`` form differential head ``i``. kv heads likewise (``g`` with
  ``g + H_kv`` there, ``2g`` and ``2g + 1`` here).
- HF's value heads are ``d`` wide: this project's ``2d``-wide value head ``g`` is HF's v heads
  ``g`` and ``g + H_kv``.
- HF's per-head norm has no weight: the ``2d`` weight of the norm is folded into ``o_proj``'s
  columns (both sides multiply by ``1 - λ_init`` after the norm). An imported model gets a norm
  weight of ones.
- RoPE is rotate-half on both sides, λ vectors map by name, λ_init follows the same schedule.

Anything not exactly representable (DIFF V2, the single-softmax ablation kinds, ALiBi or no
positional encoding, a DIFF model without the per-head norm, without its (1 − λ_init) factor, with a
fixed or zero λ or a constant λ_init, biases, RoPE scaling, an activation other than SiLU ...) is
refused with a :class:`~diff_transformer.errors.UserError`, never converted approximately. ``init``
and ``head_norm_init`` only set initial values: trained weights export exactly (any norm gain is
folded into ``o_proj``).

transformers is an optional dependency (``pip install 'diff-transformer[hf]'``), imported lazily.
Loading never unpickles: weights come from safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .config import ModelConfig, lambda_init_schedule
from .errors import UserError
from .fileio import require_new_folder, staged_folder
from .model import DiffTransformerLM
from .serialization import model_from_state

ARCHITECTURES = {"diff": "DiffLlamaForCausalLM", "baseline": "LlamaForCausalLM"}
MODEL_TYPES = {"diffllama": "diff", "llama": "baseline"}


class HFExport(NamedTuple):
    out_dir: Path
    architecture: str  # "DiffLlamaForCausalLM" or "LlamaForCausalLM"
    files: list[str]  # file names written into out_dir
    notes: list[str]  # things the user should know (e.g. no tokenizer exported)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise UserError(
            "Hugging Face interop needs the optional dependency transformers (>= 4.48, for DiffLlama): "
            "pip install 'diff-transformer[hf]'"
        ) from e
    return transformers


# Layout permutations ---------------------------------------------------------------------------
def _pairs_to_halves(w: Tensor, d: int) -> Tensor:
    """Rows of sub-head pairs (2j, 2j+1) -> HF's halves (j, j + n): (2n·d, D) -> (2n·d, D).

    Also turns a 2d-wide value head g into HF's d-wide v heads g and g + n (the same row move).
    """
    cols = w.shape[1]
    return w.reshape(-1, 2, d, cols).transpose(0, 1).reshape(-1, cols)  # (n, 2, d, D) -> (2, n, d, D)


def _halves_to_pairs(w: Tensor, d: int) -> Tensor:
    """Inverse of :func:`_pairs_to_halves`."""
    cols = w.shape[1]
    return w.reshape(2, -1, d, cols).transpose(0, 1).reshape(-1, cols)  # (2, n, d, D) -> (n, 2, d, D)


# Config mapping --------------------------------------------------------------------------------
def check_exportable(config: ModelConfig) -> None:
    """Raise UserError unless ``config`` is exactly a DiffLlama (diff) or a Llama (baseline)."""
    if config.attention == "diff_v2":
        raise UserError(
            "DIFF V2 models cannot be exported to transformers: transformers has no DIFF V2 architecture "
            "(DiffLlama implements DIFF V1 only). Keep this project's format (save_pretrained)."
        )
    if config.attention not in ARCHITECTURES:
        raise UserError(
            f"attention={config.attention!r} (an ablation kind) has no transformers architecture: only DIFF V1 "
            "(DiffLlama) and the softmax baseline (Llama) export. Keep this project's format (save_pretrained)."
        )
    if config.pos_encoding != "rope":
        raise UserError(
            f"pos_encoding={config.pos_encoding!r}: (Diff)Llama always applies RoPE, so the export would compute a "
            "different function. Only pos_encoding='rope' models export."
        )
    if config.attention == "diff" and config.lambda_mode != "learned":
        raise UserError(
            f"lambda_mode={config.lambda_mode!r} (an ablation: λ not learned); DiffLlama always computes λ from "
            "four learned vectors, so it cannot represent this model exactly. Only lambda_mode='learned' exports."
        )
    if config.attention == "diff" and config.head_norm and not config.head_norm_lambda_scale:
        raise UserError(
            "head_norm_lambda_scale=False (an ablation: the per-head norm without the (1 − λ_init) factor); "
            "DiffLlama always multiplies by (1 − λ_init), so the export would compute a different function."
        )
    if config.attention == "diff" and not config.head_norm:
        raise UserError(
            "this DIFF model has no per-head norm (head_norm=False, an ablation); DiffLlama always applies "
            "it, so the export would compute a different function. Only head_norm=True DIFF models export."
        )
    if config.attention == "baseline" and config.head_norm:
        raise UserError(
            "this baseline has a per-head norm (head_norm=True); Llama has none. "
            "Only baselines with head_norm=False export to LlamaForCausalLM."
        )
    if config.attention == "diff":
        bad = [i for i in range(config.n_layers) if config.layer_lambda_init(i) != lambda_init_schedule(i)]
        if bad:
            raise UserError(
                f"lambda_init={config.lambda_init} (a constant λ_init ablation) differs from the depth schedule "
                f"0.8 - 0.6·exp(-0.3·l) that DiffLlama hard-codes (layer(s) {bad[:4]}); transformers' "
                "DiffLlamaConfig has no setting for it, so this model cannot be exported exactly."
            )
    if config.attention == "baseline" and config.dim % config.n_heads:
        raise UserError(
            f"transformers' LlamaConfig requires hidden_size divisible by num_attention_heads; this baseline has "
            f"dim={config.dim}, n_heads={config.n_heads} (head_dim={config.head_dim}), which Llama refuses."
        )


def hf_config(config: ModelConfig, *, eos_token_id: int | None = None, bos_token_id: int | None = None):
    """The transformers config (DiffLlamaConfig or LlamaConfig) of ``config``."""
    check_exportable(config)
    tf = _transformers()
    fields: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,  # DIFF: HF counts q sub-heads, 2 per differential head
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=float(config.init_std),
        rms_norm_eps=float(config.norm_eps),  # DiffLlama uses it for the per-head norm too, as we do
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )
    try:
        if config.attention == "diff":
            return tf.DiffLlamaConfig(**fields, lambda_std_dev=float(config.lambda_std))
        return tf.LlamaConfig(**fields, mlp_bias=False)
    except (ValueError, TypeError) as e:  # transformers' own validation (strict dataclass configs)
        raise UserError(f"transformers {tf.__version__} refuses this model's config: {e}") from e


def _get(hf_cfg, name: str, default: Any = None) -> Any:
    return getattr(hf_cfg, name, default)


def _rope_theta(hf_cfg) -> float:
    """rope_theta of a plain (unscaled, full-width) RoPE config; UserError otherwise."""
    params = _get(hf_cfg, "rope_parameters")
    if params is None:  # transformers 4.x keeps rope_theta and rope_scaling as attributes
        params = {"rope_type": "default", "rope_theta": _get(hf_cfg, "rope_theta", 10000.0),
                  **(_get(hf_cfg, "rope_scaling") or {})}
    params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    theta = params.pop("rope_theta", _get(hf_cfg, "rope_theta", 10000.0))
    if params.get("partial_rotary_factor", 1.0) == 1.0:
        params.pop("partial_rotary_factor", None)
    if rope_type != "default" or params:
        raise UserError(
            f"this model uses RoPE {rope_type!r} with {params or 'no extra settings'}; only plain RoPE "
            "(rope_type 'default', full head width, no scaling) is implemented here, so it cannot be imported exactly"
        )
    return float(theta)


def config_from_hf(hf_cfg) -> ModelConfig:
    """This project's ModelConfig for a DiffLlama/Llama transformers config; UserError if inexact."""
    model_type = _get(hf_cfg, "model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"model_type {model_type!r} is not supported: only 'diffllama' (DIFF V1) and 'llama' (the baseline) "
            "map exactly onto this project's model"
        )
    attention = MODEL_TYPES[model_type]
    if _get(hf_cfg, "hidden_act", "silu") != "silu":
        raise UserError(
            f"hidden_act={hf_cfg.hidden_act!r}: this project's MLP is SwiGLU with SiLU only; cannot import exactly"
        )
    for name in ("attention_bias", "mlp_bias"):
        if _get(hf_cfg, name, False):
            raise UserError(f"{name}=True: this project's layers have no biases, so the model cannot be "
                            "imported exactly")
    if _get(hf_cfg, "quantization_config") is not None:
        raise UserError("quantized checkpoints cannot be imported: export the model in full precision first")
    rope_theta = _rope_theta(hf_cfg)
    n_heads = hf_cfg.num_attention_heads
    fields: dict[str, Any] = dict(
        vocab_size=hf_cfg.vocab_size,
        dim=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=_get(hf_cfg, "num_key_value_heads") or n_heads,
        head_dim=_get(hf_cfg, "head_dim") or hf_cfg.hidden_size // n_heads,
        ffn_dim=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        rope_theta=rope_theta,
        norm_eps=float(hf_cfg.rms_norm_eps),
        tie_embeddings=bool(_get(hf_cfg, "tie_word_embeddings", False)),
        attention=attention,
        lambda_init=None,  # DiffLlama's λ_init is the depth schedule
        head_norm=attention == "diff",
        init_std=float(_get(hf_cfg, "initializer_range", 0.02)),
    )
    if attention == "diff" and _get(hf_cfg, "lambda_std_dev") is not None:
        fields["lambda_std"] = float(hf_cfg.lambda_std_dev)
    from .config import check_field_types, validate_size

    check_field_types(ModelConfig, fields, "model")
    config = ModelConfig(**fields)
    validate_size(config)
    return config


# State mapping ---------------------------------------------------------------------------------
def state_to_hf(model: DiffTransformerLM) -> dict[str, Tensor]:
    """HF-named fp32 CPU tensors of ``model`` (lm_head included, equal to the embedding when tied)."""
    cfg = model.config
    check_exportable(cfg)
    d, diff = cfg.head_dim, cfg.attention == "diff"
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    for name, w in ours.items():
        if name.endswith("self_attn.head_norm.weight"):
            continue  # folded into o_proj below
        if diff and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            w = _pairs_to_halves(w, d)
        elif diff and name.endswith("o_proj.weight"):
            norm_w = ours[name.replace("o_proj.weight", "head_norm.weight")]  # (2d,)
            w = w * norm_w.repeat(cfg.n_heads // 2)[None, :]  # scale the columns of every head's 2d block
        out[name if name == "lm_head.weight" else f"model.{name}"] = w.contiguous()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def state_from_hf(config: ModelConfig, hf_state: dict[str, Tensor],
                  source: str = "the transformers model") -> dict[str, Tensor]:
    """This project's state dict (fp32) from HF-named tensors; UserError on missing/extra tensors."""
    d, diff = config.head_dim, config.attention == "diff"
    state: dict[str, Tensor] = {}
    for name, w in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a RoPE buffer some old checkpoints carry; recomputed from rope_theta
        if name == "lm_head.weight":
            if config.tie_embeddings:
                continue  # tied: transformers uses the embedding, whatever the file holds
            key = name
        elif name.startswith("model."):
            key = name[len("model."):]
        else:
            raise UserError(f"{source} holds tensor {name!r}, which a (Diff)LlamaForCausalLM does not have")
        w = w.detach().to("cpu", torch.float32)
        if diff and key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            w = _halves_to_pairs(w, d)
        state[key] = w.contiguous()
    if diff:
        for i in range(config.n_layers):
            state[f"layers.{i}.self_attn.head_norm.weight"] = torch.ones(2 * d)  # HF's norm has no weight
    return state


def _model_from_state(config: ModelConfig, state: dict[str, Tensor], source: str) -> DiffTransformerLM:
    try:
        return model_from_state(config, state, source=source)
    except ValueError as e:
        raise UserError(f"cannot import: {e}") from e


# Public API ------------------------------------------------------------------------------------
def to_transformers(model: DiffTransformerLM, *, attn_implementation: str = "sdpa",
                    eos_token_id: int | None = None, bos_token_id: int | None = None):
    """An fp32 CPU ``DiffLlamaForCausalLM`` (DIFF V1) or ``LlamaForCausalLM`` (baseline) computing the
    same function as ``model``. Raises UserError for models transformers cannot represent exactly."""
    tf = _transformers()
    cfg = hf_config(model.config, eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    cls = getattr(tf, ARCHITECTURES[model.config.attention])
    hf_model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    state = state_to_hf(model)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a transformers version with other parameter names
        raise UserError(f"transformers {tf.__version__} {cls.__name__} has parameters {missing} we do not map "
                        f"and lacks {unexpected}; this transformers version is not supported")
    if model.config.tie_embeddings and hf_model.lm_head.weight is not hf_model.model.embed_tokens.weight:
        hf_model.tie_weights()
    hf_model.generation_config.eos_token_id = eos_token_id  # what generate() stops at
    hf_model.generation_config.bos_token_id = bos_token_id
    return hf_model.eval()


def from_transformers(hf_model) -> DiffTransformerLM:
    """This project's model (fp32, CPU) from a ``DiffLlamaForCausalLM`` or ``LlamaForCausalLM``."""
    state = hf_model.state_dict()
    if "lm_head.weight" not in state:
        raise UserError(
            f"{type(hf_model).__name__} has no lm_head: pass a DiffLlamaForCausalLM or LlamaForCausalLM, "
            "not the bare decoder"
        )
    config = config_from_hf(hf_model.config)
    return _model_from_state(config, state_from_hf(config, state), f"{type(hf_model).__name__}")


def _tokenizer_json(tokenizer: str | os.PathLike | None) -> Path | None:
    if tokenizer is None:
        return None
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    return path if path.is_file() else None


class _TokenizerExport(NamedTuple):
    tokenizer_json: Path | None  # copied as is
    tokenizer_config: dict[str, Any] | None  # written as tokenizer_config.json
    eos_token_id: int | None  # into config.json and generation_config.json
    notes: list[str]


def _tokenizer_export(tokenizer: str | os.PathLike | None, config: ModelConfig) -> _TokenizerExport:
    """What to write for ``tokenizer``: a folder saved by this project's tokenizers (tokenizer_meta.json
    naming bpe, byte or tiktoken), a folder holding a `tokenizers` tokenizer.json, or that file."""
    from .data.tokenizer import EOS_TEXT, META_FILE

    if tokenizer is None:
        return _TokenizerExport(None, None, None, ["no tokenizer given: the folder holds none; pass token ids"])
    path = Path(tokenizer)
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    kind = meta.get("kind", "bpe")
    if kind in ("byte", "tiktoken"):
        eos_id = 256 if kind == "byte" else int(meta["eos_id"])
        if eos_id >= config.vocab_size:
            raise UserError(f"the {kind} tokenizer in {path} has EOS id {eos_id} but the model only "
                            f"{config.vocab_size} tokens: this tokenizer does not belong to the model")
        what = "UTF-8 bytes 0..255" if kind == "byte" else f"tiktoken {meta.get('name')!r} ids"
        return _TokenizerExport(None, None, eos_id, [
            f"{kind} tokenizer: transformers has no equivalent, so none was exported; token ids are {what}, "
            f"EOS {eos_id} (set as eos_token_id, so generate() stops there)"])
    tok_json = _tokenizer_json(path / meta["file"] if "file" in meta else path)
    if tok_json is None:
        return _TokenizerExport(None, None, None, [f"no tokenizer.json at {path}: no tokenizer exported"])
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tok_json))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{tok_json} is not a tokenizers JSON file ({e})") from e
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    if n_tokens > config.vocab_size:
        raise UserError(f"{tok_json} has {n_tokens} tokens but the model only {config.vocab_size}: "
                        "this tokenizer does not belong to the model")
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # loads the tokenizer.json as is, transformers 4.x and 5.x
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    eos_text = meta.get("eos_token", EOS_TEXT)
    eos_id = tok.token_to_id(eos_text)
    notes = []
    if eos_id is None:
        notes.append(f"the tokenizer has no {eos_text} token: no EOS set, generate() stops only at max_new_tokens")
    else:
        tok_config["eos_token"] = eos_text
    return _TokenizerExport(tok_json, tok_config, eos_id, notes)


def _add_legacy_rope_theta(path: Path) -> None:
    """Also write ``rope_theta`` at the top level: transformers 4.x reads it there and ignores
    ``rope_parameters`` (it would silently fall back to 10000); 5.x reads it into ``rope_parameters``."""
    data = json.loads(path.read_text())
    data["rope_theta"] = data["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_hf(model: DiffTransformerLM, tokenizer: str | os.PathLike | None, out_dir: str | os.PathLike,
              ) -> HFExport:
    """Write ``model`` as a transformers folder: config.json, model.safetensors, generation_config.json
    and, for a BPE tokenizer, tokenizer.json (copied byte for byte) + tokenizer_config.json.

    ``tokenizer``: a folder this project saved a tokenizer into (tokenizer_meta.json), a folder holding a
    `tokenizers` tokenizer.json, that file, or None. Byte and tiktoken tokenizers have no transformers
    form: only their EOS id is written (the returned notes say so).

    ``out_dir`` must not exist or be empty; the folder appears at once (written to a temporary sibling,
    then renamed), so nothing is overwritten and a failed export leaves nothing behind.
    """
    out_dir = Path(out_dir)
    require_new_folder(out_dir)
    check_exportable(model.config)
    tok = _tokenizer_export(tokenizer, model.config)
    hf_model = to_transformers(model, eos_token_id=tok.eos_token_id)

    with staged_folder(out_dir) as tmp:
        hf_model.save_pretrained(tmp)  # config.json, model.safetensors (tied head stored once), generation_config.json
        _add_legacy_rope_theta(tmp / "config.json")
        if tok.tokenizer_json is not None:
            shutil.copyfile(tok.tokenizer_json, tmp / "tokenizer.json")
            tok_config = json.dumps(tok.tokenizer_config, indent=2, sort_keys=True) + "\n"
            (tmp / "tokenizer_config.json").write_text(tok_config)
    files = sorted(p.name for p in out_dir.iterdir())
    return HFExport(out_dir, ARCHITECTURES[model.config.attention], files, tok.notes)


def _load_safetensors(src: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def read(path: Path) -> dict[str, Tensor]:
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise UserError(f"{path} is not a valid safetensors file ({e}); weights are read from safetensors "
                            "only, never unpickled: re-export the model with save_pretrained") from None

    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        return read(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
        except (ValueError, KeyError, TypeError) as e:  # ValueError: JSON, UTF-8
            raise UserError(f"{index} is not a safetensors index ({e}): re-export the model with save_pretrained") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not shard or Path(shard).name != shard or shard in (".", ".."):
                raise UserError(f"{index} names the shard {shard!r}, which is not a file in {src}: shards must lie "
                                "beside the index")
            if not (src / shard).is_file():
                raise UserError(f"{index} names the shard {shard}, which {src} does not hold: copy the whole folder")
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read(src / shard))
        return state
    if any((src / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise UserError(
            f"{src} holds only pickled weights (pytorch_model.bin), which this project never loads (unpickling "
            "runs arbitrary code). Convert them to safetensors first, e.g. "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst) in a trusted environment."
        )
    raise UserError(f"{src} holds no model.safetensors (or model.safetensors.index.json)")


def import_hf(src_dir: str | os.PathLike) -> tuple[DiffTransformerLM, Path | None]:
    """This project's model (fp32, CPU) from a DiffLlama/Llama transformers folder, and the path of the
    folder's tokenizer.json (None when it has none). UserError for folders we cannot map exactly."""
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json: point at a transformers model folder")
    tf = _transformers()
    try:
        hf_cfg = tf.AutoConfig.from_pretrained(str(src))
    except Exception as e:  # transformers/huggingface_hub raise their own validation errors for bad values
        first = " ".join(str(e).split())[:300]
        raise UserError(f"transformers cannot read {src / 'config.json'}: {first}") from None
    config = config_from_hf(hf_cfg)
    state = _load_safetensors(src)
    model = _model_from_state(config, state_from_hf(config, state, str(src)), str(src))
    return model, _tokenizer_json(src)
