"""Architecture description: the shapes a cost evaluator or a space needs, without weights.

Built from a torch model (a meta-device model works too), JSON round-trips, and turns a
Recipe into the effective per-tensor formats (with the llama.cpp-style fallbacks applied).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from llmpareto.families import _BY_MODEL_TYPE, FAMILIES
from llmpareto.formats import effective_format
from llmpareto.recipe import Recipe
from llmpareto.structure import check_structure, mlp_width, per_block

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Tensor2D:
    fqn: str  # module name, e.g. model.layers.3.mlp.down_proj
    rows: int  # out_features (or vocab for embeddings)
    cols: int  # in_features (or hidden size); quantization blocks run along it
    layer: int | None  # transformer block index, None for embeddings/head
    kind: str  # projection kind: self_attn.q_proj, mlp.down_proj, embed, lm_head

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass
class Arch:
    linears: list[Tensor2D]
    embedding: Tensor2D
    lm_head: Tensor2D | None  # None when tied to the embedding (one tensor in memory)
    other_params: int  # norms and biases, kept in f32
    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    n_heads: int = 0  # attention heads (query); 0 in descriptions written before it existed
    layer_other_params: int = 0  # norms/biases inside one block (dropped with the block)
    source_bytes_per_weight: float = 4.0  # what an uncompressed tensor costs (f32 in torch)
    extra: dict = field(default_factory=dict)
    family: str | None = None  # llmpareto.families name; None for a model no family describes
    # per block, the most tokens llama.cpp keeps in its KV cache (a sliding-window layer of a
    # family that runs it so: its window; 0: every token of the context)
    kv_windows: list[int] = field(default_factory=list)
    # per block, its KV heads when blocks differ (a per-block student); empty: n_kv_heads each
    kv_heads_per_block: list[int] = field(default_factory=list)

    @property
    def kv_heads_of_blocks(self) -> list[int]:
        """The KV heads of every block, in order."""
        return list(self.kv_heads_per_block) or [self.n_kv_heads] * self.n_layers

    @property
    def kv_heads_total(self) -> int:
        """KV heads summed over blocks (layers x KV heads when blocks are alike)."""
        return sum(self.kv_heads_of_blocks)

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV head (a student keeps whole groups: the teacher's ratio)."""
        return max(1, (self.n_heads or self.n_kv_heads) // max(self.n_kv_heads, 1))

    def kv_head_tokens(self, context: int) -> int:
        """KV heads x tokens held, summed over blocks at `context` (a sliding block holds
        min(context, window) tokens)."""
        caps = self.kv_windows or [0] * self.n_layers
        return sum(k * (min(context, c) if c else context)
                   for k, c in zip(self.kv_heads_of_blocks, caps))

    def kv_tokens(self, context: int) -> int:
        """Tokens held in the KV cache summed over blocks at `context` (layers x context when
        no block slides; a sliding block holds min(context, window))."""
        caps = self.kv_windows or [0] * self.n_layers
        return sum(min(context, c) if c else context for c in caps)

    @property
    def tensors(self) -> list[Tensor2D]:
        """Every tensor a recipe may choose a format for."""
        heads = [self.lm_head] if self.lm_head is not None else []
        return [self.embedding, *heads, *self.linears]

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors) + self.other_params

    @property
    def intermediate_size(self) -> int | None:
        """The MLP width of the first block (the teacher's, before any restructure)."""
        return next((t.cols for t in self.linears if t.kind == "mlp.down_proj"), None)

    def restructure(self, structure: dict | None) -> Arch:
        """The architecture a recipe's `structure` leaves: kept blocks, a narrower MLP
        (`mlp_ratio`), fewer attention groups (`heads`), each either one value for every block
        or one per kept block; self if none."""
        s = {k: v for k, v in (structure or {}).items() if v is not None}
        if not s:
            return self
        check_structure(s, self.n_layers, self.n_kv_heads, self.intermediate_size)
        if self.family is not None:
            FAMILIES[self.family].check_cuts(s)
        n, kv = self.n_layers, self.n_kv_heads
        ratios = per_block(s, "mlp_ratio", n, 1.0)
        heads = per_block(s, "heads", n, kv)
        kept = sorted(ratios)
        per = self.q_per_kv
        linears = [t for t in self.linears if t.layer in ratios]
        inter = self.intermediate_size
        if inter is not None:
            def mlp(t: Tensor2D) -> Tensor2D:
                k = mlp_width(inter, ratios[t.layer])
                t = _narrow(t, k, inter, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
                # a fused gate/up tensor holds both halves: 2 x inter rows
                return _narrow(t, 2 * k, 2 * inter, "mlp.gate_up_proj", None, None)
            linears = [mlp(t) for t in linears]

        def attn(t: Tensor2D) -> Tensor2D:
            h = heads[t.layer]
            if h == kv:
                return t
            hd = self.head_dim
            t = _narrow(t, h * per * hd, kv * per * hd, "self_attn.q_proj", None,
                        "self_attn.o_proj")
            return _narrow(t, h * hd, kv * hd, "self_attn.k_proj", "self_attn.v_proj", None)
        kv_list = [heads[i] for i in kept]
        widest = max(kv_list)
        return replace(self, linears=[attn(t) for t in linears], n_layers=len(kept),
                       other_params=self.other_params - (n - len(kept)) * self.layer_other_params,
                       kv_windows=[c for i, c in enumerate(self.kv_windows) if i in ratios],
                       n_kv_heads=widest, n_heads=self.n_heads if widest == kv else widest * per,
                       kv_heads_per_block=kv_list if len(set(kv_list)) > 1 else [])

    def formats_for(self, recipe: Recipe) -> dict[str, str | None]:
        """fqn -> the format each tensor really gets (None: left as it is), for the tensors
        the recipe's structure keeps. A pruned projection with no format is stored as f16
        (its zeros need a stored format; f16 is what its export holds)."""
        out: dict[str, str | None] = {}
        pruned = self.sparsity_for(recipe)
        for t in self.restructure(recipe.structure).tensors:
            fmt = recipe.format_of(t.fqn) or ("f16" if t.fqn in pruned else None)
            out[t.fqn] = effective_format(fmt, t.cols) if fmt else None
        return out

    def sparsity_for(self, recipe: Recipe) -> dict[str, tuple[str, float]]:
        """fqn -> (pattern, level) of each pruned block projection the structure keeps;
        embeddings and the output head are never pruned."""
        out = {}
        for t in self.restructure(recipe.structure).linears:
            sp = recipe.sparsity_of(t.fqn)
            if sp is not None:
                out[t.fqn] = sp
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Arch:
        d = dict(d)
        d["linears"] = [Tensor2D(**t) for t in d["linears"]]
        d["embedding"] = Tensor2D(**d["embedding"])
        d["lm_head"] = Tensor2D(**d["lm_head"]) if d.get("lm_head") else None
        return cls(**d)

    @classmethod
    def from_model(cls, model) -> Arch:
        import torch

        cfg = model.config
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        emb_name = names[id(emb)]
        tied = head is None or head.weight is emb.weight
        covered = {id(emb.weight)} | ({id(head.weight)} if head is not None else set())
        linears = []
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod is not head:
                m = _LAYER_RE.search(f".{name}.")
                if m is None:
                    continue  # only transformer-block projections are searched
                kind = name[m.end() - 1:] if m.end() - 1 < len(name) else name
                linears.append(Tensor2D(name, mod.out_features, mod.in_features,
                                        int(m.group(1)), kind))
                covered.add(id(mod.weight))
        other = sum(p.numel() for p in model.parameters() if id(p) not in covered)
        layers = _find_layers(model)
        per_layer = 0
        if layers is not None and len(layers):
            per_layer = sum(p.numel() for p in layers[0].parameters() if id(p) not in covered)
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        family, windows = _family_and_windows(cfg)
        return cls(
            linears=linears,
            embedding=Tensor2D(emb_name, emb.num_embeddings, emb.embedding_dim, None, "embed"),
            lm_head=None if tied else Tensor2D(names[id(head)], head.out_features,
                                               head.in_features, None, "lm_head"),
            other_params=int(other),
            n_layers=cfg.num_hidden_layers,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=int(head_dim),
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            n_heads=n_heads,
            layer_other_params=int(per_layer),
            family=family,
            kv_windows=windows,
        )

    @classmethod
    def from_config(cls, config) -> Arch:
        """Shapes only: the model is built on the meta device, so no memory is used and a
        70B config costs as little as a 135M one."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model)


def _family_and_windows(cfg) -> tuple[str | None, list[int]]:
    """The family of a config (None if no family describes it) and its blocks' KV caps."""
    fam = _BY_MODEL_TYPE.get(getattr(cfg, "model_type", "") or "")
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    types = list(getattr(cfg, "layer_types", None) or [])
    if fam is None or not fam.kv_sliding or not window or len(types) != n:
        return (fam.name if fam else None), [0] * n
    return fam.name, [int(window) if t == "sliding_attention" else 0 for t in types]


def _narrow(t: Tensor2D, new: int, old: int, row_kind: str, row_kind2: str | None,
            col_kind: str | None) -> Tensor2D:
    """`t` with `old` rows (for the row kinds) or columns (for the column kind) cut to `new`."""
    if t.kind in (row_kind, row_kind2) and t.rows == old:
        return replace(t, rows=new)
    if t.kind == col_kind and t.cols == old:
        return replace(t, cols=new)
    return t


def _find_layers(model):
    inner = getattr(model, "model", None)
    return getattr(inner, "layers", None)
