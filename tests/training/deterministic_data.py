"""Deterministic synthetic training data for training-loop tests: sample i is a function of i.

Lets resume tests compare runs exactly without media decoding. It follows the real loader's
contract: micro-batches of this data-parallel rank, starting at `consumed` samples."""

from __future__ import annotations

from functools import partial

import torch

from nemo_avllm import modality
from nemo_avllm.data.collate import collate_av, collate_tokens
from nemo_avllm.data.conversation import TokenizedSample
from nemo_avllm.data.packing import collate_packed, make_spec


class _Pseudo:
    """What the MAT sampler needs of a manifest sample: sample i is V, A, AV by i % 3."""

    def __init__(self, i: int):
        self.modality = ("V", "A", "AV")[i % 3]

    def available_views(self, derive: bool) -> list[str]:
        return [self.modality]


class SyntheticData:
    def __init__(self, num_samples: int = 64, seq_length: int = 64, vocab: int = 512, image_size: int = 64,
                 nan_at_sample: int | None = None, nan_grad_at_samples: tuple[int, ...] = (), mat: bool = False):
        """`nan_at_sample`: that sample's video is NaN (NaN loss). `nan_grad_at_samples`: the
        backward of a micro-batch holding one of them makes one LLM gradient NaN while the loss
        stays finite (a fault injected through a real autograd hook). `mat`: micro-batches come
        from the real MAT sampler (`model.data.mat_ratios`, `modality_schedule`), so a
        micro-batch may lack a modality; otherwise sample i of a rank's share follows i % 3."""
        self.mat = mat
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab = vocab
        self.image_size = image_size
        self.nan_at_sample = nan_at_sample
        self.nan_grad_at_samples = tuple(nan_grad_at_samples)

    def sample(self, i: int, layout: modality.TokenLayout) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        tok = modality.MODALITY_TOKENS[i % 3]  # _Pseudo(i).modality
        q = torch.randint(3, 60, (3,), generator=g).tolist()
        # answers follow a learnable rule: tokens determined by the question
        a = [(x * 7) % (self.vocab - 3) + 3 for x in q]
        exp = layout.expansion(tok)
        ids = [1] + q + exp + a + [2]
        labels = [modality.IGNORE_INDEX] * (1 + len(q) + len(exp)) + a + [2]
        return {
            "id": f"synthetic{i}",
            "modality": {"<VIS>": "V", "<AUD>": "A", "<AUD_VIS>": "AV"}[tok],
            "tokens": TokenizedSample(ids, labels),
            "video": torch.randn(layout.num_frames, 3, self.image_size, self.image_size, generator=g),
            "audio": 0.1 * torch.randn(layout.num_audio_segments, 480000, generator=g),
        }

    def loader(self, model, consumed: int, max_steps: int | None = None):
        from megatron.core import parallel_state as ps

        layout = model.layout
        mbs, gbs = int(model._cfg.micro_batch_size), int(model._cfg.global_batch_size)
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = gbs // dp
        poison = {"on": False}
        if self.nan_grad_at_samples:
            weight = model.avllm.llm.embedding.word_embeddings.weight
            weight.register_hook(lambda g: g * float("nan") if poison["on"] else g)

        def collate(idx):
            items = [self.sample(i, layout) for i in idx]
            batch = collate_tokens([it["tokens"] for it in items], seq_length=self.seq_length)
            batch["video"] = torch.stack([it["video"] for it in items])
            batch["audio"] = torch.stack([it["audio"] for it in items])
            return batch

        packed = model._cfg.data.get("packing", False) and self.nan_at_sample is None and not self.nan_grad_at_samples
        if self.mat:
            from nemo_avllm.data.mat_sampler import MATBatchSampler

            d = model._cfg.data
            sampler = MATBatchSampler(
                [_Pseudo(i) for i in range(self.num_samples)], dict(d.mat_ratios), gbs, mbs, rank, dp,
                seed=int(model._cfg.get("seed", 0)), consumed_samples=consumed, schedule=str(d.modality_schedule),
                split=float(d.modality_schedule_split), max_steps=max_steps)

            def gen_mat():
                step = []  # with packing: the rank's share of a step, packed as one loader item
                while True:
                    for mb in sampler:
                        if not packed:
                            yield collate([i for i, _ in mb])
                            continue
                        step += [i for i, _ in mb]
                        if len(step) == per_rank:
                            yield self._pack(model, step)
                            step = []

            return _Loader(gen_mat)
        if packed:
            return _Loader(partial(self._packed, model, consumed))

        def gen():
            start = consumed
            while True:
                for m in range(0, per_rank, mbs):
                    idx = [(start + rank * per_rank + m + j) % self.num_samples for j in range(mbs)]
                    batch = collate(idx)
                    if self.nan_at_sample is not None and self.nan_at_sample in idx:
                        batch["video"] = batch["video"] * float("nan")
                    # PP=1 runs each micro-batch's backward before fetching the next one
                    poison["on"] = any(i in self.nan_grad_at_samples for i in idx)
                    yield batch
                start += gbs

        return _Loader(gen)


    def _packed(self, model, consumed: int):
        """With model.data.packing: one item per step, this rank's share packed like the real
        loader packs it (`data.packing.collate_packed`)."""
        from megatron.core import parallel_state as ps

        gbs, dp, rank = int(model._cfg.global_batch_size), ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = gbs // dp
        start = consumed
        while True:
            yield self._pack(model, [(start + rank * per_rank + j) % self.num_samples for j in range(per_rank)])
            start += gbs

    def _pack(self, model, idx: list[int]) -> dict:
        cfg = model._cfg
        spec = make_spec(self.seq_length, int(cfg.micro_batch_size), int(cfg.get("pipeline_model_parallel_size", 1)) > 1,
                         model.avllm.cfg.transformer_impl == "transformer_engine")
        return collate_packed([self.sample(i, model.layout) for i in idx], spec, partial(collate_av, pad_id=0))


class _Loader:
    """An iterable Lightning accepts as a train dataloader (re-iterable, unknown length)."""

    def __init__(self, gen):
        self.gen = gen

    def __iter__(self):
        return self.gen()
