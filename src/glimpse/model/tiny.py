"""Tiny random-weight checkpoints in exactly the real layout (config.json, safetensors, tokenizer files).

They are what the tests, the README's first command and CI run on: real loading code, real tokenizer
and chat template machinery, no download. Widths are tiny; names, spellings and geometry are real.
The built-in models `tiny` and `tiny-vl` are these, made once under $GLIMPSE_CACHE (`ensure_builtin`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

from glimpse.config import NemotronHConfig, VLConfig
from glimpse.kernels.quant_formats import E2M1_MAX, E4M3_MAX, quantize_fp8, quantize_nvfp4
from glimpse.model.batch import CacheTensors, ForwardBatch
from glimpse.model.nemotron_h import NemotronHForCausalLM
from glimpse.model.quant_linear import Quantization, published_quant_config, quantized_linear_names
from glimpse.model.tiny_vl import TINY_VL_CONTEXT, tiny_vl_checkpoint
from glimpse.quantization import QuantConfig

BUILTIN_MODELS = ("tiny", "tiny-vl")

# Special tokens of the real tokenizer that the template and the engine rely on (names, not ids).
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<SPECIAL_10>",
    "<SPECIAL_11>",
    "<SPECIAL_12>",
    "<img>",
    "</img>",
    "<image>",
]
# Kept in decoded text (the reasoning and tool parsers read them), so not "special".
TEXT_TOKENS = [
    "<think>", "</think>", "<TOOLCALL>", "</TOOLCALL>", "<AVAILABLE_TOOLS>", "</AVAILABLE_TOOLS>",
    "<TOOL_RESPONSE>", "</TOOL_RESPONSE>",
]  # fmt: skip
EOS_TOKEN = "<SPECIAL_12>"

# A little English for the BPE merges, so random outputs look word-like rather than raw bytes.
_CORPUS = (
    """
The model reads documents, charts, forms and videos and answers questions about them. It thinks before it
answers when reasoning is on. A frame of the video shows a person walking into the room; the next frame is
almost the same. What is the total on the invoice? The chart shows revenue growing every quarter of the year.
Please extract the name, the date and the amount from this form and return them as JSON. The answer is yes.
Summarise the page in three sentences. How many people are in the picture, and what are they doing there?
"""
    * 3
)

Style = Literal["nvidia", "legacy", "transformers"]


def tiny_text_config(
    max_position_embeddings: int = 8192, vocab_size: int = 640, n_groups: int = 2
) -> NemotronHConfig:
    return NemotronHConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        layer_kinds=["mamba", "mlp", "mamba", "attention", "mlp", "mamba", "attention", "mlp"],  # M-M*-M*-
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=256,
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=n_groups,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=64,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        bos_token_id=1,
        pad_token_id=0,
    )


# Tokenizer -------------------------------------------------------------------------------------------------
def _learn_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair, ties broken by the pair itself (deterministic)."""
    seqs = {w: list(w) for w in words}
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, n in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def build_tokenizer(num_merges: int = 350):
    """A byte-level BPE tokenizer with the real special tokens, as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(_CORPUS))
    merges = _learn_merges(words, num_merges)
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + TEXT_TOKENS:
        vocab[tok] = len(vocab)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    template = resources.files("glimpse.data").joinpath("tiny_chat_template.jinja").read_text()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=EOS_TOKEN,
        pad_token="<unk>",
        chat_template=template,
        model_max_length=1_000_000,
    )


# Weights --------------------------------------------------------------------------------------------------
def random_llm_state_dict(config: NemotronHConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with the right structure: small linears, unit norms, Mamba2's usual A/dt ranges."""
    gen = torch.Generator().manual_seed(seed)
    model = NemotronHForCausalLM(config)
    out = {}
    for name, p in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("A_log"):
            t = torch.log(torch.empty(p.shape).uniform_(1, 16, generator=gen))
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
            t = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif name.endswith(".D") or "norm" in name:
            t = torch.ones(p.shape)
        elif leaf == "bias":
            t = torch.zeros(p.shape)
        elif "embeddings" in name:
            t = torch.randn(p.shape, generator=gen)
        else:
            t = torch.randn(p.shape, generator=gen) * 0.05
        out[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    return out


@torch.no_grad()
def quantize_llm_state(
    config: NemotronHConfig,
    state: dict[str, torch.Tensor],
    quant: QuantConfig,
    prefix: str = "",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The language model's tensors (our names, `backbone.*`) with its quantised layers in modelopt's
    layout, beside each `X.weight`: FP8 `X.weight_scale`, `X.input_scale`; NVFP4 `X.weight_scale`,
    `X.weight_scale_2`, `X.input_scale`. `prefix` is the language model's name in the checkpoint
    (`language_model.` in the VL one), for the exclusion list. The static input scales are calibrated on
    a random prompt: amax / 448 (FP8), amax / (6 · 448) (NVFP4, whose activations would be E2M1)."""
    model = NemotronHForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    layers = set(quantized_linear_names(model, quant, prefix))
    amax = _input_amax(model, sorted(layers), seed)
    out = {}
    for name, t in state.items():
        layer = name.removesuffix(".weight")
        if layer not in layers or layer == name:
            out[name] = t
        elif quant.algo == "FP8":
            out[name], out[layer + ".weight_scale"] = quantize_fp8(t.float())
            out[layer + ".input_scale"] = torch.tensor(amax[layer] / E4M3_MAX)
        else:
            out[name], out[layer + ".weight_scale"], out[layer + ".weight_scale_2"] = quantize_nvfp4(
                t.float()
            )
            out[layer + ".input_scale"] = torch.tensor(amax[layer] / (E2M1_MAX * E4M3_MAX))
    return out


def _input_amax(
    model: NemotronHForCausalLM, layers: list[str], seed: int, tokens: int = 64
) -> dict[str, float]:
    """max |input| of each named linear layer over one forward pass of `tokens` random token ids."""
    config = model.config
    ids = torch.randint(config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed + 2))
    block = 16
    m, a = config.num_mamba_layers, config.num_attention_layers
    cache = CacheTensors(
        conv_state=torch.zeros(m, 1, config.conv_kernel - 1, config.mamba_conv_dim),
        ssm_state=torch.zeros(m, 1, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size),
        key_cache=torch.zeros(a, tokens // block, block, config.num_key_value_heads, config.head_dim),
        value_cache=torch.zeros(a, tokens // block, block, config.num_key_value_heads, config.head_dim),
    )
    batch = ForwardBatch([tokens], [0], torch.tensor([0]), torch.arange(tokens // block).view(1, -1))
    amax = dict.fromkeys(layers, 0.0)

    def record(name: str):
        return lambda module, args: amax.__setitem__(name, max(amax[name], args[0].abs().max().item()))

    hooks = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in layers]
    try:
        model(batch, cache, input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return amax


def write_safetensors(state: dict[str, torch.Tensor], out_dir: Path, shards: int = 1) -> None:
    """One file, or `shards` files with model.safetensors.index.json, as the hub's checkpoints are."""
    from safetensors.torch import save_file

    names = list(state)
    if shards <= 1:
        save_file(
            {k: state[k].contiguous() for k in names},
            out_dir / "model.safetensors",
            metadata={"format": "pt"},
        )
        return
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, out_dir / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def rename_llm(state: dict[str, torch.Tensor], prefix: Literal["backbone", "model"], outer: str = "") -> dict:
    return {outer + k.replace("backbone.", prefix + ".", 1): v for k, v in state.items()}


def make_tiny(
    out_dir: str | Path,
    *,
    vl: bool = False,
    seed: int = 0,
    style: Style = "nvidia",
    name_prefix: Literal["backbone", "model"] = "backbone",
    shards: int = 1,
    quantization: Quantization | None = None,
    n_groups: int = 2,
) -> Path:
    """Write a tiny checkpoint. Text: NemotronHForCausalLM layout. VL: NemotronH_Nano_VL_V2 layout.

    `quantization` (`fp8`, `nvfp4`) writes a modelopt checkpoint of the same weights (the same seed's
    bf16 checkpoint is its twin): the language model's linear layers quantised, everything the published
    exclusion list names (vision tower, mlp1, conv1d, lm_head) and embeddings and norms as before, and
    `hf_quant_config.json`. `n_groups` (Mamba groups, 8 heads) is 4 for a model tensor parallelism can
    split four ways.
    A ValueError, before anything is written, when `out_dir` can't be made a directory (a file there)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot write a checkpoint into {str(out)!r}: a file is in the way") from None
    except OSError as e:
        raise ValueError(f"cannot write a checkpoint into {str(out)!r}: {e.strerror}") from None
    tokenizer = build_tokenizer()
    vocab = (len(tokenizer) + 63) // 64 * 64
    quant = published_quant_config(quantization) if quantization else None
    config: NemotronHConfig | VLConfig
    if vl:
        llm = tiny_text_config(max_position_embeddings=TINY_VL_CONTEXT, vocab_size=vocab, n_groups=n_groups)
        llm_state = random_llm_state_dict(llm, seed)
        if quant is not None:
            llm_state = quantize_llm_state(llm, llm_state, quant, "language_model.", seed)
        config, state = tiny_vl_checkpoint(
            llm, rename_llm(llm_state, "backbone", outer="language_model."), seed
        )
    else:
        config = llm = tiny_text_config(vocab_size=vocab, n_groups=n_groups)
        state = random_llm_state_dict(llm, seed)
        if quant is not None:
            state = quantize_llm_state(llm, state, quant, "", seed)
        state = rename_llm(state, name_prefix)
    write_safetensors(state, out, shards)
    (out / "config.json").write_text(json.dumps(config.to_dict(style), indent=2))
    if quant is not None:
        (out / "hf_quant_config.json").write_text(json.dumps(quant.to_hf_quant_config(), indent=2))
    write_tokenizer_files(tokenizer, out, llm)
    return out


def write_tokenizer_files(tokenizer, out: Path, config: NemotronHConfig) -> None:
    tokenizer.save_pretrained(out)
    eos = [config.eos_token_id, tokenizer.convert_tokens_to_ids("</s>")]
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def cache_dir() -> Path:
    return Path(os.environ.get("GLIMPSE_CACHE", Path.home() / ".cache" / "glimpse"))


def ensure_builtin(name: str) -> Path:
    """`tiny` / `tiny-vl`: made once (seed 0) under $GLIMPSE_CACHE, atomically so parallel users agree."""
    target = cache_dir() / "models" / name
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        make_tiny(tmp, vl=(name == "tiny-vl"), seed=0)
        (tmp / ".complete").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # someone else finished first
            if not (target / ".complete").is_file():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
