"""The DPO objective for whole trajectories, and the log-probs it needs.

Rafailov et al. 2023, eq. 7, with an optional NLL term on the chosen sequence (RPO, Pang et al. 2024):

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )
           + nll_weight * NLL_pi(y_w|x)

Here y is every token the model generated across all the trajectory's turns, and x is all the rest
(system prompt, user, tool results): the mask decides which is which. Tool outputs are context the
model never produced, so they get no gradient and no say in the reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    *,
    policy_chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards. Inputs are summed log-probs, shape (batch,)."""
    policy_logratios = policy_chosen - policy_rejected
    reference_logratios = reference_chosen - reference_rejected
    losses = -F.logsigmoid(beta * (policy_logratios - reference_logratios))
    if nll_weight and policy_chosen_nll is not None:
        losses = losses + nll_weight * policy_chosen_nll
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM under a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_logps(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over the masked-in tokens of each row, and how many there were.

    The decoder runs over the whole sequence (the context must be attended to), but the vocabulary
    projection and log-softmax run only at the positions whose *next* token is generated: for an
    agent trajectory that is a few hundred of a few thousand positions, and the projection onto a
    49k vocabulary is most of the memory of a naive forward.
    """
    lm = _causal_lm(model)
    hidden = lm.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    return _masked_logps(lm, hidden, ids, mask)


def pair_logps(model: torch.nn.Module, chosen: Sequence[int], chosen_mask: Sequence[int],
               rejected: Sequence[int], rejected_mask: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of the rows [chosen, rejected], with the tokens they share run once (rows_logps)."""
    return rows_logps(model, [(chosen, chosen_mask), (rejected, rejected_mask)])


def rows_logps(model: torch.nn.Module,
               rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of (ids, mask) rows, with every token the rows share run once.

    Attempts share their start: system prompt and worked examples (~1.2k tokens with the default
    prompt, the same for every task), then the question (both attempts at one task), often the
    first tokens of the first tool call. Of a ~1.3k-token trajectory only the last ~100 tokens are
    its own. The prefix all rows share runs once, batch 1, keeping its keys and values; the rest of
    the rows runs as one packed sequence: the trie of their suffixes, each distinct token path once
    (a pair's question once, not once per attempt), each position attending to the prefix and to
    its own ancestors only, at its own position id. Causal attention makes this exact, gradients
    included: a position's hidden state depends only on the tokens before it, which are the same
    wherever a path is shared. Against right-padded rows on top of the shared prefix (the trainer
    until 2026-12-06) this runs 19-23% fewer positions on a cycle's batches, keeps one copy of the
    prefix's keys and values instead of one per row, and a step ran 1.40x faster (docs/benchmarks.md).
    """
    lm = _causal_lm(model)
    device = lm.lm_head.weight.device
    ids = [list(r) for r, _ in rows]
    checkpointing = getattr(lm, "is_gradient_checkpointing", False)  # keeps no cache: everything in the trie
    prefix = 0 if checkpointing else shared_prefix(ids)
    trie = SuffixTrie.of(ids, prefix)
    hidden = []
    past = None
    if prefix:
        shared = lm.model(input_ids=torch.tensor([ids[0][:prefix]], device=device), use_cache=True)
        past = shared.past_key_values
        hidden.append(shared.last_hidden_state[0])
    allowed = trie.attention(prefix).to(device)  # (nodes, prefix + nodes)
    if lm.config._attn_implementation == "sdpa":
        mask = allowed
    else:  # eager and the others add the mask to the scores
        mask = torch.zeros(allowed.shape, dtype=lm.dtype, device=device).masked_fill(~allowed, torch.finfo(lm.dtype).min)
    packed = lm.model(input_ids=torch.tensor([trie.tokens], device=device), attention_mask=mask[None, None],
                      position_ids=torch.tensor([trie.depths], device=device) + prefix,
                      past_key_values=past, use_cache=past is not None)
    hidden.append(packed.last_hidden_state[0])
    states = torch.cat(hidden)  # position t < prefix is row t; trie node k is row prefix + k

    # position t predicts token t + 1: the generated tokens' predictors, row by row
    source: list[int] = []
    row_of: list[int] = []
    target: list[int] = []
    counts: list[int] = []
    for i, ((_, mask_i), nodes) in enumerate(zip(rows, trie.row_nodes)):
        before = len(source)
        for t in range(len(ids[i]) - 1):
            if mask_i[t + 1]:
                source.append(t if t < prefix else prefix + nodes[t - prefix])
                row_of.append(i)
                target.append(ids[i][t + 1])
        counts.append(len(source) - before)
    logits = lm.lm_head(states[torch.tensor(source, dtype=torch.long, device=device)]).float()  # (N, V)
    token_logps = torch.log_softmax(logits, dim=-1).gather(
        -1, torch.tensor(target, dtype=torch.long, device=device).unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(len(rows), dtype=token_logps.dtype, device=device).index_add(
        0, torch.tensor(row_of, dtype=torch.long, device=device), token_logps)
    return sums, torch.tensor(counts, dtype=torch.long, device=device)


@dataclass(frozen=True)
class SuffixTrie:
    """The rows from `start` on as a trie: each distinct token path once. Nodes are numbered in
    insertion order, so a node's ancestors all come before it."""
    tokens: list[int]
    parents: list[int]  # -1: hangs off the shared prefix
    depths: list[int]  # position - start
    row_nodes: list[list[int]]  # per row, the node of each of its positions from `start`

    @classmethod
    def of(cls, rows: Sequence[Sequence[int]], start: int) -> SuffixTrie:
        index: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        row_nodes: list[list[int]] = []
        for row in rows:
            parent, nodes = -1, []
            for depth, token in enumerate(row[start:]):
                node = index.get((parent, token))
                if node is None:
                    node = index[(parent, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(parent)
                    depths.append(depth)
                nodes.append(node)
                parent = node
            row_nodes.append(nodes)
        return cls(tokens, parents, depths, row_nodes)

    def attention(self, prefix: int) -> torch.Tensor:
        """(nodes, prefix + nodes) bool: every node sees the whole prefix, itself and its ancestors."""
        n = len(self.tokens)
        own = torch.zeros(n, n, dtype=torch.bool)
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                own[node] = own[parent]
            own[node, node] = True
        return torch.cat([torch.ones(n, prefix, dtype=torch.bool), own], dim=1)


def shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """The prefix rows_logps runs once: what all rows start with, less at least one token per row."""
    return min(common_prefix_length(rows), *(len(r) - 1 for r in rows))


def shared_forward_tokens(rows: Sequence[Sequence[int]]) -> int:
    """Token positions rows_logps runs for these rows: the common prefix, then each distinct path
    after it once. What a forward costs in time and activation memory."""
    prefix = shared_prefix(rows)
    return prefix + len(SuffixTrie.of(rows, prefix).tokens)


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all the rows have in common."""
    n = min(len(r) for r in rows)
    for other in rows[1:]:
        n = shared_prefix_length(rows[0][:n], other)
    return n


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def padded_rows(*rows: tuple[Sequence[int], Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, generated-mask, attention-mask for (ids, mask) rows right-padded to the longest."""
    width = max(len(r_ids) for r_ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r_ids, r_mask) in enumerate(rows):
        ids[i, :len(r_ids)] = torch.tensor(r_ids)
        mask[i, :len(r_ids)] = torch.tensor(r_mask)
        attention[i, :len(r_ids)] = 1
    return ids, mask, attention


def _masked_logps(lm: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = mask[:, 1:].bool()  # position t predicts token t+1
    rows, cols = targets.nonzero(as_tuple=True)
    logits = lm.lm_head(hidden[:, :-1][rows, cols]).float()  # (N, V), N = generated tokens in the batch
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:][rows, cols].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(ids.shape[0], dtype=token_logps.dtype, device=ids.device).index_add(0, rows, token_logps)
    return sums, targets.sum(dim=1)
