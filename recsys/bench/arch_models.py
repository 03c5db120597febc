"""The over-arches that ``recsys bench archs`` times, built from the pure-torch layers of
:mod:`recsys.modules` with each spec's defaults (DLRM's and DeepFM's interactions written out
here: their registry archs use torchrec). Each maps ``(pooled (B, m·D), dense (B, n))`` to
``(logit (B,), auxiliary loss or None)``; :func:`build_arch` makes one by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from recsys.modules.cross import CrossNet
from recsys.modules.dynint import DynamicPIN
from recsys.modules.fields import FieldStack, FieldSubset
from recsys.modules.mlp import MLP
from recsys.modules.moe import AdaEnsemble
from recsys.modules.pin import PolynomialInteractionNetwork, XDeepIntReadout
from recsys.modules.ranktower import DSSMNet, RankTowerNet

# the Criteo shape: 26 categorical fields (pooled, dim 16) and 13 integer (dense) features
NUM_FIELDS = 26
DIM = 16
NUM_DENSE = 13

# the defaults every arch shares (recsys/models/archs/base.py, mlp.py) and the spec settings
DENSE_HIDDEN = [64]  # model.dense_arch
TOWER = [256, 128, 64]  # model.mlp.hidden
DCN_LAYERS = 3  # model.dcn.num_layers (full rank)
PIN = {"num_layers": 4, "subspaces": 1}  # [model.pin] defaults (the pin arch has no spec file)
XDEEPINT_PIN = {"num_layers": 4, "subspaces": 4}  # specs/xdeepint.toml
DYNINT_PIN = {"num_layers": 3, "subspaces": 4}  # specs/dynint.toml
DYNINT_MODES = {"dynint": ("A1", "B1"), "dynint-B2": ("A1", "B2"), "dynint-B3": ("A1", "B3"),
                "dynint-B4": ("A1", "B4"), "dynint-static": ("none", "none")}
TOWERS = {"heads": 4, "head_dim": 32, "hidden": [128]}  # specs/ranktower.toml
USER_FIELDS = 13  # sparse fields 0..12 (and every dense feature) feed the user tower

ARCHS = ("mlp", "dcn", "pin", "xdeepint", *DYNINT_MODES, "moe", "dlrm", "deepfm", "ranktower",
         "dssm")


# ---- the over-arches ------------------------------------------------------------------------------

Output = tuple[torch.Tensor, torch.Tensor | None]  # (logit (B,), auxiliary loss or None)


class ConcatInput(nn.Module):
    """``[pooled ; MLP(dense)]`` ``(B, width + dense_hidden[-1])``, as the ``mlp``/``dcn``/
    ``deepfm`` archs' ConcatInput.

    Example:
        >>> ConcatInput(32, 3, [8])(torch.randn(4, 32), torch.randn(4, 3)).shape
        torch.Size([4, 40])
    """

    def __init__(self, width: int, num_dense: int, dense_hidden: list[int]) -> None:
        super().__init__()
        self.dense_arch = MLP(num_dense, dense_hidden)
        self.out_features = width + self.dense_arch.out_features

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([pooled, self.dense_arch(dense)], dim=1)


class CrossInput(nn.Module):
    """:class:`ConcatInput` through a DCN-v2 cross network (same width out)."""

    def __init__(self, concat: ConcatInput, num_layers: int) -> None:
        super().__init__()
        self.concat = concat
        self.cross = CrossNet(concat.out_features, num_layers)
        self.out_features = concat.out_features

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.cross(self.concat(pooled, dense))


class PINInput(nn.Module):
    """Stacked fields -> PIN -> flattened ``(B, out_fields · out_dim)``."""

    def __init__(self, fields: FieldStack, pin: PolynomialInteractionNetwork) -> None:
        super().__init__()
        self.fields = fields
        self.pin = pin
        self.out_features = pin.out_fields * pin.out_dim

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.pin(self.fields(pooled, dense)).flatten(1)


def fm_second_order(fields: torch.Tensor) -> torch.Tensor:
    """``(B, m, D) -> (B,)``: ``Σ_{i<j} <v_i, v_j> = ½ Σ_d [(Σ_i v_{i,d})² − Σ_i v_{i,d}²]``.

    Example:
        >>> fm_second_order(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))  # 1·3 + 2·4
        tensor([11.])
    """
    return 0.5 * (fields.sum(dim=1).pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1)


class DeepTower(nn.Module):
    """An input block -> MLP tower -> one logit; with ``fm``, plus the FM term of the pooled
    fields (DeepFM).

    Example:
        >>> tower = DeepTower(ConcatInput(32, 3, [8]), [16])
        >>> tower(torch.randn(4, 32), torch.randn(4, 3))[0].shape
        torch.Size([4])
    """

    def __init__(self, inputs: nn.Module, hidden: list[int], fm: bool = False,
                 dim: int = DIM) -> None:
        super().__init__()
        self.inputs = inputs
        self.deep = MLP(int(inputs.out_features), hidden)
        self.head = nn.Linear(self.deep.out_features, 1)
        self.fm = fm
        self.dim = dim

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> Output:
        logit = self.head(self.deep(self.inputs(pooled, dense))).squeeze(-1)
        if self.fm:
            logit = logit + fm_second_order(pooled.view(pooled.shape[0], -1, self.dim))
        return logit, None


class DotInteraction(nn.Module):
    """torchrec's DLRM ``InteractionArch`` in pure torch: ``(d (B, D), e (B, F, D))`` ->
    ``[d ; <x_i, x_j> for i < j]`` over ``x = [d ; e_1 .. e_F]``, ``(B, D + F + F(F-1)/2)``.

    The pairs are in torchrec's order (``triu_indices(F+1, F+1, 1)``, row-major), taken with one
    ``index_select`` of the flattened Gram matrix: its backward is an ``index_add``.

    Example:
        >>> DotInteraction(3)(torch.randn(2, 4), torch.randn(2, 3, 4)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_sparse: int) -> None:
        super().__init__()
        n = num_sparse + 1
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("pairs", rows * n + cols, persistent=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = torch.cat([dense.unsqueeze(1), sparse], dim=1)
        gram = torch.bmm(x, x.transpose(1, 2))
        return torch.cat([dense, gram.flatten(1).index_select(1, self.pairs)], dim=1)


class DLRMInput(nn.Module):
    """DLRM below the tower: dense arch (an MLP whose last layer is D, ReLU throughout, as
    torchrec's ``DenseArch``) and the dot interaction with the ``F`` pooled fields."""

    def __init__(self, num_fields: int, dim: int, num_dense: int,
                 dense_hidden: list[int]) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.dim = dim
        self.dense_arch = MLP(num_dense, [*dense_hidden, dim])
        self.interaction = DotInteraction(num_fields)
        self.out_features = dim + num_fields + num_fields * (num_fields - 1) // 2

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        sparse = pooled.view(pooled.shape[0], self.num_fields, self.dim)
        return self.interaction(self.dense_arch(dense), sparse)


class ReadoutArch(nn.Module):
    """Stacked fields -> an interaction network -> xDeepInt's readout (``xdeepint``, ``dynint``)."""

    def __init__(self, fields: FieldStack, interaction: nn.Module) -> None:
        super().__init__()
        self.fields = fields
        self.pin = interaction
        self.readout = XDeepIntReadout(int(interaction.out_fields), 1)

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> Output:
        return self.readout(self.pin(self.fields(pooled, dense)))[:, 0], None


class MoEArch(nn.Module):
    """Stacked fields -> AdaEnsemble: its logit and its weighted router losses."""

    def __init__(self, fields: FieldStack, ensemble: AdaEnsemble) -> None:
        super().__init__()
        self.fields = fields
        self.ensemble = ensemble

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> Output:
        logits, aux = self.ensemble(self.fields(pooled, dense))
        return logits[:, 0], aux


class TwoTowerArch(nn.Module):
    """User and item fields (``FieldSubset``) -> ``net.score(user_tower, item_tower)``."""

    def __init__(self, dims: list[int], dim: int, dense_hidden: list[int], num_dense: int,
                 user_fields: int, make_net: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.user_inputs = FieldSubset(dims, list(range(user_fields)), list(range(num_dense)),
                                       dim, dense_hidden)
        self.item_inputs = FieldSubset(dims, list(range(user_fields, len(dims))), [], dim,
                                       dense_hidden)
        self.net = make_net(self.user_inputs.num_fields, self.item_inputs.num_fields)

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> Output:
        user = self.net.user_tower(self.user_inputs(pooled, dense))
        item = self.net.item_tower(self.item_inputs(pooled, dense))
        return self.net.score(user, item), None


def build_arch(name: str, num_fields: int = NUM_FIELDS, dim: int = DIM,
               num_dense: int = NUM_DENSE) -> nn.Module:
    """The over-arch ``name`` (one of :data:`ARCHS`): ``forward(pooled (B, m·D), dense (B, n))
    -> (logit (B,), aux loss or None)``.

    Example:
        >>> logit, aux = build_arch("dlrm")(torch.randn(8, 26 * 16), torch.randn(8, 13))
        >>> logit.shape, aux
        (torch.Size([8]), None)
    """
    dims = [dim] * num_fields
    width = num_fields * dim

    def stack() -> FieldStack:
        return FieldStack(dims, dim, num_dense, DENSE_HIDDEN)

    if name == "mlp":
        return DeepTower(ConcatInput(width, num_dense, DENSE_HIDDEN), TOWER)
    if name == "dcn":
        return DeepTower(CrossInput(ConcatInput(width, num_dense, DENSE_HIDDEN), DCN_LAYERS),
                         TOWER)
    if name == "pin":
        fields = stack()
        return DeepTower(PINInput(fields, PolynomialInteractionNetwork(fields.num_fields, dim,
                                                                       **PIN)), TOWER)
    if name == "xdeepint":
        fields = stack()
        return ReadoutArch(fields, PolynomialInteractionNetwork(fields.num_fields, dim,
                                                                **XDEEPINT_PIN))
    if name in DYNINT_MODES:
        fields = stack()
        activation, parameter = DYNINT_MODES[name]
        return ReadoutArch(fields, DynamicPIN(fields.num_fields, dim, **DYNINT_PIN,
                                              activation_mode=activation,
                                              parameter_mode=parameter))
    if name == "moe":
        fields = stack()
        return MoEArch(fields, AdaEnsemble(fields.num_fields, dim, 1, anneal_steps=0))
    if name == "dlrm":
        return DeepTower(DLRMInput(num_fields, dim, num_dense, DENSE_HIDDEN), TOWER)
    if name == "deepfm":
        return DeepTower(ConcatInput(width, num_dense, DENSE_HIDDEN), TOWER, fm=True, dim=dim)
    users = min(USER_FIELDS, num_fields - 1)
    if name == "ranktower":
        return TwoTowerArch(dims, dim, DENSE_HIDDEN, num_dense, users,
                            lambda nu, ni: RankTowerNet(nu, ni, dim, **TOWERS))
    if name == "dssm":
        return TwoTowerArch(dims, dim, DENSE_HIDDEN, num_dense, users,
                            lambda nu, ni: DSSMNet(nu, ni, dim, TOWERS["hidden"],
                                                   TOWERS["head_dim"]))
    raise ValueError(f"unknown arch {name!r}; expected one of: {', '.join(ARCHS)}")
