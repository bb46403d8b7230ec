"""After a step: each sampled token into its sequence (logprobs, constraint, stop checks, text), and the
RequestOutputs callers see."""

from __future__ import annotations

from glimpse.engine.request import PENDING_TOKEN, Request, Sequence
from glimpse.engine.scheduler import Scheduler
from glimpse.outputs import CompletionOutput, Logprob, RequestOutput


class OutputProcessor:
    def __init__(
        self,
        tokenizer,
        eos_token_ids: list[int],
        max_model_len: int,
        scheduler: Scheduler,
        think_end: int | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.scheduler = scheduler  # told when a sequence finishes, so its memory goes back
        self.think_end = think_end  # `</think>`: where a constraint waiting for the reasoning to end starts
        self._token_texts: dict[int, str] = {}  # token id -> the token decoded alone (at most the vocabulary)

    def append_token(self, seq: Sequence, token: int, logprobs: dict | None, sampled_logprob: float) -> None:
        before = len(seq.text)
        self._append(seq, token, logprobs, sampled_logprob)
        if seq.token_texts is not None:
            seq.token_texts.append(seq.text[before:])

    def _append(self, seq: Sequence, token: int, logprobs: dict | None, sampled_logprob: float) -> None:
        params = seq.params
        seq.output_token_ids.append(token)
        seq.cumulative_logprob += sampled_logprob
        if seq.logprobs is not None and logprobs is not None:
            self._decode(logprobs)
            seq.logprobs.append(logprobs)
        n_out = len(seq.output_token_ids)
        if seq.grammar is not None and self._advance_grammar(seq, token):
            return
        stop_token = token in params.stop_token_ids
        eos = token in self.eos_token_ids and not params.ignore_eos
        if (stop_token or eos) and n_out >= params.min_tokens:
            seq.finish_reason, seq.stop_reason = "stop", (token if stop_token else None)
        else:
            detok = seq.detokenizer
            if detok is not None:
                seq.text += detok.add_tokens([token])
            if detok is not None and detok.stopped_by is not None and n_out >= params.min_tokens:
                seq.finish_reason, seq.stop_reason = "stop", seq.detokenizer.stopped_by
                seq.text = seq.detokenizer.text
            elif params.max_tokens is not None and n_out >= params.max_tokens:
                seq.finish_reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            # a stop string already cut the text; otherwise release what the detokenizer held back
            if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
                seq.text += seq.detokenizer.flush()
            self.scheduler.finish(seq)

    def add_prompt_logprobs(self, req: Request, entries: list[dict[int, Logprob]]) -> None:
        """A step's prompt logprobs (the next prompt positions, in order) onto the request's."""
        for entry in entries:
            self._decode(entry)
        req.prompt_logprobs.extend(entries)

    def _decode(self, entry: dict[int, Logprob]) -> None:
        """Each entry's token decoded alone (special tokens kept), remembered per id: a prompt's logprobs
        ask for (k + 1) x prompt-length tokens at once."""
        if self.tokenizer is None:
            return
        for tid, lp in entry.items():
            if lp.decoded_token is None:
                text = self._token_texts.get(tid)
                if text is None:
                    text = self._token_texts[tid] = self.tokenizer.decode([tid])
                lp.decoded_token = text

    def _advance_grammar(self, seq: Sequence, token: int) -> bool:
        """Feed the token to the sequence's constraint; True when that finished the sequence."""
        if seq.grammar_waits:
            if token == self.think_end:
                seq.grammar_waits = False
            return False
        if token in self.eos_token_ids:
            return False
        if not seq.grammar.accept(token):  # only forced tokens can break the grammar
            seq.finish_reason = "abort"
        elif seq.grammar.is_terminated():  # the value is complete: stop now (even with ignore_eos)
            seq.finish_reason, seq.stop_reason = "stop", None
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.add_tokens([token])
        else:
            return False
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.flush()
        self.scheduler.finish(seq)
        return True

    @staticmethod
    def output(req: Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=_known_tokens(s.output_token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=s.logprobs,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                token_texts=s.token_texts,
            )
            for s in req.sequences
        ]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            num_cached_tokens=min(s.num_cached_tokens for s in req.sequences),
            video_tokens=req.video_tokens,
            media=req.media_info,
            prompt_logprobs=req.prompt_logprobs,
        )


def _known_tokens(ids: list[int]) -> list[int]:
    """The output tokens the host has read back: without the trailing placeholders of steps in flight."""
    n = len(ids)
    while n and ids[n - 1] == PENDING_TOKEN:
        n -= 1
    return ids[:n]
