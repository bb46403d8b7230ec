"""Batched token sampling: penalties, masks, greedy or filtered random choice, and raw logprobs.

One call picks the next token for every running sequence from the model's last-position logits
`[B, V]`. Everything is computed in float32 whatever the model's dtype, vectorised over the batch;
only seeded rows draw their noise one row at a time, from their own generator, so a seeded request
samples the same tokens whatever else shares its batch.

Processing order for each row (documented because it changes results):

1. forced tokens: a row whose `params.forced_token_ids` still has an entry for this step takes
   it and skips steps 2-6 (test-only; its logprob is still reported from the raw logits). Past the
   end of the list the row samples normally: end the list with EOS to stop there.
2. penalties, over the logits as the model gave them:
   - repetition penalty (HF/vLLM): every token seen in the prompt or the output so far has its
     logit divided by the penalty when positive, multiplied by it when negative;
   - frequency and presence penalties (OpenAI), over OUTPUT tokens only:
     `logit -= frequency_penalty * count + presence_penalty * (count > 0)`.
3. min_tokens: while the row has fewer than `min_tokens` outputs, its stop token ids and the EOS
   ids are masked to -inf. As in vLLM, with `ignore_eos` EOS is not a stop token, so only
   `stop_token_ids` are masked then.
4. `allowed_token_mask` (grammar): -inf wherever it is False.
   If steps 3-4 leave a row with no finite logit, the min_tokens ban yields first (the grammar
   wins), then the grammar mask (a dead-end grammar must not crash the batch with NaNs).
5. greedy rows (`temperature < 1e-5`, as vLLM): argmax, ties to the lowest token id.
6. random rows: temperature -> top_k -> top_p -> min_p (HF warper order) -> one categorical draw
   by the exponential race `argmax(probs / q)` with `q ~ Exp(1)`; seeded rows draw `q` with their
   own generator, unseeded rows share one generator (the Sampler's, else torch's global one).

`ignore_eos` changes nothing here, exactly as in vLLM: the engine's stop check simply does not end
the sequence on EOS, so the model's own choice (and its logprob) is kept.

Logprobs come from the RAW logits (log_softmax before penalties, masks and temperature), as vLLM v1
reports them by default. Ranks are competition ranks over that raw distribution: 1 + the number of
tokens with a strictly larger logit (1 = most likely). Prompt logprobs (`prompt_logprobs`) are the same
raw distribution at each prompt position, scoring the prompt token after it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from glimpse.outputs import Logprob
from glimpse.sampling_params import SamplingParams

# Temperatures below this are greedy: dividing by them only overflows towards argmax anyway (vLLM's rule).
GREEDY_TEMPERATURE_EPS = 1e-5

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One splitmix64 step: spreads nearby integers (seed, child index) far apart."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def make_generator(seed: int | None, child_index: int, device: torch.device | str) -> torch.Generator | None:
    """A generator for one sequence of a seeded request; None when the request has no seed.

    The stream depends only on (seed, child_index): the children of an n>1 request get distinct
    but reproducible streams, and no other request in the batch can disturb them.
    """
    if seed is None:
        return None
    mixed = _splitmix64((seed & _MASK64) ^ _splitmix64(child_index)) >> 1  # 63 bits: valid everywhere
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(mixed)
    return gen


def needs_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


@dataclass
class SequenceSamplingState:
    """What the sampler needs to know about one sequence; the engine appends each sampled token."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int] = field(default_factory=list)
    # None with params.seed set: made from (seed, child_index) on the logits' device at the first draw.
    generator: torch.Generator | None = None
    child_index: int = 0
    # Penalty caches, built on first use and updated with only the tokens added since the last step,
    # so a penalised step costs O(V) on the device instead of re-counting the whole sequence.
    _seen: torch.Tensor | None = field(default=None, repr=False)  # bool[V]: in prompt or output
    _counts: torch.Tensor | None = field(default=None, repr=False)  # int32[V]: times in output
    _num_counted: int = field(default=0, repr=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        child_index: int = 0,
        device: torch.device | str = "cpu",
    ) -> SequenceSamplingState:
        """The state of child `child_index` of a request, with its generator when the request is seeded."""
        return cls(
            params=params,
            prompt_token_ids=prompt_token_ids,
            generator=make_generator(params.seed, child_index, device),
            child_index=child_index,
        )

    def penalty_tensors(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen bool[V] over prompt + output, output counts int32[V]), brought up to date."""
        stale = (
            self._seen is None
            or self._seen.shape[0] != vocab_size
            or self._seen.device != device
            or len(self.output_token_ids) < self._num_counted  # output rewound: recount
        )
        if stale:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            prompt = [t for t in self.prompt_token_ids if 0 <= t < vocab_size]
            if prompt:
                self._seen[torch.tensor(prompt, device=device)] = True
            self._counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
            self._num_counted = 0
        assert self._seen is not None and self._counts is not None
        new = [t for t in self.output_token_ids[self._num_counted :] if 0 <= t < vocab_size]
        if new:
            ids = torch.tensor(new, device=device)
            self._counts.index_add_(0, ids, torch.ones(len(new), dtype=torch.int32, device=device))
            self._seen[ids] = True
        self._num_counted = len(self.output_token_ids)
        return self._seen, self._counts


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # None for rows that did not ask (params.logprobs is None)
    sampled_logprobs: list[float]  # raw logprob of each chosen token, for cumulative_logprob


def _forced_token(state: SequenceSamplingState) -> int | None:
    forced = state.params.forced_token_ids
    step = len(state.output_token_ids)
    if forced is not None and step < len(forced):
        return forced[step]
    return None  # past the end of the list the row samples normally


def _row_generator(state: SequenceSamplingState, device: torch.device) -> torch.Generator | None:
    """The row's generator, made on the logits' device on first use when the request is seeded."""
    if state.generator is None and state.params.seed is not None:
        state.generator = make_generator(state.params.seed, state.child_index, device)
    gen = state.generator
    if gen is not None and gen.device.type != device.type:
        raise ValueError(f"a seeded sequence's generator is on {gen.device}, its logits on {device}")
    return gen


def _apply_penalties(x: torch.Tensor, states: list[SequenceSamplingState], rows: list[int]) -> None:
    """Repetition, frequency and presence penalties on rows `rows` of x, in place."""
    vocab, device = x.shape[1], x.device
    seen_list, count_list = zip(*(states[i].penalty_tensors(vocab, device) for i in rows))
    seen = torch.stack(seen_list)
    counts = torch.stack(count_list).to(torch.float32)
    rep = torch.tensor([states[i].params.repetition_penalty for i in rows], device=device)[:, None]
    freq = torch.tensor([states[i].params.frequency_penalty for i in rows], device=device)[:, None]
    pres = torch.tensor([states[i].params.presence_penalty for i in rows], device=device)[:, None]
    idx = torch.tensor(rows, device=device)
    sub = x[idx]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).to(torch.float32)
    x[idx] = sub


def _apply_masks(
    x: torch.Tensor,
    states: list[SequenceSamplingState],
    rows: list[int],
    eos_token_ids: Collection[int],
    allowed_token_mask: torch.Tensor | None,
) -> None:
    """min_tokens bans and the grammar mask on rows `rows` of x, in place (never leaving a row empty)."""
    vocab, device = x.shape[1], x.device
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    for i in rows:
        st = states[i]
        if len(st.output_token_ids) >= st.params.min_tokens:
            continue
        stops = set(st.params.stop_token_ids or ())
        if not st.params.ignore_eos:
            stops.update(eos_token_ids)
        for t in stops:
            if 0 <= t < vocab:
                ban_rows.append(i)
                ban_ids.append(t)
    if not ban_rows and allowed_token_mask is None:
        return  # the common case: nothing to mask, no pass over [B, V]

    finite = torch.isfinite(x)
    if allowed_token_mask is None:
        keep = torch.ones_like(finite)
    else:
        keep = allowed_token_mask.to(device, torch.bool)
        if keep.shape[1] < vocab:  # grammar over the tokenizer's vocab, logits over a padded one
            keep = torch.nn.functional.pad(keep, (0, vocab - keep.shape[1]), value=False)
    if len(rows) < x.shape[0]:  # rows not handled here (forced ones) stay unmasked
        others = torch.ones(x.shape[0], 1, dtype=torch.bool, device=device)
        others[torch.tensor(rows, device=device)] = False
        keep = keep | others
    # A grammar that allows nothing the model can produce leaves the row as it is, rather than NaN.
    keep = keep | ~(keep & finite).any(dim=-1, keepdim=True)
    if ban_rows:
        banned = keep.clone()
        banned[torch.tensor(ban_rows, device=device), torch.tensor(ban_ids, device=device)] = False
        # The ban yields where it would leave nothing (e.g. a grammar that now allows only EOS).
        keep = torch.where((banned & finite).any(dim=-1, keepdim=True), banned, keep)
    x.masked_fill_(~keep, float("-inf"))


def _filter_and_draw(
    x: torch.Tensor,
    states: list[SequenceSamplingState],
    rows: list[int],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Temperature, top_k, top_p, min_p and an exponential-race draw for rows `rows`; returns their tokens."""
    vocab, device = x.shape[1], x.device
    params = [states[i].params for i in rows]
    idx = torch.tensor(rows, device=device)
    temp = torch.tensor([p.temperature for p in params], device=device)[:, None]
    z = x[idx] / temp

    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_z, order = z.sort(dim=-1, descending=True, stable=True)
        position = torch.arange(vocab, device=device)[None, :]
        k = torch.tensor(top_k, device=device)[:, None]
        sorted_z.masked_fill_(position >= k, float("-inf"))
        p_t = torch.tensor(top_p, device=device)[:, None]
        probs = sorted_z.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        # Keep the smallest prefix reaching top_p; top_p == 1 drops nothing (cumsum may round past 1).
        drop = (before >= p_t) & (p_t < 1.0)
        drop[:, 0] = False
        sorted_z.masked_fill_(drop, float("-inf"))
        z = torch.empty_like(z).scatter_(1, order, sorted_z)

    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        probs = z.softmax(dim=-1)
        threshold = torch.tensor(min_p, device=device)[:, None] * probs.amax(dim=-1, keepdim=True)
        z = z.masked_fill(probs < threshold, float("-inf"))

    probs = z.softmax(dim=-1)
    q = torch.empty_like(probs)
    row_gens = [_row_generator(states[i], device) for i in rows]
    unseeded = [j for j, gen in enumerate(row_gens) if gen is None]
    if unseeded:
        noise = torch.empty(len(unseeded), vocab, device=device).exponential_(generator=generator)
        q[torch.tensor(unseeded, device=device)] = noise
    for j, gen in enumerate(row_gens):
        if gen is not None:
            q[j].exponential_(generator=gen)  # the row's own stream: V draws per step, whatever the batch
    q.clamp_(min=torch.finfo(torch.float32).tiny)  # Exp(1) may round to 0; 0/0 would be NaN
    return (probs / q).argmax(dim=-1)


def _process(
    raw: torch.Tensor,
    states: list[SequenceSamplingState],
    rows: list[int],
    eos_token_ids: Collection[int],
    allowed_token_mask: torch.Tensor | None,
) -> torch.Tensor:
    penalised = [i for i in rows if needs_penalties(states[i].params)]
    banning = any(len(states[i].output_token_ids) < states[i].params.min_tokens for i in rows)
    if not penalised and not banning and allowed_token_mask is None:
        return raw  # nothing to change: no copy of [B, V] (callers never write to it)
    x = raw.clone()
    if penalised:
        _apply_penalties(x, states, penalised)
    if rows:
        _apply_masks(x, states, rows, eos_token_ids, allowed_token_mask)
    return x


def process_logits(
    logits: torch.Tensor,
    states: list[SequenceSamplingState],
    eos_token_ids: Collection[int],
    allowed_token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 2-4 (penalties, min_tokens, grammar mask) on every row, as float32 [B, V]: what greedy
    argmaxes and what temperature then divides. Public for tests and debugging; forced rows included."""
    return _process(logits.float(), states, list(range(len(states))), eos_token_ids, allowed_token_mask)


def sample(
    logits: torch.Tensor,
    states: list[SequenceSamplingState],
    eos_token_ids: Collection[int],
    allowed_token_mask: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
) -> SamplerOutput:
    """Pick one token per row of `logits` [B, V] (any float dtype) following each row's SamplingParams.

    `generator` serves the unseeded rows (None: torch's global one). With `tokenizer`, each reported
    Logprob carries `decoded_token` (the token decoded alone, special tokens kept), else None.
    """
    tokens, raw_lp, sampled_lp = sample_on_device(
        logits, states, eos_token_ids, allowed_token_mask, generator=generator
    )
    token_list = tokens.tolist()
    sampled_list = sampled_lp.tolist()
    logprobs = _logprob_dicts(raw_lp, sampled_lp, states, token_list, tokenizer)
    return SamplerOutput(token_ids=token_list, logprobs=logprobs, sampled_logprobs=sampled_list)


def sample_on_device(
    logits: torch.Tensor,
    states: list[SequenceSamplingState],
    eos_token_ids: Collection[int],
    allowed_token_mask: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample` without reading anything back: (tokens int64 [B], raw logprobs [B, V], logprob of each
    chosen token [B]), all on the logits' device, so the caller decides when to wait for them."""
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(
            f"logits must be [B, V] with B = len(states) = {len(states)}, got {tuple(logits.shape)}"
        )
    batch, vocab = logits.shape
    device = logits.device
    raw = logits.float()  # never written: the logprobs are of this distribution

    forced_rows: list[int] = []
    forced_ids: list[int] = []
    for i, st in enumerate(states):
        forced = _forced_token(st)
        if forced is None:
            continue
        if not 0 <= forced < vocab:
            raise ValueError(f"forced token id {forced} is outside the vocabulary [0, {vocab})")
        forced_rows.append(i)
        forced_ids.append(forced)
    forced_set = set(forced_rows)
    free_rows = [i for i in range(batch) if i not in forced_set]
    x = _process(raw, states, free_rows, eos_token_ids, allowed_token_mask)

    greedy = [i for i in free_rows if states[i].params.temperature < GREEDY_TEMPERATURE_EPS]
    random = [i for i in free_rows if states[i].params.temperature >= GREEDY_TEMPERATURE_EPS]
    if len(greedy) == batch:  # the common serving case: one argmax, no index tensors to build
        tokens = x.argmax(dim=-1)
    else:
        tokens = torch.zeros(batch, dtype=torch.long, device=device)
    if greedy and len(greedy) < batch:
        g = torch.tensor(greedy, device=device)
        tokens[g] = x[g].argmax(dim=-1)  # first maximum: ties go to the lowest id
    if random:
        tokens[torch.tensor(random, device=device)] = _filter_and_draw(x, states, random, generator)
    if forced_rows:
        tokens[torch.tensor(forced_rows, device=device)] = torch.tensor(forced_ids, device=device)

    # torch's log_softmax, not logit - logsumexp: the subtraction loses digits near logprob 0.
    raw_lp = torch.log_softmax(raw, dim=-1)
    sampled_lp = raw_lp.gather(1, tokens[:, None]).squeeze(1)
    return tokens, raw_lp, sampled_lp


def _logprob_dicts(
    raw_lp: torch.Tensor,
    sampled_lp: torch.Tensor,
    states: list[SequenceSamplingState],
    tokens: list[int],
    tokenizer: Any,
) -> list[dict[int, Logprob] | None]:
    """Per row asking for logprobs: {sampled token, then the top k by rank}, all over the raw logits."""
    out: list[dict[int, Logprob] | None] = [None] * len(states)
    rows = [i for i, st in enumerate(states) if st.params.logprobs is not None]
    if not rows:
        return out
    idx = torch.tensor(rows, device=raw_lp.device)
    sub = raw_lp[idx]
    chosen = sampled_lp[idx]
    sampled_rank = ((sub > chosen[:, None]).sum(dim=-1) + 1).tolist()
    chosen_list = chosen.tolist()
    kmax = max(states[i].params.logprobs or 0 for i in rows)
    top_vals: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if kmax > 0:
        vals, ids = sub.topk(min(kmax, sub.shape[1]), dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        k = states[i].params.logprobs or 0
        entry = _logprob_entry(tokens[i], chosen_list[j], sampled_rank[j], top_vals[j], top_ids[j], k)
        if tokenizer is not None:
            for tid, lp_obj in entry.items():
                lp_obj.decoded_token = tokenizer.decode([tid], skip_special_tokens=False)
        out[i] = entry
    return out


def _logprob_entry(
    token: int, logprob: float, rank: int, top_vals: list[float], top_ids: list[int], k: int
) -> dict[int, Logprob]:
    """{token, then the top k by rank}: one position's logprobs as callers see them."""
    entry = {token: Logprob(logprob, rank)}
    # Equal values: order by id so the answer does not depend on topk's internal order.
    ranked = sorted(zip(top_vals, top_ids), key=lambda t: (-t[0], t[1]))[:k]
    for pos, (val, tid) in enumerate(ranked):
        # Competition rank: 1 + the entries strictly above (equal logprobs share a rank).
        rank = next(r for r in range(pos + 1) if ranked[r][0] == val) + 1
        entry.setdefault(tid, Logprob(val, rank))
    return entry


# Prompt logprobs take log_softmax over this many float32 values at a time (128 MiB), so a long prompt
# chunk never has a float32 copy of all its logits.
PROMPT_LOGPROBS_SLICE_ELEMENTS = 1 << 25


def prompt_logprobs(logits: torch.Tensor, next_token_ids: Sequence[int], k: int) -> list[dict[int, Logprob]]:
    """Prompt log-probabilities from `logits` [N, V] (any float dtype): row i holds the logits at one
    prompt position and scores `next_token_ids[i]`, the prompt token after it. Each entry is that token's
    Logprob and the row's top k, over the raw logits (log_softmax in float32) with competition ranks;
    decoded_token is left to the caller."""
    n, vocab = logits.shape
    if n != len(next_token_ids):
        raise ValueError(f"{n} rows of logits for {len(next_token_ids)} prompt tokens")
    if n == 0:
        return []
    targets = torch.tensor(list(next_token_ids), dtype=torch.long, device=logits.device)
    step = max(1, PROMPT_LOGPROBS_SLICE_ELEMENTS // vocab)
    chosen, ranks, top_vals, top_ids = [], [], [], []
    for lo in range(0, n, step):
        lp = torch.log_softmax(logits[lo : lo + step].float(), dim=-1)
        picked = lp.gather(1, targets[lo : lo + step, None])
        chosen.append(picked.squeeze(1))
        ranks.append((lp > picked).sum(dim=-1) + 1)
        if k > 0:
            vals, ids = lp.topk(min(k, vocab), dim=-1)
            top_vals.append(vals)
            top_ids.append(ids)
    chosen_list = torch.cat(chosen).tolist()
    rank_list = torch.cat(ranks).tolist()
    vals_list = torch.cat(top_vals).tolist() if k > 0 else [[]] * n
    ids_list = torch.cat(top_ids).tolist() if k > 0 else [[]] * n
    return [
        _logprob_entry(int(next_token_ids[i]), chosen_list[i], rank_list[i], vals_list[i], ids_list[i], k)
        for i in range(n)
    ]


class Sampler:
    """The engine's sampler: `sample` with its own generator for the unseeded rows.

    `seed` makes unseeded sampling reproducible run to run (as LLM(seed=...) does in vLLM); None
    uses torch's global generator.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return self._generators[device]

    def __call__(
        self,
        logits: torch.Tensor,
        states: list[SequenceSamplingState],
        eos_token_ids: Collection[int],
        allowed_token_mask: torch.Tensor | None = None,
        *,
        tokenizer: Any = None,
    ) -> SamplerOutput:
        return sample(
            logits,
            states,
            eos_token_ids,
            allowed_token_mask,
            generator=self.generator_for(logits.device),
            tokenizer=tokenizer,
        )
