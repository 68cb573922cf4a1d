"""The engine: a Llama-family model with a paged KV cache, run one batched step at a time.

Life cycle of a request inside one engine:
1. `add_request` validates and returns a `Sequence` (WAITING); nothing is allocated yet.
2. `reserve` takes KV blocks for it (all-or-nothing; `KVCacheExhausted` otherwise).
3. Either `prefill` computes its prompt (optionally handing each layer's K/V to an export hook
   while later layers still run) and samples the first token, or, on a token machine,
   `import_kv_layer` writes K/V computed elsewhere and `finish_import` adds the first token.
4. `decode` runs continuous-batch steps; requests join and leave between any two steps. `step`
   is the mixed step of chunked prefill: the decode rows of running requests and chunks of
   prompts in one forward pass, a long prompt computed over several steps (`num_computed_tokens`
   says how far it got) while the others keep decoding.
5. A stop token, max_tokens or the context limit finishes it and frees its blocks; `abort` and
   `free` free them at any other time. Every path ends with the blocks back in the pool.

The caller (a machine scheduler, or `engine.llm.LLM`) decides which requests run in each step.
"""

from __future__ import annotations

import torch

from engine.backend import KVExportHook
from engine.config import EngineConfig
from engine.kv_cache import KVCache, KVCacheExhausted
from engine.memory import kv_cache_num_blocks
from engine.model import AttentionMetadata, LlamaModel, PrefillSlice, causal_mask
from engine.model_config import ModelConfig
from engine.sampler import sample
from engine.sequence import InvalidRequestError, SamplingParams, SeqStatus, Sequence
from engine.tokenizer import Tokenizer
from engine.weights import load_weights

# The export hook (engine.backend.KVExportHook): the transport-neutral layout of kv is
# [tokens, 2, num_kv_heads, head_dim], contiguous, in the model dtype, tokens in prompt position
# order, index 0 of the second axis K and 1 V. It is the cache's own per-token layout, so a
# receiver can write it into its blocks with plain copies.


class Engine:
    def __init__(self, config: EngineConfig, load_model: bool = True):
        """`load_model=False`: the checkpoint's config only, no tokenizer and no weights (the
        modelled backend, engine/modelled_engine.py, which runs no model)."""
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        mc = self.model_config
        self.device, self.dtype = config.torch_device, config.torch_dtype
        if config.num_threads and load_model:
            torch.set_num_threads(config.num_threads)
        self.max_model_len = _max_model_len(mc, config.max_model_len)
        self.tokenizer = self.model = None
        self.weight_bytes = 0
        if load_model:
            self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(config.model)
            weights = load_weights(config.model, mc, self.dtype, self.device)
            self.weight_bytes = weights.num_bytes
            self.model = LlamaModel(mc, weights, self.max_model_len)
        self.kv = self._build_kv_cache()
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)

    def _build_kv_cache(self) -> KVCache:
        """The paged cache sized from the config's budget (or free device memory); needs
        config, model_config, device, dtype and max_model_len set."""
        config, mc = self.config, self.model_config
        dtype_bytes = torch.tensor([], dtype=self.dtype).element_size()
        num_blocks = kv_cache_num_blocks(
            budget_bytes=config.kv_cache_bytes, device=self.device,
            fraction=config.kv_cache_memory_fraction, headroom_bytes=config.kv_cache_headroom_bytes,
            bytes_per_block=mc.kv_bytes_per_token(dtype_bytes) * config.block_size,
            max_useful_blocks=config.max_num_seqs * -(-self.max_model_len // config.block_size))
        return KVCache(mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads,
                       mc.head_dim, self.dtype, self.device,
                       shared_memory=config.kv_cache_shared_memory)

    # -- request life cycle ------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> Sequence:
        params.validate()
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_token_ids)} tokens; the context holds {self.max_model_len}"
                " (prompt + at least one generated token)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} outside the vocabulary [0, {vocab})")
        return Sequence(request_id, prompt_token_ids, params)

    def max_tokens_total(self, seq: Sequence) -> int:
        """Tokens this request can ever hold: prompt + max_tokens, capped by the context."""
        return min(seq.prompt_len + seq.params.max_tokens, self.max_model_len)

    def blocks_for(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """Blocks `reserve(seq, num_tokens)` would add."""
        n = self.max_tokens_total(seq) if num_tokens is None else num_tokens
        return self.kv.blocks_needed(seq.block_table, n)

    def reserve(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Allocates blocks for num_tokens (default: prompt + max_tokens). All-or-nothing."""
        self.kv.grow(seq.block_table, self.max_tokens_total(seq) if num_tokens is None
                     else num_tokens)

    def free(self, seq: Sequence) -> None:
        """Returns the request's blocks to the pool. Idempotent."""
        if seq.block_table:
            self.kv.release(seq.block_table)

    def abort(self, seq: Sequence) -> None:
        if not seq.finished:
            seq.status = SeqStatus.FINISHED_ABORTED
        self.free(seq)

    @property
    def num_free_blocks(self) -> int:
        return self.kv.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    @property
    def max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    @property
    def dtype_name(self) -> str:
        """The KV's dtype as the wire header names it ("bfloat16", "float32", ...)."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token over all layers."""
        return self.model_config.kv_bytes_per_token(self.kv.tensor.element_size())

    # -- steps -----------------------------------------------------------------------------

    def prefill(self, seqs: list[Sequence], kv_export: KVExportHook | None = None) -> list[int]:
        """Computes each request's uncomputed prompt tokens in one forward pass and samples its
        first token. Blocks are grown as needed (all-or-nothing across the batch)."""
        if not seqs:
            return []
        for s in seqs:
            if s.status.finished or s.num_computed_tokens >= s.prompt_len:
                raise InvalidRequestError(f"request {s.request_id} has no prompt left to prefill")
        self._check_distinct(seqs)
        chunks = [(s, s.prompt_len - s.num_computed_tokens) for s in seqs]
        return self._forward_step([], chunks, kv_export)  # type: ignore[return-value]

    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One token for each running request."""
        if not seqs:
            return []
        self._check_decode(seqs)
        self._check_distinct(seqs)
        return self._forward_step(seqs, [], None)  # type: ignore[return-value]

    def step(self, decode_seqs: list[Sequence], chunks: list[tuple[Sequence, int]],
             max_num_tokens: int | None = None) -> list[int | None]:
        """One mixed forward pass (chunked prefill): a token for each running request in
        `decode_seqs`, plus the next `n` prompt tokens of each `(seq, n)` in `chunks`.

        A chunk continues its prompt from `num_computed_tokens` and attends its cached context and
        itself, causally. Returns one entry per decode request, then one per chunk, in order: the
        sampled token, or None for a chunk that leaves part of its prompt uncomputed (a request
        gets its first token in the step that computes its last prompt token). Blocks grow to what
        the step writes, all-or-nothing across the batch. `max_num_tokens` is the caller's
        per-step token budget: a step of more tokens is refused before anything runs.
        """
        self._check_decode(decode_seqs)
        for s, n in chunks:
            left = s.prompt_len - s.num_computed_tokens
            if s.status != SeqStatus.WAITING or not isinstance(n, int) or not 0 < n <= left:
                raise InvalidRequestError(f"request {s.request_id}: a chunk of {n} prompt tokens, "
                                          f"{left} left to prefill ({s})")
        self._check_distinct([*decode_seqs, *(s for s, _ in chunks)])
        num_tokens = len(decode_seqs) + sum(n for _, n in chunks)
        if max_num_tokens is not None and num_tokens > max_num_tokens:
            raise InvalidRequestError(f"step of {num_tokens} tokens exceeds the budget of "
                                      f"{max_num_tokens}")
        if not num_tokens:
            return []
        return self._forward_step(decode_seqs, chunks, None)

    # -- KV import (token machine side) -----------------------------------------------------

    def import_kv_layer(self, seq: Sequence, layer: int, kv: torch.Tensor) -> None:
        """Writes one layer's K/V of prompt positions [0, n) into seq's own blocks.

        kv: [n, 2, num_kv_heads, head_dim] in the engine's dtype (the export layout). Blocks must
        be reserved first.
        """
        self._check_import(seq, layer)
        mc = self.model_config
        want = (seq.prompt_len, 2, mc.num_kv_heads, mc.head_dim)
        if tuple(kv.shape) != want:
            raise InvalidRequestError(f"KV shape {tuple(kv.shape)}, expected {want}")
        if kv.dtype != self.dtype:
            raise InvalidRequestError(f"KV dtype {kv.dtype}, expected {self.dtype}")
        slots = self.kv.slots(seq.block_table, 0, seq.prompt_len).to(self.device)
        self.kv.tensor[layer].index_copy_(0, slots, kv.to(self.device))

    def import_views(self, seq: Sequence, layer: int) -> list[torch.Tensor]:
        """Views of seq's cache memory for one layer, in prompt position order, each
        [tokens_in_block, 2, num_kv_heads, head_dim] and contiguous: a receiver can write the
        export layout straight into them (one view per block), with no staging copy."""
        self._check_import(seq, layer)
        bs, n = self.kv.block_size, seq.prompt_len
        cache = self.kv.tensor[layer]
        return [cache[b * bs: b * bs + min(bs, n - i * bs)]
                for i, b in enumerate(seq.block_table[: -(-n // bs)])]

    def import_span_pattern(self, seq: Sequence) -> tuple[list[tuple[int, int]], list[int]]:
        """Where seq's prompt KV goes, as raw memory (host caches only): layer 0's
        (address, nbytes) spans in prompt position order, adjacent blocks merged, and each
        layer's address shift from them (one block table, a fixed layer stride). A receiver that
        writes bytes (shared memory) places the export layout with it, block ids unseen."""
        if self.device.type != "cpu":
            raise InvalidRequestError("raw KV spans exist for host caches only")
        self._check_import(seq, 0)
        cache, bs, n = self.kv.tensor, self.kv.block_size, seq.prompt_len
        token_bytes = cache.stride(1) * cache.element_size()
        base = cache.data_ptr()
        spans: list[tuple[int, int]] = []
        for i, b in enumerate(seq.block_table[: -(-n // bs)]):
            off, size = base + b * bs * token_bytes, min(bs, n - i * bs) * token_bytes
            if spans and spans[-1][0] + spans[-1][1] == off:
                spans[-1] = (spans[-1][0], spans[-1][1] + size)
            else:
                spans.append((off, size))
        layer_bytes = cache.stride(0) * cache.element_size()
        return spans, [i * layer_bytes for i in range(cache.shape[0])]

    def _check_import(self, seq: Sequence, layer: int) -> None:
        if not 0 <= layer < self.model_config.num_layers:
            raise InvalidRequestError(f"layer {layer} outside [0, {self.model_config.num_layers})")
        if self.kv.blocks_needed(seq.block_table, seq.prompt_len):
            raise InvalidRequestError(f"request {seq.request_id} has no blocks reserved for import")

    def finish_import(self, seq: Sequence, first_token_id: int) -> None:
        """Marks the imported prompt computed and appends the token the prompt machine sampled."""
        seq.num_computed_tokens = seq.prompt_len
        seq.status = SeqStatus.RUNNING
        self._append(seq, first_token_id)

    # -- internals -------------------------------------------------------------------------

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _ensure_blocks(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        need = sum(self.kv.blocks_needed(s.block_table, n) for s, n in zip(seqs, num_tokens))
        if need > self.kv.pool.num_free_blocks:
            raise KVCacheExhausted(need, self.kv.pool.num_free_blocks, self.kv.num_blocks)
        for s, n in zip(seqs, num_tokens):
            self.kv.grow(s.block_table, n)

    def _check_decode(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if s.status != SeqStatus.RUNNING or s.num_computed_tokens != s.num_tokens - 1:
                raise InvalidRequestError(f"request {s.request_id} is not ready to decode ({s})")

    @staticmethod
    def _check_distinct(seqs: list[Sequence]) -> None:
        if len({id(s) for s in seqs}) != len(seqs):
            raise InvalidRequestError("a request appears twice in one step")

    def _forward_step(self, decode_seqs: list[Sequence], chunks: list[tuple[Sequence, int]],
                      kv_export: KVExportHook | None) -> list[int | None]:
        """The one forward pass behind prefill, decode and step (arguments already checked).

        Flat batch layout: the B decode rows first, then each chunk's tokens."""
        chunk_seqs = [s for s, _ in chunks]
        ends = [s.num_computed_tokens + n for s, n in chunks]
        self._ensure_blocks([*decode_seqs, *chunk_seqs], [s.num_tokens for s in decode_seqs] + ends)
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.int64))
        ids, positions, slots = [], [], []
        b = len(decode_seqs)
        if decode_seqs:
            d_slots, meta.decode_slots, meta.decode_mask = self._decode_reads(decode_seqs)
            ids.append(torch.tensor([s.last_token_id for s in decode_seqs], dtype=torch.int64))
            positions.append(torch.tensor([s.num_tokens - 1 for s in decode_seqs], dtype=torch.int64))
            slots.append(d_slots)
        if chunks:
            c_ids, c_pos, meta.prefill, last = [], [], [], []
            offset = b
            for s, end in zip(chunk_seqs, ends):
                start = s.num_computed_tokens
                c_ids += s.prompt_token_ids[start:end]
                c_pos += range(start, end)
                slots.append(self.kv.slots(s.block_table, start, end))
                meta.prefill.append(PrefillSlice(
                    offset, end - start, start,
                    self.kv.slots(s.block_table, 0, end).to(self.device) if start else None,
                    causal_mask(start, end - start, self.device) if start else None))
                offset += end - start
                last.append(offset - 1)
            ids.append(torch.tensor(c_ids, dtype=torch.int64))
            positions.append(torch.tensor(c_pos, dtype=torch.int64))
        meta.slot_mapping = torch.cat(slots).to(self.device)
        hook = None
        if kv_export is not None:
            def hook(layer: int, kv: torch.Tensor) -> None:
                kv_export(layer, [(s, kv[sl.query_start:sl.query_start + sl.query_len].contiguous())
                                  for s, sl in zip(chunk_seqs, meta.prefill)])
        hidden = self.model.forward(torch.cat(ids).to(self.device),
                                    torch.cat(positions).to(self.device), meta, self.kv.tensor, hook)
        for s in decode_seqs:
            s.num_computed_tokens = s.num_tokens
        done = [i for i, (s, end) in enumerate(zip(chunk_seqs, ends)) if end == s.prompt_len]
        for s, end in zip(chunk_seqs, ends):
            s.num_computed_tokens = end
            if end == s.prompt_len:
                s.status = SeqStatus.RUNNING
        if not chunks:
            rows = hidden  # decode only: every row is sampled
        else:
            index = list(range(b)) + [last[i] for i in done]
            rows = hidden[torch.tensor(index, dtype=torch.int64, device=self.device)]
        sampled = [*decode_seqs, *(chunk_seqs[i] for i in done)]
        tokens = self._sample_and_update(sampled, rows) if sampled else []
        out: list[int | None] = tokens[:b] + [None] * len(chunks)
        for i, t in zip(done, tokens[b:]):
            out[b + i] = t
        return out

    def _decode_reads(self, seqs: list[Sequence]):
        """For decode rows: the slot of each new token [B], the slots each query reads [B, L]
        (padded to the longest context) and the padding mask [B, 1, 1, L] (None if none)."""
        bs = self.kv.block_size
        ctx_lens = [s.num_tokens for s in seqs]
        max_len = max(ctx_lens)
        width = -(-max_len // bs)
        tables = torch.tensor([s.block_table[:width] + [0] * (width - len(s.block_table[:width]))
                               for s in seqs], dtype=torch.int64)  # [B, blocks]
        pos = torch.arange(max_len)
        gather = tables[:, pos // bs] * bs + pos % bs  # [B, L]
        lens = torch.tensor(ctx_lens)
        slot_mapping = gather[torch.arange(len(seqs)), lens - 1]
        mask = None
        if min(ctx_lens) != max_len:
            valid = pos[None, :] < lens[:, None]  # [B, L]
            # Padded positions read the request's own newest slot, never unwritten memory: the
            # cache is torch.empty, and a NaN there would survive the mask (0 * NaN = NaN in P @ V).
            gather = torch.where(valid, gather, slot_mapping[:, None])
            mask = valid[:, None, None, :].to(self.device)
        return slot_mapping, gather.to(self.device), mask

    def _sample_and_update(self, seqs: list[Sequence], hidden: torch.Tensor) -> list[int]:
        logits = self.model.logits(hidden)
        tokens = sample(logits, self.model.refine_greedy(hidden, logits), [s.params for s in seqs],
                        [len(s.output_token_ids) for s in seqs], self.generator)
        for s, t in zip(seqs, tokens):
            self._append(s, t)
        return tokens

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_token_ids.append(token)
        p = seq.params
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            seq.status = SeqStatus.FINISHED_STOPPED
        elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.status = SeqStatus.FINISHED_LENGTH
        if seq.finished:
            self.free(seq)


def _max_model_len(mc: ModelConfig, configured: int | None) -> int:
    limit = mc.max_position_embeddings
    if mc.sliding_window:
        # Sliding-window attention is not implemented: stay inside the window, where it is exact.
        limit = min(limit, mc.sliding_window)
    if configured is None:
        return limit
    if configured > limit:
        raise ValueError(f"max_model_len {configured} exceeds the model's limit {limit}")
    return configured
