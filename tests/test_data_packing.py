"""Packing, truncation, left padding (checked by brute force) and deterministic batching."""
import numpy as np
import pytest

from regft_jax.data import (
    IndexStream,
    MixtureBatcher,
    PromptBatcher,
    eval_batches,
    left_pad,
    make_global_batch,
    pack_documents,
    process_row_positions,
    truncate_documents,
)
from regft_jax.errors import UserInputError

PAD, BOS, EOS = 0, 1, 2


def _docs(seed, n=12, max_len=9):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, 50, rng.integers(0, max_len))) for _ in range(n)]


def _expected_rows(streams, seq_len):
    """Brute force: (token, is_target, doc) triples cut into rows, with per-row segments."""
    flat = [item for stream in streams for item in stream]
    rows = [flat[i:i + seq_len] for i in range(0, len(flat), seq_len)]
    out = {k: np.zeros((len(rows), seq_len), np.int32)
           for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    out["tokens"][:] = PAD
    for r, row in enumerate(rows):
        segment, position, last_doc = 0, 0, None
        for t, (token, target, doc) in enumerate(row):
            if doc != last_doc:
                segment, position, last_doc = segment + 1, 0, doc
            out["tokens"][r, t], out["loss_mask"][r, t] = token, target
            out["segment_ids"][r, t], out["positions"][r, t] = segment, position
            position += 1
    return out


@pytest.mark.parametrize("bos, eos", [(BOS, EOS), (None, EOS), (BOS, None), (None, None)])
@pytest.mark.parametrize("seed, seq_len", [(0, 2), (1, 5), (2, 16), (3, 64)])
def test_pack_documents_brute_force(bos, eos, seed, seq_len):
    docs = _docs(seed)
    streams = []
    for d, doc in enumerate(docs):
        tokens = ([bos] if bos is not None else []) + doc + ([eos] if eos is not None else [])
        streams.append([(tok, int(not (i == 0 and bos is not None)), d) for i, tok in enumerate(tokens)])
    packed = pack_documents(docs, seq_len, pad_id=PAD, bos_id=bos, eos_id=eos)
    expected = _expected_rows(streams, seq_len)
    for name, array in expected.items():
        np.testing.assert_array_equal(getattr(packed, name), array, err_msg=name)
        assert getattr(packed, name).dtype == np.int32
    assert packed.num_rows == expected["tokens"].shape[0] and packed.seq_len == seq_len


def test_pack_empty_and_bad_seq_len():
    assert pack_documents([], 8, pad_id=PAD).tokens.shape == (0, 8)
    assert pack_documents([[], []], 8, pad_id=PAD).num_rows == 0
    with pytest.raises(UserInputError, match="seq_len"):
        pack_documents([[3]], 1, pad_id=PAD)


@pytest.mark.parametrize("seq_len", [2, 4, 7, 12])
def test_truncate_documents_brute_force(seq_len):
    docs = _docs(5)
    packed = truncate_documents(docs, seq_len, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert packed.tokens.shape == (len(docs), seq_len)
    for r, doc in enumerate(docs):
        piece = ([BOS] + doc + [EOS])[:seq_len]
        n = len(piece)
        np.testing.assert_array_equal(packed.tokens[r], piece + [PAD] * (seq_len - n))
        np.testing.assert_array_equal(packed.segment_ids[r], [1] * n + [0] * (seq_len - n))
        np.testing.assert_array_equal(packed.loss_mask[r], [0] + [1] * (n - 1) + [0] * (seq_len - n))
        np.testing.assert_array_equal(packed.positions[r], list(range(n)) + [0] * (seq_len - n))


def test_left_pad_brute_force():
    prompts = [[5], [6, 7, 8], [9, 10]]
    ids, mask = left_pad(prompts, pad_id=PAD)
    assert ids.shape == (3, 3) and ids.dtype == np.int32
    for r, p in enumerate(prompts):
        assert list(ids[r]) == [PAD] * (3 - len(p)) + p
        assert list(mask[r]) == [0] * (3 - len(p)) + [1] * len(p)
    ids, mask = left_pad(prompts, pad_id=PAD, length=2, truncate=True)
    assert ids.tolist() == [[PAD, 5], [7, 8], [9, 10]] and mask.tolist() == [[0, 1], [1, 1], [1, 1]]
    with pytest.raises(UserInputError, match="prompt 1 has 3 tokens"):
        left_pad(prompts, pad_id=PAD, length=2)
    with pytest.raises(UserInputError, match="prompt 0 is empty"):
        left_pad([[]], pad_id=PAD)


# ----------------------------------------------------------------------------- batching


def _rows(num_docs, seed, seq_len=8):
    return pack_documents(_docs(seed, num_docs), seq_len, pad_id=PAD, bos_id=BOS, eos_id=EOS)


def test_index_stream_epochs_are_permutations():
    stream = IndexStream(7, seed=1)
    taken = stream.take(0, 21)
    for epoch in range(3):
        assert sorted(taken[epoch * 7:(epoch + 1) * 7]) == list(range(7))
    np.testing.assert_array_equal(stream.take(5, 9), taken[5:14])  # random access
    np.testing.assert_array_equal(IndexStream(7, seed=1).take(3, 4), taken[3:7])


def test_mixture_batcher_deterministic_quotas_and_multi_process():
    rows = {"general": _rows(30, 0), "toxic": _rows(10, 1)}
    batcher = MixtureBatcher(rows, {"general": 0.75, "toxic": 0.25}, global_batch_size=8, seed=0)
    again = MixtureBatcher(rows, {"general": 0.75, "toxic": 0.25}, global_batch_size=8, seed=0)
    for step in (0, 1, 17):
        batch = batcher.batch(step)
        assert batch["tokens"].shape == (8, 8) and batch["domain"].shape == (8,)
        assert np.sum(batch["domain"] == 0) == 6 and np.sum(batch["domain"] == 1) == 2
        for name, array in again.batch(step).items():
            np.testing.assert_array_equal(array, batch[name])
        for count in (2, 4):  # the processes' local batches add up to the global batch
            local = [batcher.local_batch(step, p, count) for p in range(count)]
            for name, array in batch.items():
                np.testing.assert_array_equal(np.concatenate([x[name] for x in local]), array)
    # Every row appears in the packed arrays of its own domain.
    batch = batcher.batch(3)
    for tokens, domain in zip(batch["tokens"], batch["domain"]):
        source = rows["general" if domain == 0 else "toxic"].tokens
        assert (source == tokens).all(axis=1).any()
    different = MixtureBatcher(rows, {"general": 0.75, "toxic": 0.25}, 8, seed=1).batch(0)
    assert not np.array_equal(different["tokens"], batcher.batch(0)["tokens"])
    steps = list(zip(range(3), batcher(start_step=1)))
    np.testing.assert_array_equal(steps[0][1]["tokens"], batcher.batch(1)["tokens"])
    with pytest.raises(UserInputError, match="no packed rows for domains"):
        MixtureBatcher({"general": rows["general"]}, {"general": 1, "toxic": 1}, 8, seed=0)


def test_eval_batches_cover_every_row_once():
    rows = {"general": _rows(9, 2), "toxic": _rows(5, 3)}
    domain_ids = {"general": 0, "toxic": 1}
    seen = {0: [], 1: []}
    for batch in eval_batches(rows, domain_ids, global_batch_size=4):
        assert batch["tokens"].shape[0] == 4
        for tokens, domain, valid, mask in zip(batch["tokens"], batch["domain"], batch["valid"],
                                               batch["loss_mask"]):
            if valid:
                seen[int(domain)].append(tokens)
            else:
                assert not mask.any()
    for name, i in domain_ids.items():
        np.testing.assert_array_equal(np.stack(seen[i]), rows[name].tokens)


def test_prompt_batcher():
    ids, mask = left_pad([[i + 3] * (i % 3 + 1) for i in range(10)], pad_id=PAD)
    batcher = PromptBatcher(ids, mask, global_batch_size=4, seed=0)
    batch = batcher.batch(2)
    np.testing.assert_array_equal(batch["input_ids"], ids[batch["prompt_index"]])
    np.testing.assert_array_equal(
        np.concatenate([batcher.local_batch(2, p, 2)["prompt_index"] for p in range(2)]),
        batch["prompt_index"])
    covered = [i for b in batcher.once() for i, v in zip(b["prompt_index"], b["valid"]) if v]
    assert covered == list(range(10))


def test_global_batch_on_fake_devices():
    import jax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    positions = process_row_positions(sharding, 16)
    np.testing.assert_array_equal(positions, np.arange(16))  # one process supplies every row
    rows = {"general": _rows(40, 4)}
    batcher = MixtureBatcher(rows, {"general": 1.0}, global_batch_size=16, seed=0)
    local = batcher.batch(0, positions)
    batch = make_global_batch(local, sharding, 16)
    assert batch["tokens"].shape == (16, 8) and batch["tokens"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
