r"""LoRA on the top ``k`` layers of a BERT-family encoder; the frozen layers below run once per example.

With PEFT ``layers_to_transform = [L-k, ..., L-1]`` the adapters sit on the top ``k`` of the ``L``
encoder layers. The embeddings and layers ``0 .. L-k-1`` are frozen, so the hidden state entering
layer ``L-k``,

.. math::
    h(x) = (\ell_{L-k-1} \circ \dots \circ \ell_0 \circ \mathrm{emb})(x),

does not depend on any trainable tensor. :class:`TopLayersForward` computes :math:`h(x)` once per
example (eval mode, ``no_grad``), keeps it in a :class:`LowerLayerCache` keyed by the example's
tokens, and from then on runs only the top ``k`` layers, the pooler and the head. Two more savings,
both exact:

- the **last layer at the first ([CLS]) position only**: the pooler reads nothing else, so the last
  layer needs the keys and values of every token but the query, attention output and feed-forward
  block of one token;
- the **frozen projections of the first adapted layer** (``cache_projections``): its input
  :math:`h(x)` is fixed, so the key :math:`W_K h` (not adapted) and the base part :math:`W_0 h` of an
  adapted query/value are cached too; the LoRA term :math:`s\,B A h` is added at run time (PEFT's
  formula; projections with a LoRA variant such as DoRA are recomputed instead).

**Exactness.** The logits, and their gradients with respect to the adapters and the head, are those
of the full PEFT model *with its lower layers in eval mode*, up to float rounding (tested). In train
mode the full model would also apply dropout inside the frozen lower layers (MiniLM: 0.1); the
cached model treats them as a deterministic feature map (dropout in frozen layers only adds noise to
the features; set their dropout to 0 for an exact match in train mode). The top layers keep their
dropout. Full-depth LoRA (``adapt_top_layers=None``) runs the whole model at every step.

**Speed** (MiniLM, CPU, batch 32, tweets of ~33 tokens): a training step with ``k = 1`` costs about
a tenth of ``k = 2`` and a small fraction of full depth; the lower layers cost one forward pass per
example, once.

**Memory:** per example one ``(tokens, hidden)`` tensor, plus one per cached projection (MiniLM,
5,000 tweets: about 250 MB each, on the model's device).

Supported: BERT-family sequence classifiers (``BertForSequenceClassification`` layout:
``<prefix>.embeddings``, ``<prefix>.encoder.layer``, a pooler that reads the first token, then
``dropout`` and ``classifier``), absolute position embeddings, right-padded batches.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TopLayersForward", "LowerLayerCache", "lora_layer_indices"]

PROJECTIONS = ("query", "key", "value")


def lora_layer_indices(model: nn.Module, layers: nn.ModuleList) -> list[int]:
    """Indices of the encoder ``layers`` that hold a LoRA module."""
    from peft.tuners.lora import LoraLayer

    return [i for i, layer in enumerate(layers) if any(isinstance(m, LoraLayer) for m in layer.modules())]


class LowerLayerCache:
    """Tensors per example, keyed by the example's token ids (and token types): filled on first sight.

    Attributes:
        computed: examples whose lower layers were run (cache misses).
        lookups: examples read from the cache.
    """

    def __init__(self) -> None:
        self._store: dict[bytes, tuple[Tensor, ...]] = {}
        self.computed = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: bytes) -> bool:
        return key in self._store

    def put(self, key: bytes, tensors: tuple[Tensor, ...]) -> None:
        self._store[key] = tensors
        self.computed += 1

    def get(self, key: bytes) -> tuple[Tensor, ...]:
        self.lookups += 1
        return self._store[key]

    def clear(self) -> None:
        self._store.clear()


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every module (and its children) in eval mode inside the block, the previous modes restored after."""
    saved = [(m, m.training) for top in modules for m in top.modules()]
    for top in modules:
        top.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, L)`` boolean token mask to the additive attention mask ``(B, 1, 1, L)``."""
    return (~mask)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


def _plain_lora(m: nn.Module) -> bool:
    """A PEFT LoRA ``Linear`` whose output is ``base(x) + sum_a s_a B_a A_a dropout(x)``."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(m, LoraLinear) or m.merged or m.disable_adapters:
        return False
    return not any(a in getattr(m, "lora_variant", {}) for a in m.active_adapters)


def _lora_term(m: nn.Module, x: Tensor) -> Tensor | float:
    """:math:`\\sum_a s_a B_a A_a\\,\\mathrm{dropout}(x)` over the active adapters of a plain LoRA ``Linear``."""
    out: Tensor | float = 0.0
    for a in m.active_adapters:
        if a in m.lora_A:
            A, B = m.lora_A[a], m.lora_B[a]
            out = out + B(A(m.lora_dropout[a](x.to(A.weight.dtype)))) * m.scaling[a]
    return out


class TopLayersForward:
    r"""Logits of a PEFT BERT-family classifier whose adapters sit on its top ``k`` layers only,
    the lower layers' output cached per example (module docstring).

    Not an ``nn.Module``: it holds references to the PEFT model's own submodules (no parameter of
    its own, nothing in any ``state_dict``).

    Args:
        peft_model: the PEFT model (``get_peft_model(BertForSequenceClassification, LoraConfig(
            layers_to_transform=...))``).
        num_layers: ``k``, the number of top layers that carry adapters (1 .. L).
        cache_projections: cache the frozen projections of the first adapted layer too.
        cache: a :class:`LowerLayerCache` to share (e.g. across seeds of the same base model).
    """

    def __init__(self, peft_model: nn.Module, num_layers: int, *, cache_projections: bool = True,
                 cache: LowerLayerCache | None = None) -> None:
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        encoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
        layout = (encoder is not None and hasattr(encoder, "embeddings") and hasattr(encoder, "encoder")
                  and hasattr(encoder.encoder, "layer") and getattr(encoder, "pooler", None) is not None
                  and hasattr(base, "classifier") and hasattr(base, "dropout"))
        if not layout:
            raise ValueError(f"Invalid adapt_top_layers: {type(base).__name__} is not a BERT-family sequence "
                             "classifier (<prefix>.embeddings, <prefix>.encoder.layer, a pooler, dropout, classifier); "
                             "use adapt_top_layers=None (full-depth LoRA)")
        config = base.config
        if getattr(config, "is_decoder", False) or getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("Invalid adapt_top_layers: only encoders with absolute position embeddings are supported "
                             f"(got is_decoder={config.is_decoder}, position_embedding_type="
                             f"{getattr(config, 'position_embedding_type', None)!r})")
        layers = encoder.encoder.layer
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= len(layers):
            raise ValueError(f"Invalid adapt_top_layers: {num_layers!r} (expected an integer in [1, {len(layers)}])")
        self.first = len(layers) - num_layers
        adapted = lora_layer_indices(peft_model, layers)
        if any(i < self.first for i in adapted):
            raise ValueError(f"Invalid adapt_top_layers: LoRA modules in layers {adapted}, below the top {num_layers} "
                             "(build the LoraConfig with layers_to_transform)")
        self.num_layers = num_layers
        self.embeddings, self.layers, self.pooler = encoder.embeddings, layers, encoder.pooler
        self.dropout, self.classifier = base.dropout, base.classifier
        first_only = num_layers == 1   # the first adapted layer is also the last: its query at [CLS] only
        sa = layers[self.first].attention.self
        wanted = [n for n in PROJECTIONS if not (first_only and n == "query")] if cache_projections else []
        self.projections = [n for n in wanted if _plain_lora(getattr(sa, n))
                            or (type(getattr(sa, n)) is nn.Linear and not getattr(sa, n).weight.requires_grad)]
        self.cache = cache if cache is not None else LowerLayerCache()

    # -- the lower layers, once per example ---------------------------------------------------------
    @staticmethod
    def _keys(input_ids: Tensor, lengths: Tensor, token_type_ids: Tensor | None) -> list[bytes]:
        ids = input_ids.detach().cpu().numpy()
        types = None if token_type_ids is None else token_type_ids.detach().cpu().numpy()
        keys = []
        for i, n in enumerate(lengths.tolist()):
            key = ids[i, :n].tobytes()
            if types is not None and types[i, :n].any():
                key += b"|" + types[i, :n].tobytes()
            keys.append(key)
        return keys

    @torch.no_grad()
    def _compute(self, input_ids: Tensor, mask: Tensor, token_type_ids: Tensor | None) -> list[tuple[Tensor, ...]]:
        """Hidden state entering layer ``first`` (and the cached projections) of each row, unpadded."""
        with _eval_mode([self.embeddings, *self.layers[: self.first + 1]]):
            h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            ext = _additive_mask(mask, h.dtype)
            for layer in self.layers[: self.first]:
                h = layer(h, attention_mask=ext)
            sa = self.layers[self.first].attention.self
            projs = [(getattr(sa, n).base_layer if _plain_lora(getattr(sa, n)) else getattr(sa, n))(h)
                     for n in self.projections]
        lengths = mask.sum(1).tolist()
        return [tuple(t[i, :n].clone() for t in (h, *projs)) for i, n in enumerate(lengths)]

    def _gather(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None
                ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(mask, prefix):
            raise ValueError("Invalid batch: adapt_top_layers needs right-padded inputs (each attention_mask row "
                             "1...1 0...0); set the tokenizer's padding_side='right'")
        keys = self._keys(input_ids, lengths, token_type_ids)
        new: dict[bytes, int] = {}   # first row of each example not cached yet
        for i, k in enumerate(keys):
            if k not in self.cache and k not in new:
                new[k] = i
        if new:
            sub = torch.tensor(list(new.values()), device=input_ids.device)
            width = int(lengths[sub].max())
            out = self._compute(input_ids[sub, :width], mask[sub, :width],
                                None if token_type_ids is None else token_type_ids[sub, :width])
            for key, tensors in zip(new, out):
                self.cache.put(key, tensors)
        entries = [self.cache.get(k) for k in keys]
        device = input_ids.device
        padded = [nn.utils.rnn.pad_sequence([e[j].to(device) for e in entries], batch_first=True)
                  for j in range(len(entries[0]))]
        width = padded[0].shape[1]
        return padded[0], dict(zip(self.projections, padded[1:])), mask[:, :width]

    def fill_cache(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                   token_type_ids: Tensor | None = None, **unused) -> None:
        """Run the lower layers for the examples of a batch not cached yet (length-sorted batches
        waste the least compute on padding)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._gather(input_ids, attention_mask, token_type_ids)

    # -- the adapted layers ------------------------------------------------------------------------
    @staticmethod
    def _project(m: nn.Module, x: Tensor, cached: Tensor | None) -> Tensor:
        if cached is None:
            return m(x)
        return cached + _lora_term(m, x) if _plain_lora(m) else cached

    def _layer(self, layer: nn.Module, h: Tensor, ext: Tensor, cached: dict[str, Tensor], first_only: bool) -> Tensor:
        """One BERT layer (eager attention, so double backward works), at every position or at the
        first only."""
        sa = layer.attention.self
        B, L, D = h.shape
        nh, hd = sa.num_attention_heads, sa.attention_head_size
        hq = h[:, :1] if first_only else h
        q = self._project(sa.query, hq, None if first_only else cached.get("query"))
        k = self._project(sa.key, h, cached.get("key"))
        v = self._project(sa.value, h, cached.get("value"))
        q = q.view(B, -1, nh, hd).transpose(1, 2)
        k = k.view(B, L, nh, hd).transpose(1, 2)
        v = v.view(B, L, nh, hd).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) * sa.scaling + ext, dim=-1)
        w = nn.functional.dropout(w, p=sa.dropout.p, training=sa.training)
        ctx = (w @ v).transpose(1, 2).reshape(B, hq.shape[1], D)
        a = layer.attention.output(ctx, hq)
        return layer.output(layer.intermediate(a), a)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None, **unused) -> Tensor:
        """Class logits ``(B, K)`` of a tokenised batch."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h, cached, mask = self._gather(input_ids, attention_mask, token_type_ids)
        ext = _additive_mask(mask, h.dtype)
        top = self.layers[self.first:]
        for j, layer in enumerate(top):
            h = self._layer(layer, h, ext, cached if j == 0 else {}, first_only=j == len(top) - 1)
        return self.classifier(self.dropout(self.pooler(h)))
