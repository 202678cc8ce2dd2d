"""meProp in transformers: ``MeMultiheadAttention`` and the roles ``convert`` gives projections.

``nn.MultiheadAttention`` computes its in-projection inside ``F.multi_head_attention_forward``
from the packed ``in_proj_weight`` (3E x E), not through an ``nn.Linear``, so swapping linear
layers cannot reach it. ``MeMultiheadAttention`` is a drop-in subclass that computes the same
forward with the in-projection through ``mebp_linear``: in self-attention one product of the
packed 3E outputs, whose top-k is chosen across q, k and v together; with distinct query and
key/value inputs one product per slice of the packed weight, each keeping the same share of its
outputs. The output projection is a child ``nn.Linear``, which ``convert`` swaps for a
``MeLinear`` like any other.
"""

import fnmatch
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .functional import check_options, mebp_linear, resolve_k

ROLES = ("attention", "mlp", "other")
# Name patterns of hand-written transformers (GPT-2, LLaMA, BERT-like naming). The modules of
# nn.MultiheadAttention and nn.Transformer*Layer get their role from their place instead.
DEFAULT_ROLE_PATTERNS = {
    "attention": (
        "*attn*",
        "*attention*",
        "*q_proj",
        "*k_proj",
        "*v_proj",
        "*o_proj",
        "*qkv*",
        "*.query",
        "*.key",
        "*.value",
    ),
    "mlp": (
        "*mlp*",
        "*ffn*",
        "*feed_forward*",
        "*feedforward*",
        "*fc1",
        "*fc2",
        "*up_proj",
        "*down_proj",
        "*gate_proj",
    ),
}
TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _share_of(k, width: int, full: int, label: str) -> int:
    """``k`` given against ``full`` outputs, as a count for a slice of ``width`` of them."""
    count = resolve_k(k, full, label)
    if count == full:
        return width
    return min(width, max(1, round(count * width / full)))


class MeMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose in-projection has a top-k sparsified backward (meProp).

    ``in_proj_k``: ``k`` of the in-projection as a count or ratio of its 3 * embed_dim outputs
    (``None``: ordinary dense back propagation); ``mode`` and ``grad`` as in ``mebp_linear``. With
    distinct query and key/value inputs, or separate q/k/v weights (``kdim``/``vdim`` other than
    ``embed_dim``), each slice keeps the same share of its outputs and its weight gradient is
    dense whatever ``grad`` says (sparse gradients of slices of one Parameter do not add up).
    The output projection ``out_proj`` is a child module: a ``MeLinear`` there (``convert`` puts
    one) gives it meProp too. Forward values equal ``nn.MultiheadAttention``'s.
    """

    def __init__(
        self, embed_dim, num_heads, *args, in_proj_k=0.05, mode="unified", grad="dense", **kwargs
    ):
        super().__init__(embed_dim, num_heads, *args, **kwargs)
        self._setup(in_proj_k, mode, grad)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, *, in_proj_k=0.05, mode="unified", grad="dense"):
        """A MeMultiheadAttention sharing ``mha``'s Parameter and child module objects."""
        if type(mha) is not nn.MultiheadAttention:
            raise TypeError(f"from_mha needs an nn.MultiheadAttention, got {type(mha).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        # Its settings (embed_dim, num_heads, batch_first, bias_k, ...), not its hooks.
        layer.__dict__.update(
            {
                key: value
                for key, value in mha.__dict__.items()
                if not key.startswith("_") or key == "_qkv_same_embed_dim"
            }
        )
        for key in ("_parameters", "_buffers", "_modules"):
            getattr(layer, key).update(getattr(mha, key))
        layer._setup(in_proj_k, mode, grad)
        return layer

    def _setup(self, in_proj_k, mode, grad):
        check_options(mode, grad)
        if in_proj_k is not None:
            resolve_k(in_proj_k, 3 * self.embed_dim, "the in-projection (3 * embed_dim outputs)")
        self.in_proj_k, self.mode, self.grad = in_proj_k, mode, grad

    @property
    def in_proj_k_count(self):
        """The in-projection's ``k`` as a count of its 3 * embed_dim outputs (None: dense)."""
        if self.in_proj_k is None:
            return None
        return resolve_k(self.in_proj_k, 3 * self.embed_dim, "the in-projection")

    def _project(self, x, weight, bias, width, packed):
        """One in-projection product: ``width`` outputs of the 3E-wide packed projection."""
        if self.in_proj_k is None:
            return F.linear(x, weight, bias)
        full = 3 * self.embed_dim
        k = _share_of(self.in_proj_k, width, full, "the in-projection")
        return mebp_linear(
            x, weight, bias, k=k, mode=self.mode, grad=self.grad if packed else "dense"
        )

    def _in_projection(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E : 2 * E], b[2 * E :])
        if not self._qkv_same_embed_dim:
            return (
                self._project(query, self.q_proj_weight, bq, E, False),
                self._project(key, self.k_proj_weight, bk, E, False),
                self._project(value, self.v_proj_weight, bv, E, False),
            )
        w = self.in_proj_weight
        if key is value and query is key:
            return self._project(query, w, b, 3 * E, True).chunk(3, dim=-1)
        q = self._project(query, w[:E], bq, E, False)
        if key is value:
            kv = self._project(key, w[E:], None if b is None else b[E:], 2 * E, False)
            return (q,) + kv.chunk(2, dim=-1)
        return (
            q,
            self._project(key, w[E : 2 * E], bk, E, False),
            self._project(value, w[2 * E :], bv, E, False),
        )

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        # The steps of F.multi_head_attention_forward (torch 2.x), with our in-projection.
        is_batched = F._mha_shape_check(  # type: ignore[attr-defined]  # private, not in the stubs
            query, key, value, key_padding_mask, attn_mask, self.num_heads
        )
        if self.batch_first and is_batched:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not is_batched:
            same_kv, same_qk = key is value, query is key
            query = query.unsqueeze(1)
            key = query if same_qk else key.unsqueeze(1)
            value = key if same_kv else value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"query has {embed_dim} features, expected embed_dim={self.embed_dim}")
        heads, head_dim = self.num_heads, self.head_dim
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)"
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False

        q, k, v = self._in_projection(query, key, value)
        src_len = k.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, "
                        f"but should be {(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif tuple(attn_mask.shape) != (bsz * heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, "
                    f"but should be {(bsz * heads, tgt_len, src_len)}."
                )
        if self.bias_k is not None and self.bias_v is not None:  # both or neither
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = k.new_zeros(bsz * heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise RuntimeError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                    f"expected {(bsz, src_len)}"
                )
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, heads, -1, -1)
                .reshape(bsz * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = q * math.sqrt(1.0 / float(head_dim))
            scores = (
                torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
                if attn_mask is not None
                else torch.bmm(scores, k.transpose(-2, -1))
            )
            weights = scores.softmax(dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                attn_mask = (
                    attn_mask.unsqueeze(0)
                    if attn_mask.size(0) == 1
                    else attn_mask.view(bsz, heads, -1, src_len)
                )
            out = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, head_dim),
                k.view(bsz, heads, src_len, head_dim),
                v.view(bsz, heads, src_len, head_dim),
                attn_mask,
                dropout_p,
                is_causal,
            )
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            weights = None
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(1, 0)
        return out, weights

    def extra_repr(self) -> str:
        return f"in_proj_k={self.in_proj_k}, mode={self.mode}, grad={self.grad}"


# ---------------------------------------------------------------------------------------------
# Roles of projections, for convert's per-role options and its report


def linear_roles(model: nn.Module, patterns=None) -> dict:
    """``{qualified name: role}`` of the model's linear layers: "attention", "mlp" or "other".

    An ``nn.MultiheadAttention``'s ``out_proj`` is "attention" and an ``nn.Transformer*Layer``'s
    ``linear1``/``linear2`` are "mlp", by their place. Any other layer takes the role whose name
    patterns (``patterns``, or ``DEFAULT_ROLE_PATTERNS``; shell-style, matched against the
    qualified name) it matches first, attention before mlp.
    """
    patterns = DEFAULT_ROLE_PATTERNS if patterns is None else patterns
    unknown = set(patterns) - {"attention", "mlp"}
    if unknown:
        raise ValueError(
            f"roles must map 'attention' and/or 'mlp' to name patterns, got {sorted(unknown)}"
        )
    roles = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            roles[f"{prefix}out_proj"] = "attention"
        elif isinstance(module, TRANSFORMER_LAYERS):
            roles[f"{prefix}linear1"] = roles[f"{prefix}linear2"] = "mlp"
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in roles:
            roles[name] = next(
                (
                    role
                    for role in ("attention", "mlp")
                    for p in _as_tuple(patterns.get(role, ()))
                    if fnmatch.fnmatchcase(name, p)
                ),
                "other",
            )
    return roles


def _as_tuple(patterns):
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def k_for_role(role: str, k, attention_k, mlp_k):
    """The ``k`` a layer of ``role`` gets: the role's own if given, else the common one."""
    if role == "attention" and attention_k is not None:
        return attention_k
    if role == "mlp" and mlp_k is not None:
        return mlp_k
    return k


def is_number_k(k) -> bool:
    return isinstance(k, numbers.Real) and not isinstance(k, bool)
