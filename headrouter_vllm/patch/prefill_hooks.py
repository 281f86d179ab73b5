"""``prefill`` semantics (DESIGN §5 phase C): above the probe layer, the prompt step stops computing the audio rows
it does not keep.

In the step that finishes a routed prompt (the scheduler puts the prompt from its first audio token on in that
one step), the probe at layer ``l_p`` selects the kept audio. Between layers ``l_p`` and ``l_p + 1`` the batch loses
the rows of the dropped audio: hidden states, residual and positions are indexed down, and every layer above
attends with metadata rebuilt for the shorter batch, in which the request *is* the shortened sequence (kept audio
and text, original RoPE positions, KV written straight to the compacted slots). Only layers ``0..l_p`` are compacted
after the step. The decoder's output is scattered back to the full row count, so vLLM's logits indexing is
unchanged (the dropped rows' outputs are zeros and never sampled).

Hooks: a forward pre-hook on each decoder layer above ``l_p`` and a forward hook on the decoder's final norm
(module hooks run only eagerly: ``prefill`` needs ``enforce_eager``), plus a wrapper on the attention metadata
builders' ``build`` that keeps the step's ``CommonAttentionMetadata`` to rebuild from. Works with vLLM's CPU
attention (CPU_ATTN) and its TRITON_ATTN (tested interpreted on CPU; the GPU's stock backend that prefill accepts).
"""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass
class Reduction:
    """This step's row reduction."""

    rows: torch.Tensor  # kept batch rows (ascending), on the model's device
    num_tokens: int  # rows before the reduction
    new_index: torch.Tensor  # full row -> reduced row (-1: dropped), on CPU


class PrefillShortener:
    def __init__(self, runner, decoder, probe_layer: int, upper_layer_names: set[str]):
        groups = getattr(getattr(runner, "kv_cache_config", None), "kv_cache_groups", ())
        if len(groups) > 1:  # a builder skipped in some step would leave an older step's metadata to rebuild from
            raise RuntimeError(f"headrouter.semantics 'prefill' supports models with one KV cache group, this one has "
                               f"{len(groups)} (e.g. sliding-window layers): use after_prompt")
        self.runner = runner
        self.probe_layer = probe_layer
        self.upper_layer_names = upper_layer_names  # attention layers above the probe layer
        self.active: Reduction | None = None
        self.rows_dropped = 0  # audio rows not computed above the probe layer, since start (tests, logs)
        self._built: dict[int, tuple] = {}  # builder id -> (builder, common_prefix_len, common metadata)
        for index, layer in enumerate(decoder.layers):
            if index > probe_layer:
                layer.register_forward_pre_hook(functools.partial(self._before_layer, first=index == probe_layer + 1))
        # the decoder model's own __call__ is vLLM's compile wrapper, which skips module hooks: its final norm's
        # output is where the reduced rows go back to full size
        decoder.norm.register_forward_hook(self._after_decoder)
        for groups in runner.attn_groups:
            for group in groups:
                for builder in group.metadata_builders:
                    if self.upper_layer_names & set(builder.layer_names):
                        self._keep_common_metadata(builder)

    def _keep_common_metadata(self, builder) -> None:
        build = builder.build

        def keeping(common_prefix_len, common_attn_metadata, *args, **kwargs):
            self._built[id(builder)] = (builder, common_prefix_len, common_attn_metadata)
            return build(common_prefix_len, common_attn_metadata, *args, **kwargs)

        builder.build = keeping

    def new_step(self) -> None:
        self.active = None

    def translate(self, rows: torch.Tensor) -> torch.Tensor:
        """Batch rows -> rows of the reduced batch, while a reduction is active (layers above the probe layer)."""
        return rows if self.active is None else self.active.new_index[rows]

    # ---- hooks ---------------------------------------------------------------------------------
    def _before_layer(self, module, args, first: bool):
        if first:
            self.active = self._reduce(args[1].shape[0])
        if self.active is None:
            return None
        positions, hidden, residual = args
        rows = self.active.rows
        positions = positions[..., rows]
        if first:
            hidden = hidden[rows]
            residual = None if residual is None else residual[rows]
        return positions, hidden, residual

    def _after_decoder(self, module, args, output):
        if self.active is None:
            return None
        hidden, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        full = hidden.new_zeros((self.active.num_tokens, *hidden.shape[1:]))
        full[self.active.rows] = hidden
        self.active = None
        return full if rest is None else (full, *rest)

    # ---- the reduction -------------------------------------------------------------------------
    def _reduce(self, num_tokens: int) -> Reduction | None:
        runner = self.runner
        items = [item for item in runner.hr_step
                 if item.final and item.state.plan.semantics == "prefill" and item.state.kept is not None]
        if not items:
            return None
        keep = torch.ones(num_tokens, dtype=torch.bool)
        removed_rows = {}  # batch request index -> rows dropped from its query
        drops = {}
        for item in items:
            plan = item.state.plan
            if item.computed > plan.spans[0].start:
                raise RuntimeError(f"headrouter: request {item.req_id}'s audio is split across prefill chunks")
            audio = torch.cat([torch.arange(sp.start, sp.end) for sp in plan.spans])
            dropped = audio[~torch.isin(audio, item.state.kept)]
            keep[item.token_start + dropped - item.computed] = False
            removed_rows[runner.input_batch.req_id_to_index[item.req_id]] = dropped.numel()
            drops[item.req_id] = dropped
        rows = torch.nonzero(keep).flatten()
        self.rows_dropped += num_tokens - rows.numel()
        new_index = torch.full((num_tokens,), -1, dtype=torch.int64)
        new_index[rows] = torch.arange(rows.numel())
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        if not isinstance(context.attn_metadata, dict) or not isinstance(context.slot_mapping, dict):
            raise RuntimeError("headrouter semantics 'prefill' needs one attention metadata dict per step")
        for builder, prefix, common in self._built.values():
            metadata, slots = self._rebuild(builder, prefix, common, num_tokens, rows, removed_rows, items, drops)
            for name in self.upper_layer_names & set(builder.layer_names):
                context.attn_metadata[name] = metadata
                context.slot_mapping[name] = slots
        device = runner.device
        return Reduction(rows.to(device), num_tokens, new_index)

    def _rebuild(self, builder, prefix, common, num_tokens, rows, removed_rows, items, drops):
        """The step's attention metadata for the reduced batch: fewer query rows for the shortened requests, their
        sequence lengths less the dropped audio, their surviving rows' KV slots those of the compacted layout."""
        num_reqs = common.num_reqs
        removed = torch.zeros(common.seq_lens.shape[0], dtype=torch.int32)  # per request (padded like seq_lens)
        for index, count in removed_rows.items():
            removed[index] = count
        qsl_cpu = common.query_start_loc_cpu.clone()
        query_lens = qsl_cpu[1:num_reqs + 1] - qsl_cpu[:num_reqs] - removed[:num_reqs].to(qsl_cpu.dtype)
        qsl_cpu[1:num_reqs + 1] = torch.cumsum(query_lens, 0)
        qsl_cpu[num_reqs + 1:] = qsl_cpu[num_reqs]
        device_rows = rows.to(common.slot_mapping.device)
        slots = common.slot_mapping[:num_tokens][device_rows].clone()
        block_size = builder.kv_cache_spec.block_size
        for item in items:
            dropped = drops[item.req_id]
            positions = torch.arange(item.computed, item.computed + item.num_tokens)
            survivors = positions[~torch.isin(positions, dropped)]
            compacted = survivors - torch.searchsorted(dropped, survivors)
            table = item.block_ids
            start = int(qsl_cpu[self.runner.input_batch.req_id_to_index[item.req_id]])
            new = table[compacted // block_size] * block_size + compacted % block_size
            slots[start:start + survivors.numel()] = new.to(slots)
        seq_lens = common.seq_lens - removed.to(common.seq_lens)
        if common.seq_lens_cpu_upper_bound is not None:
            changes_bound = common.seq_lens_cpu_upper_bound - removed[:common.seq_lens_cpu_upper_bound.shape[0]].to(
                common.seq_lens_cpu_upper_bound.dtype)
        changes = dict(query_start_loc=qsl_cpu.to(common.query_start_loc.device), query_start_loc_cpu=qsl_cpu,
                       seq_lens=seq_lens, num_actual_tokens=int(rows.numel()), max_query_len=int(query_lens.max()),
                       max_seq_len=int(seq_lens.max()), slot_mapping=slots,
                       positions=None if common.positions is None else common.positions[device_rows],
                       _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
        if common.seq_lens_cpu_upper_bound is not None:
            changes["seq_lens_cpu_upper_bound"] = changes_bound
        return builder.build(prefix, dataclasses.replace(common, **changes)), slots
