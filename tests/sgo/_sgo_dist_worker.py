"""Two-rank CPU/gloo worker for tests/sgo/test_sgo_distributed.py (run as a script, not collected).

Usage: python _sgo_dist_worker.py OUT_DIR [--no-sync]
Writes OUT_DIR/rank{r}.json. ``--no-sync`` turns off the all-reduced stop flag (to see the hang the
flag prevents; not used by the tests).
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB, PAD, MAX_NEW = 67, 0, 12
PROMPTS = {0: [[5, 9, 13], [60, 2]], 1: [[7, 3, 22, 40, 41], [33, 12]]}


def _build():
    from torchtune.models.llama2 import llama2

    torch.manual_seed(0)
    return llama2(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
        max_seq_len=64, intermediate_dim=64,
    )


def _count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def _t5_case(rank):
    """Encoder-decoder generation under FSDP2 (layers and root sharded, as the recipe does): the
    greedy ids of the unsharded model, with ranks stopping at different steps."""
    from distillm_tune.models.t5 import generate_seq2seq, t5
    from distillm_tune.training.distributed import shard_layers
    from distillm_tune.training.model_io import LAYER_CLASSES

    torch.manual_seed(0)
    model = t5(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4).eval()
    # rank 0: two equal rows, so both stop at the same step; rank 1: never stops early
    ids = torch.tensor([[5, 9, 13, 40], [5, 9, 13, 40]] if rank == 0 else [[7, 3, 22, 2], [33, 12, 19, 2]])
    ref_model = copy.deepcopy(model)
    free = generate_seq2seq(ref_model, ids, max_new_tokens=MAX_NEW, greedy=True, eos_id=VOCAB, sync_across_ranks=False,
                            pack_weights=False)
    eos = int(free[0, 2]) if rank == 0 else VOCAB  # rank 0 stops at step 3 at the latest
    ref = generate_seq2seq(ref_model, ids, max_new_tokens=MAX_NEW, greedy=True, eos_id=eos, sync_across_ranks=False,
                           pack_weights=False)
    shard_layers(model, LAYER_CLASSES)  # as the recipe shards a student
    got = generate_seq2seq(model, ids, max_new_tokens=MAX_NEW, greedy=True, eos_id=eos)
    return {"t5_ref": ref.tolist(), "t5_got": got.tolist()}


def worker(rank, out_dir, sync):
    from torch.distributed.fsdp import fully_shard

    from distillm_tune.sgo.policy import shared_uniform
    from distillm_tune.sgo.sampler import generate_responses

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rdzv", rank=rank, world_size=2)
    result = {}

    # shared_uniform: identically seeded generators, but rank 1 consumed one extra draw; the
    # broadcast still gives every rank rank 0's value.
    g = torch.Generator().manual_seed(1234)
    if rank == 1:
        torch.rand((), generator=g)
    result["u"] = [shared_uniform(g) for _ in range(3)]
    result["u_local_rank0"] = [float(torch.rand((), generator=torch.Generator().manual_seed(1234), dtype=torch.float64))]

    # rank 0: every token stops its rows, so it is done after the first sampled token;
    # rank 1: keeps sampling up to MAX_NEW tokens (EOS 1 rarely).
    eos = set(range(VOCAB)) if rank == 0 else {1}
    prompts = PROMPTS[rank]
    model = _build()
    ref_model = copy.deepcopy(model)
    ref_calls = _count_forwards(ref_model)
    ref = generate_responses(
        ref_model, prompts, max_new_tokens=MAX_NEW, eos_ids=eos, pad_id=PAD,
        generator=torch.Generator().manual_seed(100 + rank), sync_across_ranks=False,
    )
    for layer in model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    model.train()
    calls = _count_forwards(model)
    # the sampler's generation-time attention (sgo.sampler._prefix_attention) runs under FSDP2 too
    fast = []
    model.layers[0].attn.register_forward_pre_hook(lambda m, a: fast.append("forward" in vars(m)))
    got = generate_responses(
        model, prompts, max_new_tokens=MAX_NEW, eos_ids=eos, pad_id=PAD,
        generator=torch.Generator().manual_seed(100 + rank), sync_across_ranks=sync,
    )
    result.update(
        ref=ref, got=got, ref_forwards=len(ref_calls), forwards=len(calls),
        prefix_attention=bool(fast) and all(fast),
        training_after=model.training, caches_after=model.caches_are_setup(),
    )
    result.update(_t5_case(rank))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], "--no-sync" not in sys.argv), nprocs=2, join=True)
