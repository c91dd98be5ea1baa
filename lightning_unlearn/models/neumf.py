"""NeuMF: generalised MF and an MLP over concatenated embeddings, fused by a linear layer."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_unlearn.losses import data_loss, item_slots
from lightning_unlearn.models.base import Recommender, check_sizes
from lightning_unlearn.models.functional import gather_rows

__all__ = ["NeuMF"]


class NeuMF(Recommender):
    """Neural matrix factorisation (He et al., WWW 2017), without dropout so the objective is fixed.

    A user's vector is its GMF row and its MLP row concatenated (likewise for items). The dense
    weights (MLP and output layer) are regularised by ``dense_l2/2 * ||W||^2`` once per objective.

    With ``pretrain_epochs`` the first epochs train the two branches side by side, each on its
    own loss (the paper's pre-training, section 3.4.1): the GMF branch scores
    ``2 w_gmf . (u_gmf * i_gmf) + b`` and the MLP branch ``2 w_mlp . h + b``, with the output
    layer's two halves as their heads. When the fused model takes over, its score is then the
    paper's ``alpha = 0.5`` mix of the two pre-trained predictions. Both phases read only the
    training rows, so a retrain repeats them; the objective that unlearning works on
    (:meth:`loss`) is always the fused one.

    Args:
        num_users: number of users.
        num_items: number of items.
        gmf_dim: size of the GMF embeddings.
        mlp_dim: size of the MLP embeddings.
        mlp_layers: widths of the hidden MLP layers.
        init_std: standard deviation of the embeddings' normal initialisation.
        dense_l2: L2 weight on dense weights (default: the model's ``l2``).
        pretrain_epochs: epochs at the start of training with the branches trained apart (0: none).
        **kwargs: :class:`~lightning_unlearn.models.base.Recommender` options.

    Raises:
        ValueError: on a negative ``pretrain_epochs`` (and the base class's checks).

    Example:
        >>> model = NeuMF(num_users=3, num_items=5, gmf_dim=4, mlp_dim=4, mlp_layers=(8, 4))
        >>> model.full_scores(torch.tensor([0, 1])).shape
        torch.Size([2, 5])
        >>> sorted(model.parameter_groups())
        ['dense', 'item_embedding', 'user_embedding']
    """

    max_pairs_per_chunk = 1 << 21

    def __init__(
        self,
        num_users: int,
        num_items: int,
        gmf_dim: int = 32,
        mlp_dim: int = 32,
        mlp_layers: Sequence[int] = (64, 32, 16),
        init_std: float = 0.1,
        dense_l2: float | None = None,
        pretrain_epochs: int = 0,
        **kwargs,
    ):
        if "embedding_dim" in kwargs:
            raise TypeError(f"{type(self).__name__} has no embedding_dim: its embeddings are gmf_dim (the GMF branch) and mlp_dim "
                            f"(the MLP branch) wide, e.g. {type(self).__name__}(num_users, num_items, gmf_dim=8, mlp_dim=8).")
        check_sizes(type(self).__name__, gmf_dim=gmf_dim, mlp_dim=mlp_dim, **{f"mlp_layers[{i}]": w for i, w in enumerate(mlp_layers)})
        super().__init__(num_users, num_items, **kwargs)
        if dense_l2 is not None and not (math.isfinite(dense_l2) and dense_l2 >= 0):
            raise ValueError(f"NeuMF(dense_l2=...) must be a finite number >= 0 (or None: l2), got {dense_l2!r}.")
        if pretrain_epochs < 0:
            raise ValueError(f"NeuMF(pretrain_epochs=...) must be >= 0, got {pretrain_epochs}.")
        self.pretrain_epochs = pretrain_epochs
        self.gmf_dim, self.dense_l2 = gmf_dim, self.l2 if dense_l2 is None else dense_l2
        self.gmf_user, self.gmf_item = nn.Embedding(num_users, gmf_dim), nn.Embedding(num_items, gmf_dim)
        self.mlp_user, self.mlp_item = nn.Embedding(num_users, mlp_dim), nn.Embedding(num_items, mlp_dim)
        for table in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
            nn.init.normal_(table.weight, std=init_std)
        widths = [2 * mlp_dim, *mlp_layers]
        self.mlp = nn.Sequential(*(m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())))
        self.predict = nn.Linear(gmf_dim + widths[-1], 1)

    def representations(self) -> tuple[Tensor, Tensor]:
        users = torch.cat([self.gmf_user.weight, self.mlp_user.weight], dim=1)
        items = torch.cat([self.gmf_item.weight, self.mlp_item.weight], dim=1)
        return users, items

    def interact(self, user_vectors: Tensor, item_vectors: Tensor) -> Tensor:
        gmf, mlp = self._branches(user_vectors, item_vectors)
        return gmf + mlp + self.predict.bias[0]

    def _branches(self, user_vectors: Tensor, item_vectors: Tensor) -> tuple[Tensor, Tensor]:
        """Each branch's term of the output layer: ``w_gmf . (u_gmf * i_gmf)`` and ``w_mlp . h`` (no bias).

        The first MLP layer's input ``[u_mlp, i_mlp]`` is not formed: its output is
        ``A u_mlp + B i_mlp + b``, each half taken at its own shape before they broadcast, so a
        row's user half is computed once for its positive and negatives.
        """
        g, w = self.gmf_dim, self.predict.weight[0]
        gmf = (user_vectors[..., :g] * item_vectors[..., :g]) @ w[:g]
        u, i = user_vectors[..., g:], item_vectors[..., g:]
        if not len(self.mlp):  # no hidden layer: the output layer reads the embeddings themselves
            return gmf, u @ w[g:g + u.shape[-1]] + i @ w[g + u.shape[-1]:]
        first = self.mlp[0]
        user_part, item_part = first.weight.split([u.shape[-1], i.shape[-1]], dim=1)
        hidden = self.mlp[1:](torch.relu(u @ user_part.T + torch.nn.functional.linear(i, item_part, first.bias)))
        return gmf, hidden @ w[g:]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.current_epoch >= self.pretrain_epochs:
            return super().training_step(batch, batch_idx)
        user_vectors, item_vectors = self.representations()
        gmf, mlp = self._branches(gather_rows(user_vectors, batch["users"]).unsqueeze(1), gather_rows(item_vectors, item_slots(batch)))
        bias = self.predict.bias[0]
        data = data_loss(2 * gmf + bias, self.loss_name) + data_loss(2 * mlp + bias, self.loss_name)
        penalty = 0.5 * self.l2 * self.embedding_penalty(batch["users"], item_slots(batch))
        loss = (data + penalty).mean() + self.dense_penalty()
        self.log("train/pretrain_loss", loss, prog_bar=True, batch_size=len(batch["users"]))
        return loss

    def row_scores(self, batch: dict[str, Tensor], representations: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``(R, 1 + k)`` scores of each row's positive, then its negatives, as :meth:`interact` gives them.

        Without gradients (a pass that scores many rows: evaluation, an unlearning method's line
        search), a batch that repeats its items takes each distinct item's first-layer half,
        ``B i_mlp + b``, once, as :meth:`full_scores` does, and the GMF term as
        ``i_gmf . (u_gmf * w)``: per pair only the rest of the MLP is left. Equal to
        :meth:`interact` on every pair, to rounding.

        Example:
            >>> model = NeuMF(2, 3, gmf_dim=2, mlp_dim=2, mlp_layers=(4,))
            >>> batch = {"users": torch.tensor([0, 1, 1]), "items": torch.tensor([1, 1, 2]), "negatives": torch.tensor([[2], [2], [1]])}
            >>> with torch.no_grad():
            ...     fast = model.row_scores(batch)
            >>> torch.allclose(fast, model.interact(model.representations()[0][batch["users"]].unsqueeze(1),
            ...                                     model.representations()[1][item_slots(batch)]), atol=1e-6)
            True
        """
        user_vectors, item_vectors = representations or self.representations()
        slots = item_slots(batch)
        if torch.is_grad_enabled() or not len(self.mlp):
            return super().row_scores(batch, (user_vectors, item_vectors))
        items, inverse = torch.unique(slots, return_inverse=True)
        if 2 * len(items) > slots.numel():  # items seldom repeated: pair by pair
            return super().row_scores(batch, (user_vectors, item_vectors))
        g, first, w = self.gmf_dim, self.mlp[0], self.predict.weight[0]
        user_part, item_part = first.weight.split([user_vectors.shape[1] - g, item_vectors.shape[1] - g], dim=1)
        u, distinct = gather_rows(user_vectors, batch["users"]), gather_rows(item_vectors, items)
        first_half = gather_rows(torch.nn.functional.linear(distinct[:, g:], item_part, first.bias), inverse)
        hidden = self.mlp[1:](torch.relu_(first_half.add_((u[:, g:] @ user_part.T).unsqueeze(1))))  # (R, 1 + k, width)
        gmf = torch.bmm(gather_rows(distinct[:, :g].contiguous(), inverse), (u[:, :g] * w[:g]).unsqueeze(-1))
        return gmf.squeeze(-1) + hidden @ w[g:] + self.predict.bias[0]

    def full_scores(self, users: Tensor, representations: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``(len(users), num_items)`` scores, with each user's and item's part computed once.

        The first MLP layer acts on ``[u_mlp, i_mlp]``, so its output is ``A u_mlp + B i_mlp + b``:
        both halves are computed per user and per item, and only their sum goes through the rest
        of the MLP for every pair. The GMF half of the output layer, ``w . (u_gmf * i_gmf)``, is
        one matrix product. Equals :meth:`interact` on every pair (to rounding), at about a third
        of its cost per pair.
        """
        user_vectors, item_vectors = representations or self.representations()
        rows_per_chunk = max(1, self.max_pairs_per_chunk // self.num_items)
        if not len(self.mlp):  # no hidden layer: the output layer reads the embeddings themselves
            return torch.cat([super(NeuMF, self).full_scores(chunk, (user_vectors, item_vectors)) for chunk in users.split(rows_per_chunk)])
        g, first, w = self.gmf_dim, self.mlp[0], self.predict.weight[0]
        user_part, item_part = first.weight.split([user_vectors.shape[1] - g, item_vectors.shape[1] - g], dim=1)
        items_first = item_vectors[:, g:] @ item_part.T + first.bias  # (items, width)
        items_gmf = item_vectors[:, :g].T  # (g, items)
        scores = []
        for chunk in users.split(rows_per_chunk):
            u = user_vectors[chunk]
            hidden = self.mlp[1:](torch.relu_((u[:, g:] @ user_part.T).unsqueeze(1) + items_first))  # (chunk, items, width)
            scores.append(torch.addmm(self.predict.bias, u[:, :g] * w[:g], items_gmf) + hidden @ w[g:])
        return torch.cat(scores)

    def embedding_penalty(self, users: Tensor, items: Tensor) -> Tensor:
        user_sq = self.gmf_user.weight[users].square().sum(-1) + self.mlp_user.weight[users].square().sum(-1)
        item_sq = self.gmf_item.weight[items].square().sum(-1) + self.mlp_item.weight[items].square().sum(-1)
        return user_sq + item_sq.sum(-1)

    def dense_penalty(self) -> Tensor:
        weights = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        return 0.5 * self.dense_l2 * sum(w.square().sum() for w in weights)

    def parameter_groups(self) -> dict[str, list[Tensor]]:
        return {
            "user_embedding": [self.gmf_user.weight, self.mlp_user.weight],
            "item_embedding": [self.gmf_item.weight, self.mlp_item.weight],
            "dense": [*self.mlp.parameters(), *self.predict.parameters()],
        }
