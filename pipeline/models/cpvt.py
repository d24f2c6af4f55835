""" CPVT: Vision Transformer with Conditional Positional Encodings

A PyTorch implementation of
  * `Conditional Positional Encodings for Vision Transformers` - https://arxiv.org/abs/2102.10882
    (Chu, Tian, Zhang, Wang, Shen; first titled "Do We Really Need Explicit Position Encodings for
    Vision Transformers?")

The encoder is DeiT/timm ViT (pre-norm blocks, qkv bias, LayerNorm eps 1e-6, patch 16, MLP ratio 4). The
explicit position embedding is replaced by one or more Position Encoding Generators (PEG, Algorithm 1 of the
paper): a depthwise kxk conv with zero padding over the patch-token grid, added back as a residual. The zero
padding at the grid border is what gives the tokens absolute position information; the class token bypasses
the PEG. Because the PEG is a convolution, any input whose sides are multiples of the patch size works with
the same weights (224, 160, 384, 224x320, ...).

State-dict keys follow timm/DeiT ViT (`patch_embed.proj`, `cls_token`, `blocks.{i}.attn.qkv`, `norm`, `head`,
...) and the official PEG naming (`pos_block.{k}.proj.0.weight/bias`, from `PosCNN` in the Twins repository),
so DeiT checkpoints (minus `pos_embed`, see `loading.py`) and official PEG checkpoints load.

Initialisation (documented choice): DeiT's — trunc_normal(std=.02) on every Linear weight with zero bias,
trunc_normal(std=.02) on `cls_token` and on the optional learned `pos_embed`, LayerNorm weight 1 / bias 0,
the patch-embedding conv keeps PyTorch's default init (as in DeiT). PEG conv: normal(0, sqrt(2 / fan_out))
with fan_out = k*k*C/groups = k*k, bias 0 (as in the official PosCNN).

Variants (1 PEG after block 0, 1000 classes):
  cpvt_ti / cpvt_ti_gap: 5,681,512 / 5,681,320 params
  cpvt_s  / cpvt_s_gap:  21,978,856 / 21,978,472 params
  cpvt_b  / cpvt_b_gap:  86,424,040 / 86,423,272 params
`*_gap` variants have no class token: the final LayerNorm is applied to all tokens, then tokens are averaged.
"""
import math
from typing import Dict, Iterable, Literal, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerNorm, Mlp, PatchEmbed, calculate_drop_path_rates, resample_abs_pos_embed, trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model

from pipeline.config import check_peg_positions

__all__ = ['CPVT', 'PEG', 'Attention', 'Block', 'check_peg_positions']

PosEmbedType = Literal['none', 'learned']
GlobalPoolType = Literal['token', 'avg']


class PEG(nn.Module):
    """Position Encoding Generator (paper Algorithm 1; `PosCNN` in the official code).

    Prefix tokens (the class token) bypass the PEG; patch tokens are reshaped to their (H, W) grid, passed
    through a depthwise kxk conv (stride 1, zero padding k//2, bias) and added back (residual).
    """

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'peg_kernel must be a positive odd int (1, 3, 5, ...), got {kernel_size}')
        # nn.Sequential keeps the official key names: pos_block.{k}.proj.0.weight / .bias
        self.proj = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, stride=1, padding=kernel_size // 2, bias=True, groups=dim),
        )
        self.init_weights()

    def init_weights(self) -> None:
        conv = self.proj[0]
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups  # = k*k
        nn.init.normal_(conv.weight, mean=0., std=math.sqrt(2.0 / fan_out))
        nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
        if x.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
            # CPU autocast would run the depthwise conv in bf16, which has no fast kernel on CPUs without
            # AVX512-BF16/AMX (~4x slower than fp32, benchmarks/bench_model.py); the PEG is tiny: keep it fp32
            with torch.autocast('cpu', enabled=False):
                return self._forward(x.float(), grid_size, num_prefix_tokens).to(x.dtype)
        return self._forward(x, grid_size, num_prefix_tokens)

    def _forward(self, x: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        B, N, C = x.shape
        H, W = grid_size
        prefix, feat_token = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]  # (B, P, C), (B, H*W, C)
        cnn_feat = feat_token.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        x = self.proj(cnn_feat) + cnn_feat  # (B, C, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return torch.cat((prefix, x), dim=1)  # (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention, timm/DeiT key names (`qkv`, `proj`).

    The normal path uses F.scaled_dot_product_attention; `forward(x, return_attn=True)` computes the softmax
    map explicitly (slow path, only for visualisation) and returns it alongside the output.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'embed_dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
            self, x: torch.Tensor, return_attn: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)

        attn = None
        if return_attn:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v  # (B, heads, N, head_dim)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)

        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attn else x


class Block(nn.Module):
    """Pre-norm transformer block (DeiT/timm ViT)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x

    def forward_with_attn(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Same as forward, but attention is computed explicitly; returns (x, attn (B, heads, N, N))."""
        y, attn = self.attn(self.norm1(x), return_attn=True)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, attn


class CPVT(nn.Module):
    """Vision Transformer with conditional positional encodings (PEG)."""
    dynamic_img_size = True  # any input whose sides are multiples of patch_size

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: GlobalPoolType = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            class_token: bool = True,
            peg_positions: Union[int, Sequence[int]] = (0,),
            peg_kernel: int = 3,
            pos_embed: PosEmbedType = 'none',
            norm_eps: float = 1e-6,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ) -> None:
        """
        Args:
            img_size: Nominal input size; only sizes the learned `pos_embed` table (pos_embed='learned'),
                any multiple of patch_size is accepted at run time.
            patch_size: Patch size (int).
            in_chans: Number of input channels.
            num_classes: Number of classes of the head (0 = no head, returns pooled features).
            global_pool: 'token' (class token) or 'avg' (final LayerNorm on all tokens, then mean).
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias: Transformer shape.
            class_token: Use a class token (GAP variants: False).
            peg_positions: Blocks after which a PEG is applied; -1 = on the patch embeddings before block 0;
                () = no PEG.
            peg_kernel: PEG depthwise conv kernel size (odd).
            pos_embed: 'none' (CPVT) or 'learned' (DeiT-style absolute table for img_size, resampled
                bicubically to other grid sizes; ablation baseline).
            norm_eps: LayerNorm epsilon.
            drop_rate: Dropout before the classifier head.
            proj_drop_rate, attn_drop_rate: Dropout after attention/MLP projections, on attention weights.
            drop_path_rate: Stochastic depth rate (linearly increasing over blocks, as in DeiT).
        """
        super().__init__()
        _check_cpvt_args(global_pool, class_token, pos_embed, patch_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.peg_positions = check_peg_positions(peg_positions, depth)
        self.grad_checkpointing = False

        # the creation order (embeddings, blocks, PEGs, head) fixes the state-dict keys and the seeded inits
        self._build_embeddings(img_size, in_chans, class_token, pos_embed)
        self._build_blocks(
            depth, num_heads, mlp_ratio, qkv_bias, norm_eps, proj_drop_rate, attn_drop_rate, drop_path_rate)
        self._build_pegs(peg_kernel)
        self._build_head(norm_eps, drop_rate)
        self.init_weights()

    def _build_embeddings(
            self, img_size: Union[int, Tuple[int, int]], in_chans: int, class_token: bool, pos_embed: PosEmbedType,
    ) -> None:
        """Patch embedding, the optional class token (the prefix token) and the optional learned `pos_embed`."""
        self.num_prefix_tokens = 1 if class_token else 0
        # strict_img_size=False: any size that is a multiple of patch_size (checked in forward_features)
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=self.patch_size, in_chans=in_chans, embed_dim=self.embed_dim,
            strict_img_size=False,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if class_token else None
        if pos_embed == 'learned':
            num_pos = self.patch_embed.num_patches + self.num_prefix_tokens
            self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, self.embed_dim))
        else:
            self.pos_embed = None

    def _build_blocks(
            self,
            depth: int,
            num_heads: int,
            mlp_ratio: float,
            qkv_bias: bool,
            norm_eps: float,
            proj_drop_rate: float,
            attn_drop_rate: float,
            drop_path_rate: float,
    ) -> None:
        """The `depth` transformer blocks, stochastic depth rising linearly over them."""
        dpr = calculate_drop_path_rates(drop_path_rate, depth)  # linear 0 -> drop_path_rate (DeiT)
        self.blocks = nn.ModuleList([
            Block(
                dim=self.embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_eps=norm_eps,
            )
            for i in range(depth)
        ])

    def _build_pegs(self, peg_kernel: int) -> None:
        """One PEG per entry of `peg_positions`, and the block index -> PEG index map the forward uses."""
        self.peg_kernel = peg_kernel
        # pos_block[k] is applied after block peg_positions[k] (-1: before block 0)
        self.pos_block = nn.ModuleList([PEG(self.embed_dim, peg_kernel) for _ in self.peg_positions])
        self._peg_index = {pos: k for k, pos in enumerate(self.peg_positions)}

    def _build_head(self, norm_eps: float, drop_rate: float) -> None:
        """Final LayerNorm, dropout before the classifier, and the classifier (Identity when num_classes=0)."""
        self.norm = LayerNorm(self.embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        """DeiT init: trunc_normal(.02) on Linear weights, cls_token and pos_embed; PEGs init themselves."""
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=.02)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)
        self.apply(_init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # as the official CPVT/Twins models: every PEG parameter (conv weight and bias) and the class token
        skip = {name for name in ('cls_token', 'pos_embed') if getattr(self, name) is not None}
        return skip | {f'pos_block.{n}' for n, _ in self.pos_block.named_parameters()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[GlobalPoolType] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('token', 'avg') or (global_pool == 'token' and self.cls_token is None):
                raise ValueError(f'global_pool {global_pool!r} not valid for this model')
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_linear(self.head)

    def _check_input_size(self, x: torch.Tensor) -> Tuple[int, int]:
        if x.ndim != 4:
            raise ValueError(f'expected an image batch (B, C, H, W), got shape {tuple(x.shape)}')
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p != 0 or W % p != 0:
            raise ValueError(
                f'input size {H}x{W} is not a multiple of the patch size {p}: both sides must be divisible '
                f'by {p} (e.g. {max(p, H // p * p)}x{max(p, W // p * p)})')
        return H // p, W // p

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        grid_size = self._check_input_size(x)
        x = self.patch_embed(x)  # (B, H*W, C)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + H*W, C)
        if self.pos_embed is not None:
            pos_embed = resample_abs_pos_embed(
                self.pos_embed, new_size=list(grid_size), old_size=list(self.patch_embed.grid_size),
                num_prefix_tokens=self.num_prefix_tokens,
            )  # no-op at the nominal size
            x = x + pos_embed
        if -1 in self._peg_index:
            x = self.pos_block[self._peg_index[-1]](x, grid_size, self.num_prefix_tokens)
        return x, grid_size

    def _peg_after(self, i: int, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        k = self._peg_index.get(i)
        return x if k is None else self.pos_block[k](x, grid_size, self.num_prefix_tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid_size = self._embed(x)  # (B, N, C), N = prefix + H*W
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            x = self._peg_after(i, x, grid_size)
        return self.norm(x)  # (B, N, C); 'avg' pooling averages these normalised tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, C)
        else:
            x = x[:, 0]  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)

    @torch.jit.ignore
    def get_attention_maps(
            self, x: torch.Tensor, layers: Optional[Iterable[int]] = None,
    ) -> Dict[int, torch.Tensor]:
        """Softmax attention maps for visualisation: {block index: (B, heads, N, N)}.

        N = num_prefix_tokens + H*W (class token first). `layers` = block indices (negative counts from
        the end); None = all blocks. Runs the blocks up to the last requested one, computing attention
        explicitly there (slow path); the normal forward is unaffected. Call under model.eval() and
        torch.no_grad() for deterministic maps without autograd state.
        """
        depth = len(self.blocks)
        wanted = set(range(depth)) if layers is None else {i % depth if -depth <= i < depth else i for i in layers}
        bad = sorted(i for i in wanted if not 0 <= i < depth)
        if bad:
            raise ValueError(f'layers must be block indices in [-{depth}, {depth - 1}], got {bad}')
        maps: Dict[int, torch.Tensor] = {}
        x, grid_size = self._embed(x)
        for i, blk in enumerate(self.blocks):
            if not wanted - maps.keys():
                break
            if i in wanted:
                x, maps[i] = blk.forward_with_attn(x)
            else:
                x = blk(x)
            x = self._peg_after(i, x, grid_size)
        return maps


def _check_cpvt_args(global_pool: str, class_token: bool, pos_embed: str, patch_size: int) -> None:
    """Reject CPVT arguments that no model can be built from (ValueError naming the argument)."""
    if global_pool not in ('token', 'avg'):
        raise ValueError(f"global_pool must be one of 'token', 'avg', got {global_pool!r}")
    if global_pool == 'token' and not class_token:
        raise ValueError("global_pool='token' needs class_token=True (use global_pool='avg' without it)")
    if pos_embed not in ('none', 'learned'):
        raise ValueError(f"pos_embed must be one of 'none', 'learned', got {pos_embed!r}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f'patch_size must be a positive int, got {patch_size!r}')


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _cfg(**kwargs) -> dict:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2102.10882',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'cpvt_ti': _cfg(),
    'cpvt_s': _cfg(),
    'cpvt_b': _cfg(),
    'cpvt_ti_gap': _cfg(),
    'cpvt_s_gap': _cfg(),
    'cpvt_b_gap': _cfg(),
})


def _create_cpvt(variant: str, pretrained: bool = False, **kwargs) -> CPVT:
    return build_model_with_cfg(CPVT, variant, pretrained, **kwargs)


@register_model
def cpvt_ti(pretrained: bool = False, **kwargs) -> CPVT:
    """CPVT-Ti: DeiT-tiny with a PEG after block 0 instead of the position embedding."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_cpvt('cpvt_ti', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpvt_s(pretrained: bool = False, **kwargs) -> CPVT:
    """CPVT-S: DeiT-small with a PEG after block 0 instead of the position embedding."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_cpvt('cpvt_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpvt_b(pretrained: bool = False, **kwargs) -> CPVT:
    """CPVT-B: DeiT-base with a PEG after block 0 instead of the position embedding."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_cpvt('cpvt_b', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpvt_ti_gap(pretrained: bool = False, **kwargs) -> CPVT:
    """CPVT-Ti-GAP: no class token, final LayerNorm on all tokens then global average pooling."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, class_token=False, global_pool='avg')
    return _create_cpvt('cpvt_ti_gap', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpvt_s_gap(pretrained: bool = False, **kwargs) -> CPVT:
    """CPVT-S-GAP: no class token, final LayerNorm on all tokens then global average pooling."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, class_token=False, global_pool='avg')
    return _create_cpvt('cpvt_s_gap', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpvt_b_gap(pretrained: bool = False, **kwargs) -> CPVT:
    """CPVT-B-GAP: no class token, final LayerNorm on all tokens then global average pooling."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False, global_pool='avg')
    return _create_cpvt('cpvt_b_gap', pretrained=pretrained, **dict(model_args, **kwargs))
