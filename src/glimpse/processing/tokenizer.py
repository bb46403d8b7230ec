"""The checkpoint's own tokenizer (transformers' AutoTokenizer) and the ids that end a sequence."""

from __future__ import annotations

import json
from pathlib import Path

from glimpse.errors import CheckpointError
from glimpse.processing.chat import read_chat_template


def load_tokenizer(model_dir: Path, chat_template: str | None = None):
    """The tokenizer in `model_dir`; `chat_template` (a file or Jinja text) replaces its chat template."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    template = read_chat_template(chat_template) if chat_template is not None else None
    # AutoTokenizer peeks at config.json, whose VL architecture (remote code) it does not know: it warns
    # about that and then loads the tokenizer files fine. Keep the noise out of the user's terminal.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer from {model_dir}: {e}") from None
    finally:
        hf_logging.set_verbosity(level)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def end_of_sequence_ids(model_dir: Path, tokenizer, config_eos: list[int]) -> list[int]:
    """Every id that ends generation: config.json's, generation_config.json's and the tokenizer's eos."""
    ids = list(config_eos)
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
