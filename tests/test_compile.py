"""--compile=True compiles a bounded number of graphs: packed batches change their row length and
target count every step, and train.wrap's torch.compile must not recompile for each (torch's limit
of 8 recompiles per function then sends it back to eager). Traced by Dynamo with its "eager"
backend, which makes the same graphs and guards as inductor without generating code (seconds, not
minutes); the losses must equal the eager model's."""

import functools
import random

import pytest
import torch

import dataset
import llama
import train
from chunked_loss import token_loss_sum


@pytest.fixture
def dynamo_counters():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def batches(rng, n):
    """n packed micro-batches of random examples: each has another row length and target count."""
    out = []
    for _ in range(n):
        examples = []
        for _ in range(rng.randint(2, 9)):
            length, prompt = rng.randint(4, 40), rng.randint(1, 3)
            examples.append(
                (
                    [rng.randrange(3, 64) for _ in range(length)],
                    [0] * prompt + [1] * (length - prompt),
                )
            )
        out.append(dataset.collate(examples, 0, "cpu", pack=True))
    return out


def test_compiled_model_compiles_a_bounded_number_of_graphs(dynamo_counters, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(train, "compile", True)
    monkeypatch.setattr(train, "fsdp", False)
    config = llama.LlamaConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        vocab_size=64,
        max_seq_len=64,
        tie_embeddings=True,
    )
    torch.manual_seed(0)
    model = llama.Llama(config)
    model.init_weights()
    model.loss_chunk = 16  # several chunks for the longer batches
    compiled = train.wrap(model)
    rng = random.Random(0)
    shapes = set()
    for x, y, positions, segments in batches(rng, 8):
        shapes.add((x.shape, int((y != dataset.IGNORE).sum())))
        loss = token_loss_sum(compiled, x, y, positions, segments)
        loss.backward()
        assert loss.item() == pytest.approx(
            token_loss_sum(model, x, y, positions, segments).item(), rel=1e-5
        )
    assert len(shapes) == 8
    # the model's graphs (up to the data-dependent selection of the targets, then after it), traced
    # once for all shapes; the chunked loss runs eager (its loop over chunks would compile per
    # target count)
    assert dynamo_counters["stats"]["unique_graphs"] <= 3, dict(dynamo_counters["stats"])
    assert sum(dynamo_counters["recompiles"].values()) == 0, dict(dynamo_counters["recompiles"])
