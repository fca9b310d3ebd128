"""An independent torch reference of the whole LLaVA-HR model, as the LLaVA code runs it:
the reference tokenization, the torch vision tower, and transformers' LlamaForCausalLM
with the image features spliced into inputs_embeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_TOKEN_INDEX = -200  # the reference's placeholder id


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """Verbatim logic of the reference llava.mm_utils.tokenizer_image_token."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


class TorchLlava:
    """The torch vision tower + transformers' LlamaForCausalLM on the checkpoint's weights,
    image features spliced into inputs_embeds at the placeholder, as LLaVA's
    prepare_inputs_labels_for_multimodal does."""

    def __init__(self, ckpt: Path, image_size: int):
        import torch
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaForCausalLM

        from mra.model import load_vision

        cfg = json.loads((Path(ckpt) / "config.json").read_text())
        lc = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                         intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                         num_attention_heads=cfg["num_attention_heads"],
                         num_key_value_heads=cfg["num_key_value_heads"],
                         max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg["rms_norm_eps"],
                         rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
                         tie_word_embeddings=cfg["tie_word_embeddings"], hidden_act=cfg["hidden_act"])
        lc._attn_implementation = "eager"
        self.llm = LlamaForCausalLM(lc).float().eval()
        sd = {k: v.float() for k, v in load_file(str(Path(ckpt) / "model.safetensors")).items()
              if k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."))}
        self.llm.load_state_dict(sd, strict=True)
        self.vision = load_vision(ckpt, image_size)
        self.image_size = image_size
        self.torch = torch

    def image_features(self, image) -> "np.ndarray":
        from mra.runtime.preprocess import preprocess_image

        x = self.torch.from_numpy(preprocess_image(image, self.image_size))[None]
        with self.torch.no_grad():
            return self.vision(x)[0]

    def inputs_embeds(self, ids: list[int], features: list):
        torch = self.torch
        emb = self.llm.get_input_embeddings()
        parts, k, run = [], 0, []
        for t in ids + [None]:
            if t is not None and t != IMAGE_TOKEN_INDEX:
                run.append(t)
                continue
            if run:
                parts.append(emb(torch.tensor(run)))
                run = []
            if t == IMAGE_TOKEN_INDEX:
                parts.append(features[k])
                k += 1
        assert k == len(features), "one feature block per image placeholder"
        return torch.cat(parts)[None]

    def logits(self, ids: list[int], features: list) -> np.ndarray:
        """Next-token logits after the whole prompt."""
        return self.greedy(ids, features, 0, eos=-1)[0]

    def greedy(self, ids: list[int], features: list, n: int, eos: int) -> tuple[np.ndarray, list[int]]:
        """(logits after the prompt, up to ``n`` greedy tokens), with transformers' KV cache."""
        torch = self.torch
        with torch.no_grad():
            out = self.llm(inputs_embeds=self.inputs_embeds(ids, features), use_cache=True)
            first = out.logits[0, -1].numpy()
            logits, tokens = first, []
            for _ in range(n):
                tok = int(np.argmax(logits))
                tokens.append(tok)
                if tok == eos:
                    break
                out = self.llm(input_ids=torch.tensor([[tok]]), cache=out.cache, use_cache=True)
                logits = out.logits[0, -1].numpy()
        return first, tokens
