"""Tiny random-init models for tests (never downloaded weights), with realistic magnitudes.

Transformers' default init (std 0.02) leaves the stream's mean square near 1e-3, where the norms'
eps alone moves a correct AttnRes several percent away from the original (see attnres.md); tests of
the zero-init invariant re-initialise to unit scale: linear weights std 1/sqrt(fan_in), embeddings
std 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

VOCAB = 128
COMPILE_LAYERS = 2  # for torch.compile tests: Inductor's C++ build grows with the graph; 4 sublayers, 2 blocks
SEQ = 16
BATCH = 2


def unit_scale_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise weights at unit scale, in place; norm weights stay as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=g))
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
                elif "bias" in name:
                    p.zero_()
    return model


def random_depth_(tmodel: nn.Module, std: float = 0.3, seed: int = 3) -> nn.Module:
    """Fixed random values in every AttnRes parameter of a transformed model (so a check is not of an identity), the
    same for every process that asks with the same seed; in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.attnres.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return tmodel


def hf_causal_lm(model_type: str, **overrides) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **base), attn_implementation=base.pop("attn_implementation")
    )
    return unit_scale_(model).eval()


def hf_encoder(model_type: str, **overrides) -> nn.Module:
    """A tiny HF vision or speech encoder (`AutoModel`; the encoder alone for encoder-decoders)."""
    from transformers import AutoConfig, AutoModel

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **{**base, **overrides}))
    model = model.get_encoder() if hasattr(model, "get_encoder") and model_type == "whisper" else model
    return unit_scale_(model).eval()


def llama(layers: int = 4) -> nn.Module:
    return hf_causal_lm("llama", num_hidden_layers=layers)


def qwen3(layers: int = 4) -> nn.Module:
    return hf_causal_lm("qwen3", num_hidden_layers=layers, head_dim=16)


def mistral(layers: int = 4) -> nn.Module:
    return hf_causal_lm("mistral", num_hidden_layers=layers, sliding_window=None)


def gpt2(layers: int = 4) -> nn.Module:
    return hf_causal_lm(
        "gpt2", n_embd=64, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1
    )


def gpt_neox(layers: int = 4) -> nn.Module:
    return hf_causal_lm(
        "gpt_neox", num_hidden_layers=layers, use_parallel_residual=True, rotary_pct=0.5, hidden_dropout=0.0
    )


def mixtral(layers: int = 4) -> nn.Module:
    return hf_causal_lm("mixtral", num_hidden_layers=layers, num_local_experts=4, num_experts_per_tok=2)


def qwen2_moe(layers: int = 4) -> nn.Module:
    return hf_causal_lm(
        "qwen2_moe",
        num_hidden_layers=layers,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        decoder_sparse_step=1,
    )


def qwen3_moe(layers: int = 4) -> nn.Module:
    return hf_causal_lm(
        "qwen3_moe",
        num_hidden_layers=layers,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        decoder_sparse_step=1,
    )


def kimi_linear(layers: int = 4) -> nn.Module:
    return hf_causal_lm(
        "kimi_linear",
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_token=2,
        moe_intermediate_size=64,
        num_shared_experts=1,
        layer_types=(["linear_attention", "full_attention"] * layers)[:layers],
        mlp_layer_types=["dense"] + ["sparse"] * (layers - 1),
        linear_num_heads=4,
        linear_head_dim=16,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        head_dim=8,
    )


def deepseek_v3(layers: int = 4) -> nn.Module:
    """Dense first layer, then routed + shared experts; MLA attention."""
    return hf_causal_lm(
        "deepseek_v3",
        num_hidden_layers=layers,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
    )


def olmoe(layers: int = 4) -> nn.Module:
    return hf_causal_lm("olmoe", num_hidden_layers=layers, num_experts=4, num_experts_per_tok=2)


class LoopMoE(nn.Module):
    """MoE as people write it by hand: a Python loop over experts with data-dependent token sets."""

    def __init__(self, d: int, experts: int = 4, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d)) for _ in range(experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:  # data-dependent control flow: no capture can trace this
                continue
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view_as(x)


class LoopMoEBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.moe_norm = nn.RMSNorm(d)
        self.moe = LoopMoE(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.moe(self.moe_norm(x))


class LoopMoEModel(nn.Module):
    def __init__(self, d: int = 32, layers: int = 3, vocab: int = VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LoopMoEBlock(d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class FlatLoopMoE(nn.Module):
    """Loop-over-experts MoE sublayers whose residual adds sit in the model's own forward (no layer modules), so
    export must keep the uncapturable experts opaque to find the stream around them."""

    def __init__(self, d: int = 32, layers: int = 3, vocab: int = VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norms = nn.ModuleList(nn.RMSNorm(d) for _ in range(layers))
        self.moes = nn.ModuleList(LoopMoE(d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return self.head(self.norm(x))


def loop_moe(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return unit_scale_(LoopMoEModel(layers=layers)).eval()


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
    )
    return BertModel(cfg).eval()


def vit(layers: int = 4) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=layers,
        num_heads=4,
        num_classes=10,
        drop_path_rate=0.1,
        init_values=0.5,
    )
    return unit_scale_(model).eval()


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x += self.attn(h, h, h, need_weights=False, is_causal=False)[0]
        x += self.mlp(self.ln_2(x))
        return x


class NanoGPT(nn.Module):
    """nanoGPT-style, written by hand, with in-place residual adds."""

    def __init__(self, d: int = 64, layers: int = 4, vocab: int = VOCAB):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(64, d)
        self.h = nn.ModuleList(NanoBlock(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nanogpt(layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return unit_scale_(NanoGPT(layers=layers)).eval()


class NormAfterBranch(nn.Module):
    """OLMo2-style: the branch reads the stream raw and its output is normalised."""

    def __init__(self, d: int = 32, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.norms = nn.ModuleList(nn.RMSNorm(d) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer, norm in zip(self.layers, self.norms):
            x = x + norm(layer(x))
        return self.head(x)


class NoResidual(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def token_ids(batch: int = BATCH, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def images(batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# name -> (factory taking `layers`, example call as (args, kwargs), residual sublayers at the default depth)
Arch = tuple[Callable[[], nn.Module], Callable[[], tuple[tuple, dict]], int]
HF_IDS = lambda: ((), {"input_ids": token_ids(), "use_cache": False})

ARCHITECTURES: dict[str, Arch] = {
    "llama": (llama, HF_IDS, 8),
    "qwen3": (qwen3, HF_IDS, 8),
    "mistral": (mistral, HF_IDS, 8),
    "gpt2": (gpt2, HF_IDS, 8),
    "gpt_neox_parallel": (gpt_neox, HF_IDS, 4),
    "mixtral": (mixtral, HF_IDS, 8),
    "qwen2_moe": (qwen2_moe, HF_IDS, 8),
    "kimi_linear": (kimi_linear, HF_IDS, 8),
    "deepseek_v3": (deepseek_v3, HF_IDS, 8),
    "olmoe": (olmoe, HF_IDS, 8),
    "loop_moe": (loop_moe, lambda: ((token_ids(),), {}), 6),
    "vit": (vit, lambda: ((images(),), {}), 8),
    "nanogpt_inplace": (nanogpt, lambda: ((token_ids(),), {}), 8),
}


MOE = ("mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "kimi_linear", "loop_moe")


def main_output(out: object) -> torch.Tensor:
    """The tensor to compare: logits of an HF output, or the output itself."""
    return out.logits if hasattr(out, "logits") else out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude (fp32 parity measure)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


class Residual3D(nn.Module):
    """A minimal hand-written pre-norm model taking a float tensor (for the CLI's --factory)."""

    def __init__(self, d: int = 32, layers: int = 2):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.final = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.final(x)


class RawHiddenOutput(Residual3D):
    """Pre-norm, but also returns the raw stream (like output_hidden_states)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.final(x), x


class TitanAttention(nn.Module):
    """torchtitan's attention layout (wq, wk, wv, wo; heads from the projection's width, so it shards by heads)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.head_dim = d // heads
        self.wq, self.wk, self.wv = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class TitanFeedForward(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.w2 = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TitanBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.attention, self.feed_forward = TitanAttention(d, heads), TitanFeedForward(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class TitanLlama(nn.Module):
    """torchtitan's model shape: its module names, layers in a ModuleDict keyed by index, and a forward that skips the
    embedding, the final norm and the head when they are None (how its pipeline stages are made: a copy per stage
    with the other stages' parts removed). Causal attention without positions, so that sequence parallelism needs
    no position bookkeeping."""

    def __init__(self, d: int = 64, layers: int = 4, heads: int = 4, vocab: int = VOCAB):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleDict({str(i): TitanBlock(d, heads) for i in range(layers)})
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def titan_tp_plan(model: nn.Module) -> dict:
    """torchtitan's tensor + sequence parallel plan for its Llama (parallelize_llama's `apply_tp`)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    for name in model.layers:
        layer = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        }
        plan.update({f"layers.{name}.{k}": v for k, v in layer.items()})
    return plan


def titan_llama(layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return unit_scale_(TitanLlama(layers=layers)).eval()


def titan_stage(model: nn.Module, start: int, stop: int) -> nn.Module:
    """A torchtitan-style stage: a copy of `model` with the layers outside [start, stop) removed, the embedding kept
    only in the first stage, the final norm and head only in the last."""
    import copy

    stage = copy.deepcopy(model)
    count = len(stage.layers)
    for i in range(count):
        if not start <= i < stop:
            del stage.layers[str(i)]
    if start > 0:
        stage.tok_embeddings = None
    if stop < count:
        stage.norm, stage.output = None, None
    return stage


# --- models whose stream does not run through one module per layer ------------------------------------------------


class Sublayer(nn.Module):
    """`fn(norm(x))`: the branch alone; the model's own forward holds the residual add."""

    def __init__(self, d: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class RootForwardGPT(nn.Module):
    """nanoGPT-style, with every residual add in the model's own forward: `x = x + sub(x)` over the sublayers."""

    def __init__(self, d: int = 32, layers: int = 3, vocab: int = VOCAB):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        mlp = lambda: nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))  # noqa: E731
        self.subs = nn.ModuleList(Sublayer(d, mlp() if i % 2 else nn.Linear(d, d)) for i in range(2 * layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for sub in self.subs:
            x = x + sub(x)
        return self.lm_head(self.ln_f(x))


def root_forward_gpt(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return unit_scale_(RootForwardGPT(layers=layers)).eval()


class SharedBlock(nn.Module):
    """A pre-norm block with a norm computed in its own forward (`F.rms_norm`) and one norm module."""

    def __init__(self, d: int):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.norm2 = nn.RMSNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6))
        return x + self.mlp(self.norm2(x))


class SharedLayerModel(nn.Module):
    """Layers 0, 1, 0, 2: the first layer is called twice, at two depths (weight sharing)."""

    def __init__(self, d: int = 32, vocab: int = VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(SharedBlock(d) for _ in range(3))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for i in (0, 1, 0, 2):
            h = self.layers[i](h)
        return self.head(self.norm(h))


def shared_layer_model() -> nn.Module:
    torch.manual_seed(0)
    return unit_scale_(SharedLayerModel()).eval()


def x_transformer(depth: int = 3, **options) -> nn.Module:
    """x-transformers' decoder LM: every residual add sits in `AttentionLayers.forward`."""
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    layers = Decoder(dim=32, depth=depth, heads=4, **options)
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=layers)
    return unit_scale_(model).eval()


def mvitv2(img_size: int = 64) -> nn.Module:
    """timm MViTv2: the stream of stage 2 starts inside its first block (pooled shortcut + attention)."""
    import timm

    torch.manual_seed(0)
    return unit_scale_(timm.create_model("mvitv2_tiny", pretrained=False, img_size=img_size, num_classes=10)).eval()
