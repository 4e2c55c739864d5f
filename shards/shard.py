"""The per-device worker: the replicated non-expert weights, its slice of every layer's
experts (MXFP4), the paged KV cache of the sequences homed here, and one forward step
for its local batch. Every shard runs every step, even with nothing local, because the
experts' all-to-all is collective."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from gptoss_ray.model.checkpoint import load_model
from gptoss_ray.model.eagle3_config import Eagle3Config
from gptoss_ray.model.grammar import Matchers
from gptoss_ray.model.kv_cache import SequenceBatch
from gptoss_ray.model.model import Transformer
from gptoss_ray.model.model_folder import read_config, resolve_model
from gptoss_ray.model.sampling import Draw, sample_rows, step_seed, token_logprobs
from gptoss_ray.model.types import (
    DeviceMemory,
    KVLayout,
    SamplingParams,
    SeqWork,
    StepPlan,
    StepResult,
    TokenLogprob,
    step_bucket,
)
from gptoss_ray.router.moe import EXCHANGES, StepTimer
from gptoss_ray.router.plan import expert_ranges, owner_table
from gptoss_ray.router.transport import LocalTransport, Transport
from gptoss_ray.shards.decode_graphs import DecodeGraphs, GraphCaptureError
from gptoss_ray.shards.drafting import DraftChunk, DraftProposer
from gptoss_ray.shards.kv_cache import PagedBatchView, PagedKVCache, PagedSequence
from gptoss_ray.shards.loras import ShardLoras


class Shard:
    def __init__(
        self,
        model: str | Path | Transformer,
        *,
        rank: int,
        world_size: int,
        transport: Transport,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        kv_layout: KVLayout | None = None,
        kv_budget_bytes: int = 256 * 2**20,
        block_size: int = 16,
        kernels: bool | None = None,
        decode_graphs: bool | None = None,
        exchange: str = "tokens",
        time_phases: bool | None = None,
        draft_model: str | Path | None = None,
        num_draft_tokens: int = 4,
        max_loras: int = 0,
        max_lora_rank: int = 16,
    ) -> None:
        """kernels: run experts and attention through the Triton kernels (default: on a
        GPU), or the torch reference path. decode_graphs: replay decode steps from CUDA
        graphs, every bucket captured here (default: on a GPU with the kernels; on a CPU,
        True runs the same static decode step eagerly). exchange: "tokens", the expert
        exchange in fixed-size buffers, or "pairs", the routing-sized one it replaced
        (router/moe.py; eager steps only). time_phases: report each phase's seconds (the
        default on a CPU; on a GPU it waits for the device at every phase), or only the
        step's. draft_model: an EAGLE-3 draft's folder; the shard then proposes
        num_draft_tokens drafts for each drawing sequence after every step
        (`StepResult.drafts`; shards/drafting.py). max_loras: LoRA slots (0: no LoRA),
        holding what each plan's table says (`StepPlan.loras`), ranks up to
        max_lora_rank (`model.lora`)."""
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.time_phases = self.device.type != "cuda" if time_phases is None else time_phases
        self.transport = transport
        if isinstance(model, Transformer):  # built in memory (random full-size benchmarks)
            ranges = expert_ranges(model.config.num_experts, world_size)
            if model.expert_range != ranges[rank]:
                raise ValueError(
                    f"shard {rank} of {world_size} needs experts {ranges[rank]}, the model "
                    f"holds {model.expert_range}"
                )
            self.model = model
        else:
            model = resolve_model(model)
            ranges = expert_ranges(read_config(model).num_experts, world_size)
            self.model = load_model(model, dtype=dtype, device=self.device, experts=ranges[rank])
        self.experts = ranges[rank]
        self.config = self.model.config
        # the other shards' experts are reached through the exchange (one shard has all)
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange {exchange!r}: expected one of {sorted(EXCHANGES)}")
        self.exchange = EXCHANGES[exchange](owner_table(ranges).to(self.device), transport)
        self.model.distribute(self.exchange if world_size > 1 else None)
        kernels = self.device.type == "cuda" if kernels is None else kernels
        self.model.use_kernels(kernels)
        draft_bytes = (
            Eagle3Config.from_folder(draft_model).kv_bytes_per_token(dtype.itemsize)
            if draft_model is not None
            else 0
        )
        layout = kv_layout or KVLayout.from_budget(
            self.config,
            kv_budget_bytes,
            bytes_per_value=dtype.itemsize,
            block_size=block_size,
            draft_bytes_per_token=draft_bytes,
        )
        self.dtype = dtype
        self.kv = PagedKVCache(self.config, layout, dtype=dtype, device=self.device)
        # rows each local expert has received, per layer, since the shard started; kept
        # on the device so that counting costs no synchronisation in the step
        self.expert_load = torch.zeros(
            self.config.num_hidden_layers,
            self.config.num_experts,
            dtype=torch.long,
            device=self.device,
        )
        self.model.count_expert_load(self.expert_load)
        self.proposer = (
            DraftProposer(draft_model, self.model, layout, k=num_draft_tokens, device=self.device)
            if draft_model is not None
            else None
        )
        if self.proposer is not None:
            self.proposer.use_kernels = kernels
        # a graph holds the exchange only where its sizes do not follow the routing
        graphable = world_size == 1 or exchange == "tokens"
        self.loras = ShardLoras(self, max_loras, max_lora_rank)
        if decode_graphs and self.proposer is not None:
            raise ValueError("decode graphs do not return the taps an EAGLE-3 draft reads")
        if decode_graphs and self.loras.slots is not None:
            raise ValueError("decode graphs do not hold LoRA adapters yet")
        if decode_graphs is None:
            decode_graphs = (
                self.device.type == "cuda"
                and kernels
                and graphable
                and self.proposer is None
                and self.loras.slots is None
            )
        if decode_graphs and not graphable:
            raise ValueError(
                f"decode graphs need the fixed-size exchange between {world_size} shards: "
                f"the {exchange!r} exchange has routing-dependent sizes"
            )
        self.graphs = (
            DecodeGraphs(
                self.model, self.kv, self.expert_load, self.exchange if world_size > 1 else None
            )
            if decode_graphs
            else None
        )
        # each sequence's token drawn in the last step it sampled: overlapped steps decode
        # it before the scheduler has seen it (`SeqWork.last_drawn`)
        self.drawn: dict[str, int] = {}
        # every token so far of the sequences whose draws depend on them (penalties, grammars)
        self.history: dict[str, list[int]] = {}
        self.params: dict[str, SamplingParams] = {}  # sent with a sequence's first work here
        # grammars of constrained sequences; their masks are built while the step runs
        self.matchers = Matchers()
        self._mask_thread: ThreadPoolExecutor | None = None
        self._tapped: list[torch.Tensor] = []  # the step's taps, for the draft
        self.mask_seconds = 0.0  # building masks, off the critical path (benchmarks read it)

    def capture_graphs(self) -> float:
        """Captures every bucket's decode step (the kernels compile in the warm-ups), so
        that no request waits for either -> the seconds it took. With several shards all
        must call it together (the warm-ups run the exchange), and again after the process
        group is formed anew (the graphs hold its communicator). A failed capture is
        reported once and the shard decodes eagerly."""
        if self.graphs is None:
            return 0.0
        self.graphs.graphs.clear()
        try:
            return self.graphs.capture_all()
        except GraphCaptureError as exc:
            self._without_graphs(exc)
            return 0.0

    def measure_memory(
        self, measure: Callable[[torch.device], tuple[int, int]] | None = None
    ) -> DeviceMemory:
        """Runs the largest bucket's decode step (with decode graphs: their static step,
        eagerly; its activations stay with the allocator), then reads the device's memory
        (`measure`: device -> (free, total) bytes; `device_memory` by default). The KV
        cache held now counts as free: `resize_kv` replaces it with the one sized from
        the readings. With several shards all call it together (the step runs the
        exchange)."""
        if self.graphs is not None:
            with torch.inference_mode():
                self.graphs.warm(self.graphs.buckets[-1])
        free, total = (measure or device_memory)(self.device)
        drafts = self.proposer.nbytes() if self.proposer is not None else 0  # replaced too
        return DeviceMemory(free + self.kv.nbytes() + drafts, total)

    def resize_kv(self, layout: KVLayout) -> None:
        """Replaces the KV cache, before any sequence is placed, and the decode graphs'
        buffers, which hold it (capture them after: `capture_graphs`)."""
        if self.kv.tables:
            raise RuntimeError(f"shard {self.rank}: the KV cache holds sequences")
        graphs = self.graphs is not None
        self.kv = self.graphs = None  # type: ignore[assignment]  # the old cache's memory first
        self.kv = PagedKVCache(self.config, layout, dtype=self.dtype, device=self.device)
        if self.proposer is not None:
            self.proposer.resize(layout)
        if graphs:
            self.graphs = DecodeGraphs(
                self.model,
                self.kv,
                self.expert_load,
                self.exchange if self.world_size > 1 else None,
            )

    def _without_graphs(self, exc: GraphCaptureError) -> None:
        print(
            f"shard {self.rank}: {exc} failed ({exc.__cause__!r}); decoding without CUDA "
            "graphs from now on",
            flush=True,
        )
        self.graphs = None

    def free_blocks(self) -> tuple[int, int]:
        return self.kv.free_blocks()

    def release_all(self) -> None:
        """Forgets every sequence (their keys stay in the blocks, for the prefix cache)."""
        for seq_id in list(self.kv.tables):
            self.kv.release(seq_id)
        self.drawn.clear()
        self.history.clear()
        self.params.clear()
        self.matchers = Matchers()

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepResult:
        timer = StepTimer(self.device, self.time_phases)
        self._tapped.clear()  # (a failed step's)
        for seq_id in plan.release:
            self.kv.release(seq_id)
            self.drawn.pop(seq_id, None)
            self.history.pop(seq_id, None)
            self.params.pop(seq_id, None)
            self.matchers.drop(seq_id)
        self.loras.sync(plan.loras)
        for sliding, source, destination in plan.copies:
            self.kv.copy(sliding, source, destination)
            if self.proposer is not None and not sliding:  # the draft's keys go with them
                self.proposer.copy(source, destination)
        for w in plan.work:
            if w.params is not None:
                self.params[w.seq_id] = w.params
            for fork_id, _ in w.forks:  # forked choices share their parent's parameters
                self.params[fork_id] = self.params[w.seq_id]
        work = [w for w in plan.work if w.size]
        ids = [[self.drawn[w.seq_id]] if w.last_drawn else w.tokens for w in work]
        for w, chunk in zip(work, ids, strict=True):
            if w.drafts and not (
                w.sample and 0 < w.drafts < len(w.tokens) and not w.forks and w.score is None
            ):
                raise ValueError(
                    f"shard {self.rank}: sequence {w.seq_id}'s {w.drafts} draft tokens must "
                    "follow a known token in a decode that draws (no forks, no scoring)"
                )
            if w.context is not None:
                self.history[w.seq_id] = list(w.context)
            if w.seq_id in self.history:  # drafts join it once accepted
                self.history[w.seq_id].extend(chunk[: len(chunk) - w.drafts])
                for fork_id, _ in w.forks:  # forked choices start with their parent's
                    self.history[fork_id] = list(self.history[w.seq_id])
        caches = [self.kv.place(w.seq_id, w.start, w.blocks) for w in work]
        bucket = plan.bucket
        if bucket is None:
            if self.world_size > 1:
                raise ValueError(
                    f"shard {self.rank} of {self.world_size}: a step's plan needs its bucket "
                    "(StepPlan.bucket, the same on every shard)"
                )
            bucket = step_bucket(sum(len(t) for t in ids))
        tokens, logprobs, prompt_logprobs = self._draw(work, ids, caches, timer, bucket)
        out: dict[str, int] = {}
        asked: dict[str, TokenLogprob] = {}
        accepted: dict[str, list[int]] = {}
        accepted_logprobs: dict[str, list[TokenLogprob | None]] = {}
        draw = 0  # the draws come per sampled chunk: each draft position's, or each fork's
        for w in work:
            if not w.sample:
                continue
            if w.drafts:
                got = tokens[draw : draw + w.drafts + 1]
                lps = logprobs[draw : draw + w.drafts + 1]
                draw += w.drafts + 1
                proposed = w.proposed
                kept = accepted_prefix(got, proposed)
                accepted[w.seq_id], out[w.seq_id] = proposed[:kept], got[kept]
                if lps[kept] is not None:
                    asked[w.seq_id], accepted_logprobs[w.seq_id] = lps[kept], lps[:kept]
                self.kv.rollback(w.seq_id, w.drafts - kept)  # the rejected drafts' keys
                if w.seq_id in self.history:
                    self.history[w.seq_id].extend(proposed[:kept])
                continue
            for seq_id in [w.seq_id, *(f for f, _ in w.forks)]:
                out[seq_id] = tokens[draw]
                if logprobs[draw] is not None:
                    asked[seq_id] = logprobs[draw]
                draw += 1
        self.drawn.update(out)
        for w in work:  # a fork's grammar starts where its parent's is before the draw
            if w.sample and w.seq_id in self.matchers.by_seq:
                for fork_id, _ in w.forks:
                    self.matchers.fork(w.seq_id, fork_id)
        for seq_id, token in out.items():
            for draft in accepted.get(seq_id, ()):
                self.matchers.consume(seq_id, draft)
            self.matchers.consume(seq_id, token)
        # and freeing the step's logits, which is the step's own work, not the round trip's
        # (on a CPU the unmapping of batch 64's 51 MB takes 4.5 ms here)
        timer.lap("sampling")
        drafts = {}
        if self._tapped:
            drafts = self._propose(work, ids, caches, out, accepted)
            timer.lap("drafting")
        return StepResult(
            out, timer.done(), asked, prompt_logprobs, accepted, accepted_logprobs, drafts
        )

    def _propose(
        self,
        work: list[SeqWork],
        ids: list[list[int]],
        caches: list[PagedSequence],
        out: dict[str, int],
        accepted: dict[str, list[int]],
    ) -> dict[str, list[int]]:
        """The EAGLE-3 draft over the step's chunks (the target's taps of their rows),
        proposing for each drawing sequence that speculates."""
        taps = self._tapped.pop()
        chunks = []
        for w, chunk, cache in zip(work, ids, caches, strict=True):
            if w.sample:  # a drafted decode's rows past its first rejected draft are void
                after = out[w.seq_id]
                valid = len(chunk) - w.drafts + len(accepted.get(w.seq_id, ()))
            else:
                after, valid = w.next_token, len(chunk)
            if after is None:
                raise ValueError(f"shard {self.rank}: {w.seq_id}'s chunk came without next_token")
            speculates = w.sample and not w.forks and self.params[w.seq_id].speculative
            chunks.append(DraftChunk(w.seq_id, cache, w.start, chunk, after, valid, speculates))
        return self.proposer.propose(chunks, taps)  # type: ignore[union-attr]

    def _draws(
        self, work: list[SeqWork], masks: tuple[list[int], torch.Tensor] | None
    ) -> tuple[list[int], list[Draw]]:
        """The draws of the sampled rows (each row once, then once per fork of it) and the
        row of the logits each uses. A sequence's history is split at its draw index into
        the prompt and what was drawn before; a constrained row's grammar mask (`masks`:
        the rows that have one, and the bitmasks by row) goes with each of its draws."""
        constrained, bitmask = (set(masks[0]), masks[1]) if masks is not None else (set(), None)
        rows, draws = [], []
        row = 0  # a drafted chunk has a row per draft position and one after
        for w in (w for w in work if w.sample):
            params = self.params[w.seq_id]
            prompt: list[int] | tuple = ()
            output: list[int] | tuple = ()
            if params.penalized:  # only penalties read the history (a grammar has a matcher)
                history = self.history[w.seq_id]
                cut = len(history) - w.draw_index
                prompt, output = history[:cut], history[cut:]
            proposed = w.proposed
            for r in range(w.drafts + 1):
                allowed = bitmask[row] if row in constrained else None  # type: ignore[index]
                # at a draft's position the target draws as if the drafts before were its
                # own: one more token drawn, those drafts in the history its penalties read
                n = w.draw_index + r
                stops = params.stop_ids(self.config.eos_token_ids) if n < params.min_tokens else ()
                past = [*output, *proposed[:r]] if r and params.penalized else output
                for seed in _seeds(w):
                    rows.append(row)
                    draws.append(Draw(params, seed, n, prompt, past, frozenset(stops), allowed))
                row += 1
        return rows, draws

    def _draw(
        self,
        work: list[SeqWork],
        ids: list[list[int]],
        caches: list[PagedSequence],
        timer: StepTimer,
        bucket: int,
    ) -> tuple[list[int], list[TokenLogprob | None], dict[str, list[TokenLogprob]]]:
        """Runs the step's tokens through the model, every shard's padded to `bucket` rows
        in the exchange -> the sampled sequences' draws, their logprobs (where asked) and
        the scored chunks' prompt logprobs."""
        if bucket == 0:  # no shard has tokens: no layer to run, no exchange to join
            return [], [], {}
        sampled = [i for i, w in enumerate(work) if w.sample]
        drawn_rows = sum(work[i].drafts + 1 for i in sampled)
        masks = self._masks_while_the_step_runs([work[i] for i in sampled])
        decode = all(len(t) == 1 for t in ids) and not any(w.score is not None for w in work)
        logits = None
        prompt_logprobs: dict[str, list[TokenLogprob]] = {}
        if self.graphs is not None and decode and self.graphs.fits(caches, bucket):
            try:
                logits = self.graphs.run(caches, [t[0] for t in ids], bucket)
            except GraphCaptureError as exc:
                # keys the warm-up wrote are the ones the eager step writes again
                self._without_graphs(exc)
        if logits is not None:
            if len(sampled) < len(work):
                logits = logits[sampled]
            for cache in caches:
                cache.commit(1)
            timer.lap("decode graph")  # buffers, replay
        else:
            ends = list(itertools.accumulate(len(t) for t in ids))
            scored = self._scored(work, ids, ends)
            # a sampled chunk's last row, or with drafts its last drafts + 1 rows
            rows = [r for i in sampled for r in range(ends[i] - 1 - work[i].drafts, ends[i])]
            adapters = self.loras.token_slots(work, [len(t) for t in ids])
            logits = self._forward(
                ids, caches, rows + [r for _, r, _, _ in scored], timer, bucket, adapters
            )
            if scored:
                prompt_logprobs = self._score(work, scored, logits[drawn_rows:])
                logits = logits[:drawn_rows]
            timer.lap("head")  # final norm, unembedding, prompt logprobs
        ready = None
        if masks is not None:
            ready = masks.result()
            timer.lap("grammar wait")  # what building the masks added to the step
        rows, draws = self._draws(work, ready)
        if rows != list(range(drawn_rows)):  # a row drawn from more than once (forks)
            logits = logits[rows]
        tokens, logprobs = sample_rows(logits, draws, owned=True) if sampled else ([], [])
        timer.lap("sampling")  # grammar masks, bias, penalties, logprobs, draws
        return tokens, logprobs, prompt_logprobs

    def _masks_while_the_step_runs(self, sampled: list[SeqWork]) -> Future | None:
        """The grammar masks of the drawn rows (a sampled chunk's, or each of a drafted
        chunk's: there the matcher as if the drafts before were drawn), built in a thread
        while the model runs (llguidance works outside the GIL) -> a future of
        (constrained rows, bitmask)."""
        constrained = [i for i, w in enumerate(sampled) if self.params[w.seq_id].grammar]
        if not constrained:
            return None
        first = [0, *itertools.accumulate(w.drafts + 1 for w in sampled)]

        def build() -> tuple[list[int], torch.Tensor]:
            start = time.perf_counter()
            ids: list[str | None] = [None] * first[-1]
            ahead: list[list[int]] = [[] for _ in ids]
            for i in constrained:
                w = sampled[i]
                if w.seq_id not in self.matchers.by_seq:  # placed here: its history replayed
                    history = self.history.get(w.seq_id, [])
                    drawn = history[len(history) - w.draw_index :] if w.draw_index else []
                    self.matchers.start(w.seq_id, self.params[w.seq_id].grammar, drawn)  # type: ignore[arg-type]
                proposed = w.proposed
                for r in range(w.drafts + 1):
                    ids[first[i] + r], ahead[first[i] + r] = w.seq_id, proposed[:r]
            bitmask = self.matchers.masks(ids, ahead)
            self.mask_seconds += time.perf_counter() - start
            return [row for row, s in enumerate(ids) if s is not None], bitmask

        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return self._mask_thread.submit(build)

    @staticmethod
    def _scored(
        work: list[SeqWork], ids: list[list[int]], ends: list[int]
    ) -> list[tuple[int, int, int, int]]:
        """The rows whose logits score a prompt's next token (`SeqWork.score`): (work,
        row, target token, top k), the chunk's rows in order."""
        out = []
        for i, w in enumerate(work):
            if w.score is None:
                continue
            targets = ids[i][1:] + ([w.next_token] if w.next_token is not None else [])
            first = ends[i] - len(ids[i])
            out += [(i, first + j, t, w.score) for j, t in enumerate(targets)]
        return out

    @staticmethod
    def _score(
        work: list[SeqWork], scored: list[tuple[int, int, int, int]], logits: torch.Tensor
    ) -> dict[str, list[TokenLogprob]]:
        """The scored rows' logits -> each sequence's prompt logprobs, in order."""
        lps = token_logprobs(logits, [t for _, _, t, _ in scored], [k for *_, k in scored])
        out: dict[str, list[TokenLogprob]] = {}
        for (i, *_), lp in zip(scored, lps, strict=True):
            out.setdefault(work[i].seq_id, []).append(lp)
        return out

    def _forward(
        self,
        ids: list[list[int]],
        caches: list[PagedSequence],
        rows: list[int],
        timer: StepTimer,
        bucket: int,
        adapters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step through the layers, any mix of prefill chunks and decodes (or none: the
        exchange needs every shard), the exchange padded to `bucket` rows -> logits of the
        given rows of the flat tokens. adapters: each token's LoRA slot."""
        lengths = [len(t) for t in ids]
        batch = SequenceBatch(
            caches, lengths, PagedBatchView(caches, lengths) if ids else None, adapters
        )
        tokens = torch.tensor(
            [t for chunk in ids for t in chunk], dtype=torch.long, device=self.device
        )
        self.exchange.timer, self.exchange.rows = timer.inner, bucket
        taps = self.proposer.taps if self.proposer is not None else ()
        return self.model(
            tokens, batch, rows=rows, timer=timer.inner, taps=taps, tapped=self._tapped
        )


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes: a GPU's from CUDA; a CPU shard's from the host's available
    memory (Linux's /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemAvailable"], fields["MemTotal"]


class NullShard(Shard):
    """A shard that does no model work, to measure the host loop alone (`gptoss-ray bench
    sweep --null-model`): the same plans placed on the same block tables (on torch's meta
    device: no memory), and the same results, each sampled sequence's token a function of
    its seed and draw index."""

    def __init__(
        self, model: str | Path, *, rank: int, world_size: int, kv_layout: KVLayout
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("meta")
        self.time_phases = True
        self.config = read_config(resolve_model(model))
        self.experts = expert_ranges(self.config.num_experts, world_size)[rank]
        self.model = None
        self.transport = LocalTransport()  # no exchange: its results need none
        self.kv = PagedKVCache(self.config, kv_layout, dtype=torch.bfloat16, device=self.device)
        self.expert_load = torch.zeros(
            self.config.num_hidden_layers, self.config.num_experts, dtype=torch.long
        )
        self.graphs = None
        self.proposer = None
        self._tapped = []
        self.loras = ShardLoras(self, 0, 0)
        self.drawn = {}
        self.history = {}
        self.params = {}
        self.matchers = Matchers()

    def _draw(
        self,
        work: list[SeqWork],
        ids: list[list[int]],
        caches: list[PagedSequence],
        timer: StepTimer,
        bucket: int,
    ) -> tuple[list[int], list[TokenLogprob | None], dict[str, list[TokenLogprob]]]:
        for w, cache in zip(work, caches, strict=True):
            cache.commit(w.size)
        timer.lap("null")
        # ordinary tokens (ids below the special ones), never a stop token
        draws = [
            (seed, w.draw_index + r)
            for w in work
            if w.sample
            for r in range(w.drafts + 1)
            for seed in _seeds(w)
        ]
        tokens = [step_seed(seed, n) % 100_000 for seed, n in draws]
        return tokens, [None] * len(tokens), {}


def accepted_prefix(drawn: list[int], proposed: list[int]) -> int:
    """How many proposed tokens the target's own draws at their positions agree with, in
    order. Drawing the target's token and comparing it with a proposed one is the
    rejection rule for a draft that proposes one token for sure (n-gram, greedy drafts):
    the draft is kept with the target's probability of it, and where it is not, the
    target's token is drawn from the rest of its distribution. The reply is the one the
    same seed gives without drafts."""
    for r, token in enumerate(proposed):
        if drawn[r] != token:
            return r
    return len(proposed)


def _seeds(w: SeqWork) -> list[int]:
    """The seeds of a sampled chunk's draws: its sequence's, then each fork's."""
    return [w.seed, *(seed for _, seed in w.forks)]
