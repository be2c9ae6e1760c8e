"""LLaVA-NeXT (LLaVA-1.6) adapter: a local checkpoint, its offline tiny twin, and a 7B-shaped benchmark model.

All three are the same transformers classes (`LlavaNextForConditionalGeneration`,
`LlavaNextProcessor`); only sizes and the source of weights differ. torch and transformers
are imported inside the loaders so that registering costs nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.errors import ModelLoadError
from edgeprune.registry import register

HF_DEFAULT_ID = "llava-hf/llava-v1.6-vicuna-7b-hf"

# The chat template of llava-hf/llava-v1.6-vicuna-7b-hf; the twins use it too.
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    "{% else %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass
class LoadedModel:
    """A LLaVA-NeXT model ready for export: eval mode, fp32, eager attention."""

    name: str  # registry name
    source: str  # checkpoint path or a description of the built-in weights
    model: Any  # LlavaNextForConditionalGeneration
    processor: Any  # LlavaNextProcessor
    weights_sha256: str
    weights_bytes: int

    @property
    def config(self):
        return self.model.config


def weights_digest(model) -> tuple[str, int]:
    """sha256 over parameter names and bytes (state_dict order), and the total byte count."""
    h = hashlib.sha256()
    total = 0
    for name, tensor in model.state_dict().items():
        data = tensor.detach().contiguous().cpu().numpy().tobytes()
        h.update(name.encode())
        h.update(data)
        total += len(data)
    return h.hexdigest(), total


def _quiet_transformers() -> None:
    """No progress bars or info chatter from transformers: our CLI owns stderr (one line per user error)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _finish(name: str, source: str, model, processor) -> LoadedModel:
    model.eval()
    model.config._attn_implementation = "eager"
    for sub in (model.config.vision_config, model.config.text_config):
        sub._attn_implementation = "eager"
    digest, nbytes = weights_digest(model)
    return LoadedModel(name, source, model, processor, digest, nbytes)


# --- the processor shared by the twins -------------------------------------------------


def _twin_processor(image_size: int, pinpoints: list[list[int]]):
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from edgeprune.models.tiny_tokenizer import train_tiny_tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tiny_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token; without it features and tokens mismatch
        chat_template=VICUNA_CHAT_TEMPLATE,
    )


def _twin_model(vision: dict, text: dict, image_size: int, pinpoints, tokenizer, seed: int):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision_config = CLIPVisionConfig(image_size=image_size, patch_size=14, **vision)
    text_config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **text,
    )
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


TINY_IMAGE = 112  # 8 x 8 patches of 14 px
TINY_PINPOINTS = [[112, 224], [224, 112], [224, 224]]  # 1x2, 2x1 and 2x2 crop grids


@register("llava-next-tiny", recipe="llava-next-tiny.toml",
          description="offline tiny twin of LLaVA-NeXT (seeded weights, tokenizer trained in code)")
def load_tiny(model_dir: str | None = None, **_options) -> LoadedModel:
    if model_dir is not None:
        raise ModelLoadError("llava-next-tiny is built in code; drop --model (or use `edgeprune export llava-next --model DIR`)")
    processor = _twin_processor(TINY_IMAGE, TINY_PINPOINTS)
    vocab = len(processor.tokenizer)
    model = _twin_model(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    projection_dim=64),
        text=dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        image_size=TINY_IMAGE, pinpoints=TINY_PINPOINTS, tokenizer=processor.tokenizer, seed=0,
    )
    return _finish("llava-next-tiny", "built-in llava-next-tiny (seed 0)", model, processor)


LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@register("llava-next-7b-shape", recipe="llava-next.toml",
          description="CLIP-L/14-336 + Llama-7B dimensions, random weights, --layers LM layers (benchmarks)")
def load_7b_shape(model_dir: str | None = None, layers: int = 2, **_options) -> LoadedModel:
    if model_dir is not None:
        raise ModelLoadError("llava-next-7b-shape has random weights; drop --model (or use `llava-next --model DIR`)")
    if layers < 1:
        raise ModelLoadError(f"--layers must be >= 1, got {layers}")
    processor = _twin_processor(336, LLAVA_16_PINPOINTS)
    model = _twin_model(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    projection_dim=768, hidden_act="quick_gelu"),
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        image_size=336, pinpoints=LLAVA_16_PINPOINTS, tokenizer=processor.tokenizer, seed=0,
    )
    return _finish("llava-next-7b-shape", f"random LLaVA-NeXT-7B shape, {layers} LM layers", model, processor)


@register("llava-next", recipe="llava-next.toml", checkpoint=True,
          description=f"a local Hugging Face LLaVA-NeXT checkpoint (--model DIR; default {HF_DEFAULT_ID} from the HF cache)")
def load_checkpoint(model_dir: str | None = None, **_options) -> LoadedModel:
    path = Path(model_dir) if model_dir else _from_hf_cache()
    config_file = path / "config.json"
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist; pass --model with a local LLaVA-NeXT checkpoint")
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; pass --model with a Hugging Face checkpoint directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_file} is not valid JSON ({e}); the checkpoint is damaged") from None
    if model_type != "llava_next":
        raise ModelLoadError(f"{path} holds a {model_type!r} model, not LLaVA-NeXT (model_type 'llava_next')")
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    _quiet_transformers()
    try:
        processor = LlavaNextProcessor.from_pretrained(path)
        model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load {path}: {str(e).splitlines()[0]}") from None
    return _finish("llava-next", str(path.resolve()), model, processor)


def _from_hf_cache() -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(HF_DEFAULT_ID, local_files_only=True))
    except Exception:
        raise ModelLoadError(
            f"{HF_DEFAULT_ID} is not in the local Hugging Face cache; pass --model DIR with a local LLaVA-NeXT checkpoint"
        ) from None


def save_twin(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Writes a twin as a normal HF checkpoint dir (`from_pretrained(DIR)` loads model and processor)."""
    out = Path(out_dir)
    _quiet_transformers()
    loaded.model.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    return out
