"""Pieces shared by the scripts that build small FLUX.1 pipelines in diffusers' folder layout
(tools/reference/make_fixtures.py, tools/demo/train.py): tokenizers trained on a caption corpus
in the styles FLUX.1's CLIP and T5 tokenizers use, bf16 tensor files, the pipeline index."""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def train_clip_bpe(corpus, vocab_size: int) -> Tokenizer:
    """A CLIP-style byte-level BPE (lowercased, words ending in `</w>`) trained on `corpus`."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def _t5_style(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


T5_SPECIALS = ["<pad>", "</s>", "<unk>"]


def train_t5_unigram(corpus, vocab_size: int) -> Tokenizer:
    """A T5-style unigram tokenizer (Metaspace, "$A </s>", ids 0/1/2 = <pad>/</s>/<unk>), as
    T5TokenizerFast saves it."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=T5_SPECIALS, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return _t5_style(tok)


def t5_unigram_of_words(corpus) -> Tokenizer:
    """The same kind of tokenizer for a closed vocabulary, where the unigram trainer ends up
    with little more than characters: every word of `corpus` is one piece (scored by its
    frequency), single characters cover anything else."""
    words, chars = {}, {}
    for line in corpus:
        for w in line.split():
            words["▁" + w] = words.get("▁" + w, 0) + 1
            for ch in w:
                chars[ch] = chars.get(ch, 0) + 1
    chars["▁"] = sum(words.values())
    total = sum(words.values()) + sum(chars.values())
    pieces = [(p, 0.0) for p in T5_SPECIALS]
    # Characters score far below words, so a known word never splits.
    pieces += [(p, math.log(n / total)) for p, n in sorted(words.items())]
    pieces += [(p, math.log(n / total) - 20.0) for p, n in sorted(chars.items())]
    return _t5_style(Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False)))


def write_clip_tokenizer_config(out: Path, max_length: int = 77):
    out.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **specials}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))


def save_t5_tokenizer(tok: Tokenizer, out: Path, max_length: int = 512):
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": max_length, "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "extra_ids": 0,
    }, indent=1))


def save_bf16(sd: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))


def write_model_index(root: Path, **extra):
    """diffusers' `model_index.json` for a FluxPipeline; `extra` keys must start with `_` so
    diffusers ignores them."""
    assert all(k.startswith("_") for k in extra)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], **extra,
    }, indent=1))
