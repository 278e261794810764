"""Build a small Llama-family checkpoint locally, deterministically, with nothing downloaded.

Used by the tests, the demo and the benchmarks: a transformers config, a seeded random
init saved as safetensors, and a byte-level BPE tokenizer trained on a few lines.

    python -m tests.support.tiny_checkpoint OUT_DIR [--hidden 256 --layers 2 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

HEAD_DIM = 64  # vLLM's CPU attention rejects head_dim 16; 64 works
_DONE_MARKER = "tiny_checkpoint.json"

_TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A new vLLM instance gets its weights from an instance that is already running.",
    "Gossip spreads membership through the mesh without any coordinator.",
    "Weights move rank to rank over the fastest link between two hosts.",
    "Hello world! Once upon a time there was a tiny language model.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } , . ; : ? !",
]


@dataclass(frozen=True)
class CheckpointSpec:
    hidden: int = 256
    layers: int = 2
    intermediate: int = 512
    kv_heads: int = 2
    vocab: int = 512
    max_positions: int = 1024
    dtype: str = "float32"
    tie_embeddings: bool = False
    seed: int = 0

    @property
    def heads(self) -> int:
        return self.hidden // HEAD_DIM

    def validate(self) -> None:
        if self.hidden % HEAD_DIM:
            raise ValueError(f"hidden must be a multiple of {HEAD_DIM}, got {self.hidden}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads must divide heads ({self.heads}), got {self.kv_heads}")
        for field in ("layers", "intermediate", "vocab", "max_positions"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")

    def parameter_count(self) -> int:
        h, i, v = self.hidden, self.intermediate, self.vocab
        kv = self.kv_heads * HEAD_DIM
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
        heads = v * h * (1 if self.tie_embeddings else 2)
        return self.layers * per_layer + heads + h


def build_checkpoint(out_dir: str | os.PathLike, spec: CheckpointSpec = CheckpointSpec()) -> Path:
    """Write the checkpoint to out_dir (idempotent: an identical existing build is reused)."""
    spec.validate()
    out = Path(out_dir)
    marker = out / _DONE_MARKER
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return out
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(spec.vocab)
    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(asdict(spec)))
    return out


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"vocab {vocab_size} is too small for the byte alphabet")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    defaults = CheckpointSpec()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out_dir = args.pop("out_dir")
    spec = CheckpointSpec(**args)
    path = build_checkpoint(out_dir, spec)
    print(f"{path} ({spec.parameter_count() / 1e6:.1f}M parameters, {spec.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
