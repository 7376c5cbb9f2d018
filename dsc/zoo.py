"""Named model configurations: tiny ones for tests and demos, real shapes for benchmarks.

Models are built from transformers configs with random weights (nothing is downloaded). The tiny
ones can draw their weights wide (`init_std`), so greedy decoding produces varied tokens instead of
repeating one — a test that compares token streams needs that to prove anything.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["MODELS", "build", "names"]


def _tiny(arch: str) -> tuple[str, dict[str, Any]]:
    common = dict(vocab_size=211, max_position_embeddings=256)
    if arch == "llama":
        return "LlamaForCausalLM", dict(
            common, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        )
    if arch in ("mistral", "mistral-sliding"):
        # mistral-sliding: each query sees itself and the 3 slots before it (sliding window).
        return "MistralForCausalLM", dict(
            common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2,
            sliding_window=4 if arch == "mistral-sliding" else None,
        )
    if arch == "mixtral":
        return "MixtralForCausalLM", dict(
            common, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=None,
        )
    if arch == "gpt2":
        return "GPT2LMHeadModel", dict(
            vocab_size=211, n_positions=256, n_embd=64, n_layer=2, n_head=4,
        )
    if arch == "opt":
        return "OPTForCausalLM", dict(
            common, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64,
        )
    if arch == "bloom":  # ALiBi instead of position embeddings
        # Untied: with the embedding as its head a tiny BLOOM repeats the last token forever.
        return "BloomForCausalLM", dict(vocab_size=211, hidden_size=128, n_layer=2, n_head=4,
                                        tie_word_embeddings=False)
    if arch == "gpt-oss":
        # Attention sinks, sliding-window layers between full ones, and experts with biases and
        # a clamped SwiGLU. The real model's YaRN context, so its rope config is consistent.
        return "GptOssForCausalLM", dict(
            vocab_size=211, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=4, max_position_embeddings=131072,
        )
    if arch == "glm4-moe":
        # Sigmoid routing with a selection bias, two groups of which one is kept, a scale, a
        # shared expert beside the routed ones; the first layer dense.
        return "Glm4MoeForCausalLM", dict(
            common, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, routed_scaling_factor=2.5,
        )
    if arch == "deepseek-v3":
        # Multi-head latent attention (queries through a low-rank path; keys 24 wide of which 8
        # rotate, values 16), group-limited sigmoid routing, a shared expert; first layer dense.
        return "DeepseekV3ForCausalLM", dict(
            common, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        )
    if arch == "qwen3.5":
        # Gated delta-net layers (keys 16 wide in 2 heads repeated to 4 value heads, a 4-tap
        # causal convolution) before one full-attention layer with a gated output.
        return "Qwen3_5ForCausalLM", dict(
            common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
            linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        )
    if arch == "granite-4":
        # A Mamba-2 layer (4 heads of 32 lanes, an 8-wide state, 16-token chunks) before an
        # attention layer; MoE experts in both.
        return "GraniteMoeHybridForCausalLM", dict(
            common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, layer_types=["mamba", "attention"],
            mamba_d_state=8, mamba_n_heads=4, mamba_d_head=32, mamba_chunk_size=16,
            num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1,
            bos_token_id=2,
        )
    if arch == "bert":
        return "BertModel", dict(
            vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256,
        )
    raise KeyError(arch)


def _real(name: str) -> tuple[str, dict[str, Any]]:
    shapes = {
        "llama-7b": ("LlamaForCausalLM", dict(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        )),
        "llama-1.1b": ("LlamaForCausalLM", dict(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
        )),
        "llama-70b": ("LlamaForCausalLM", dict(
            vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
            num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
        )),
        "gpt2-xl": ("GPT2LMHeadModel", dict(
            vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25,
        )),
        "mixtral-8x7b": ("MixtralForCausalLM", dict(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
            num_experts_per_tok=2, max_position_embeddings=32768, sliding_window=None,
        )),
        "gpt-oss-20b": ("GptOssForCausalLM", dict(
            vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
            num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
            num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
        )),
        # Latent attention (keys 192 wide, values 128, a 512-wide latent), 64 experts of
        # which 6 are routed per token plus 2 shared.
        "deepseek-v2-lite": ("DeepseekV2ForCausalLM", dict(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
            num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
            moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6,
            n_shared_experts=2, first_k_dense_replace=1, topk_method="greedy", n_group=1,
            topk_group=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128,
        )),
        # HF's Qwen3_5TextConfig defaults: 32 layers, three in four gated delta-net (32 value
        # heads of 128 lanes, 16 key heads), every fourth full attention (16 heads of 256, 4 KV).
        "qwen3.5": ("Qwen3_5ForCausalLM", {}),
        "opt-1.3b": ("OPTForCausalLM", dict(
            vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
            num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048,
        )),
    }
    return shapes[name]


MODELS: dict[str, Callable[[], tuple[str, dict[str, Any]]]] = {
    **{f"tiny-{a}": (lambda a=a: _tiny(a)) for a in
       ("llama", "mistral", "mistral-sliding", "mixtral", "gpt2", "opt", "bloom", "gpt-oss",
        "glm4-moe", "deepseek-v3", "qwen3.5", "granite-4", "bert")},
    **{n: (lambda n=n: _real(n)) for n in
       ("llama-7b", "llama-1.1b", "llama-70b", "gpt2-xl", "opt-1.3b", "mixtral-8x7b",
        "gpt-oss-20b", "deepseek-v2-lite", "qwen3.5")},
}


def names() -> list[str]:
    return sorted(MODELS)


def build(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    init_std: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> torch.nn.Module:
    """Build a named model with random weights, in eval mode.

    init_std: draw every weight matrix from N(0, init_std) (norm weights stay near 1), so that tiny
    models produce varied greedy tokens.
    """
    import transformers

    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}")
    class_name, config_kwargs = MODELS[name]()
    config_kwargs = {**config_kwargs, **overrides}
    model_cls = getattr(transformers, class_name)
    config_cls = model_cls.config_class
    config = config_cls(**config_kwargs)
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype)
    if init_std is not None:
        with torch.no_grad():
            generator = torch.Generator(device="cpu").manual_seed(seed)
            for pname, param in model.named_parameters():
                if param.dim() >= 2:
                    param.copy_(torch.randn(param.shape, generator=generator) * init_std)
                elif "bias" in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * init_std)
                else:
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()
