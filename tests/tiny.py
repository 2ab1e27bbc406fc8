"""Tiny random models on the real SmolLM2 tokenizer, so tests see real chat-template tokenisation in seconds."""

from __future__ import annotations

import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefalign.models import DEFAULT_MODEL, load_tokenizer


@functools.cache
def _tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


def smollm2_tokenizer():
    """The embedded model's tokenizer (ChatML template); a fresh copy each call so tests may mutate it."""
    import copy

    return copy.deepcopy(_tokenizer())


def tiny_llama(tokenizer=None, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32 over the full vocabulary, seeded."""
    tok = tokenizer or _tokenizer()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    return model


def save_tiny(path, seed: int = 0) -> str:
    """Write a tiny model + the SmolLM2 tokenizer as a loadable model directory."""
    tok = smollm2_tokenizer()
    tiny_llama(tok, seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def conversational_rows(n: int = 8) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"I think it is {2 * i + 1}, but I am not sure at all."}]}
            for i in range(n)]


def text_rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"Q: name a colour number {i}.\nA:", "chosen": f" Blue {i}.",
             "rejected": f" I refuse to answer question {i}."} for i in range(n)]


def row_reply_mask(batch) -> torch.Tensor:
    """Row-layout mask of the reply tokens (chosen and rejected) of a collated batch, from its pair layout."""
    ids = batch["input_ids"]
    wanted = (batch["chosen_mask"] | batch["rejected_mask"]).bool()
    mask = torch.zeros(ids.numel(), dtype=torch.long)
    mask[batch["pair_index"][wanted]] = 1
    return mask.view(ids.shape)


def token_logps(model, input_ids, attention_mask, target_mask, *, position_ids=None, predictor=None,
                chunk_rows=None, force_full_logits=False, path=None) -> torch.Tensor:
    """Row-layout log-probs of the ``target_mask`` tokens (0 elsewhere) through prefalign's fast forward
    (speed.forward.target_logps; ``path`` a FastPath, default one with ``chunk_rows``), or with
    ``force_full_logits`` from the model's full logits (the oracle). The hidden state at ``predictor[i, t]``
    (default ``t - 1``) predicts token ``t``."""
    from prefalign.speed.forward import FastPath, target_logps
    from prefalign.speed.head import gather_logps

    mask = target_mask.bool().clone()
    if predictor is None:
        mask[:, 0] = False
    rows, cols = mask.nonzero(as_tuple=True)
    src = cols - 1 if predictor is None else predictor[rows, cols]
    targets = input_ids[rows, cols]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if force_full_logits:
        picked = gather_logps(model(**inputs, use_cache=False).logits[rows, src], targets)
    else:
        picked = target_logps(model, inputs, rows, src, targets, path or FastPath(chunk_rows=chunk_rows))
    out = torch.zeros(mask.shape, dtype=torch.promote_types(picked.dtype, torch.float32))
    return out.index_put((rows, cols), picked)


def base_tokenizer():
    """A small byte-level BPE tokenizer with no chat template and no ChatML tokens: a base model's, so
    ``chat_template: chatml`` has tokens to add and embeddings to resize. Built offline in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"What is {i} plus {i}? {2 * i}. I think it is {2 * i + 1}, but I am not sure at all. user assistant "
              "system Q: name a colour number. A: Blue. I refuse to answer question." for i in range(50)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def save_tiny_base(path, seed: int = 0) -> str:
    """A tiny model over `base_tokenizer` (no chat template), saved as a loadable model directory."""
    tok = base_tokenizer()
    tiny_llama(tok, seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# Tiny random models of the families TRL's tests cover, over the SmolLM2 vocabulary: (config class, model class,
# options). Sliding windows are 8 tokens, shorter than the test sequences, so a layout that ignores them shows.
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, head_dim=8)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1,
                       mlp_only_layers=[], router_aux_loss_coef=0.01)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8, intermediate_size=16,
                     layer_types=["sliding_attention", "full_attention"], router_aux_loss_coef=0.01,
                     attn_implementation="eager")),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM",
                dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], logit_scale=0.5)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM",
              dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM",
             dict(layer_types=["conv", "full_attention"], block_ff_dim=64, conv_L_cache=3)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                    final_logit_softcapping=5.0, attn_logit_softcapping=20.0, attn_implementation="eager")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                    final_logit_softcapping=5.0)),
}


def tiny_family(family: str, tokenizer=None, seed: int = 0, **overrides):
    """A 2-layer random model of ``family`` (a FAMILIES key) over the full SmolLM2 vocabulary, seeded, untied."""
    import transformers

    config_name, model_name, options = FAMILIES[family]
    tok = tokenizer or _tokenizer()
    cfg = dict(_COMMON, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **options)
    cfg.update(overrides)
    attn = cfg.pop("attn_implementation", "sdpa")
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**cfg)
    config._attn_implementation = attn
    model = getattr(transformers, model_name)(config)
    model.eval()
    return model


def spy_from_pretrained(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every ``AutoModelForCausalLM.from_pretrained`` call (the model still loads)."""
    import transformers

    seen: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return seen
