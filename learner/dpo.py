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
    """sequence_logps of (ids, mask) rows, with the tokens all of them start with run once.

    Attempts share their start: system prompt and worked examples (~1.2k tokens with the default
    prompt, the same for every task), then the question (two attempts at one task), often the first
    tokens of the first tool call. Of a ~1.3k-token trajectory only the last ~100 tokens differ. The
    shared prefix runs through the decoder once, its keys and values are repeated for every row, and
    only the suffixes run on; gradients flow back through the shared keys and values. Causal
    attention makes this exact: a position's hidden state depends only on the tokens up to it, which
    are the same in every row inside the prefix. Several pairs in one call (the trainer's batch)
    share the prompt and examples too: four pairs cost about one prefix plus eight suffixes.
    """
    n = len(rows)
    prefix = min(common_prefix_length([r for r, _ in rows]), *(len(r) - 1 for r, _ in rows))  # each row keeps a token of its own
    lm = _causal_lm(model)
    device = lm.lm_head.weight.device
    ids, mask, attention = (t.to(device) for t in padded_rows(*rows))
    if prefix < 1 or getattr(lm, "is_gradient_checkpointing", False):  # checkpointing keeps no cache
        hidden = lm.model(input_ids=ids, attention_mask=attention).last_hidden_state
        return _masked_logps(lm, hidden, ids, mask)
    shared = lm.model(input_ids=ids[:1, :prefix], use_cache=True)
    cache = shared.past_key_values
    cache.batch_repeat_interleave(n)
    tails = lm.model(input_ids=ids[:, prefix:], attention_mask=attention, past_key_values=cache,
                     use_cache=True).last_hidden_state  # (n, T - prefix, H)
    hidden = torch.cat([shared.last_hidden_state.expand(n, -1, -1), tails], dim=1)
    return _masked_logps(lm, hidden, ids, mask)


def shared_forward_tokens(rows: Sequence[Sequence[int]]) -> int:
    """Token positions rows_logps runs for these rows: the common prefix once, each suffix padded to
    the longest. What a forward costs in time and activation memory."""
    prefix = min(common_prefix_length(rows), *(len(r) - 1 for r in rows))
    return prefix + len(rows) * (max(len(r) for r in rows) - prefix)


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
