"""Synthetic interleaved token documents for `--mock-data` (Megatron-LM's flag), the laptop default.

Why not uniform random tokens: nothing could be learned and a user could not
tell a working run from a broken one. Tokens follow a fixed sparse Markov
chain (each token has four likely successors) in text runs, with "image"
blocks of a fixed length drawn from the upper part of the vocabulary between
`<break>`-like marker tokens, so the loss falls from ln(V) towards ln(4) when
training works. Every sample is a pure function of (seed, sample index), so a
resumed run sees exactly the samples it would have seen.
"""

import torch

FANOUT = 4


class MockInterleavedData:
    def __init__(self, vocab_size: int, seq_length: int, seed: int = 1234, image_fraction: float = 0.25,
                 tokens_per_image: int = 16, num_samples: int | None = None):
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        self.num_samples = num_samples
        self.text_vocab = int(vocab_size * (1 - image_fraction))
        self.break_id = self.text_vocab - 1  # a reserved marker at the end of the text range
        self.tokens_per_image = tokens_per_image
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, FANOUT), generator=g)

    def _successor_lists(self) -> list[list[int]]:
        if getattr(self, "_successors_py", None) is None:
            self._successors_py = self.successors.tolist()
        return self._successors_py

    def sample(self, index: int) -> torch.Tensor:
        """seq_length + 1 tokens of sample `index` (modulo `num_samples` if set)."""
        if self.num_samples:
            index %= self.num_samples
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self.seq_length + 1
        choice = torch.randint(0, FANOUT, (n,), generator=g).tolist()
        tok = int(torch.randint(0, self.text_vocab, (1,), generator=g))
        successors = self._successor_lists()
        chain = []
        for c in choice:  # the walk in plain Python: indexing tensors per token cost 70 ms per 4 x 2048
            chain.append(tok)
            tok = successors[tok][c]
        out = torch.tensor(chain, dtype=torch.long)
        start = int(torch.randint(0, max(1, n - self.tokens_per_image - 2), (1,), generator=g))
        img = self.text_vocab + (out[start:start + self.tokens_per_image] % (self.vocab_size - self.text_vocab))
        out[start] = self.break_id
        out[start + 1:start + 1 + len(img)] = img[: n - start - 1]
        return out

    def microbatch(self, first_index: int, micro_batch_size: int) -> dict:
        """A Megatron-style batch dict for samples [first_index, first_index + micro_batch_size)."""
        ids = torch.stack([self.sample(first_index + i) for i in range(micro_batch_size)])
        return {
            "tokens": ids[:, :-1].contiguous(),
            "labels": ids[:, 1:].contiguous(),
            "loss_mask": torch.ones(micro_batch_size, self.seq_length),
            "position_ids": torch.arange(self.seq_length).expand(micro_batch_size, -1).contiguous(),
            "modality": (ids[:, 1:] >= self.text_vocab).long(),  # of each target token
        }
