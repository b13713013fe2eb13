"""Users per second of batched, trie-constrained beam search against one user at a time.

    python bench/eval.py [--shape tiny] [--users 256] [--batch 64] [--beams 10] [--repeats 3]
                         [--device cpu] [--dtype auto]

The same model and prompts, side by side:
- batched: what training's evaluation runs per batch (`decode_batch` in train/evaluation/beam_search.py), in
  the run's compute dtype (`--dtype auto`: bf16 on a GPU that has it, else fp32, as training
  resolves it): a batch of users at once, the prompt run once per user and its KV cache shared
  by the user's beams (each step feeds the beams' newest tokens as one row per user, with a 4D
  attention mask), each step's trie mask built on the device from the trie's tensors, and the
  batch's codes and scores read back once;
- batched with host masks: the same, with each step's mask built as before on the host from
  the beams' prefixes (read back every step) and copied to the device: the difference is what
  the device trie saves (on a GPU mostly the copies of a [batch x beams, vocabulary] mask and
  the sync per step; on a CPU the Python work);
- one at a time, as the reference implementation decodes: Hugging Face `generate` with beam
  search for one user per call, constrained by a `prefix_allowed_tokens_fn` that asks the trie;
- one at a time with our own beam search (to separate the two effects).
The catalog is the paper's CDs index (39,191 items) when the shared data is there, else random
codes, imported as the framework imports an index; the tokenizer, codebook and prompts are the
framework's (train/model/vocab.py), the compute dtype is resolved as training resolves it, and
the model is the shape's (train/model/shapes.py) with random weights. The top item of each is compared, and the two batched ways' codes and scores in full
(they must be equal). Each way runs `--repeats` times, interleaved; the medians are compared.
Prints one JSON line (goal: batched >= 10x the reference).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from transformers import LlamaForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_tools.dataset import ITEMS  # noqa: E402
from data_tools.help_format import HelpFormatter  # noqa: E402
from data_tools.index.build import import_index  # noqa: E402
from train.common.config import load_config  # noqa: E402
from train.common.run_folder import RunFolder  # noqa: E402
from train.dist.ds_config import resolve_dtype  # noqa: E402
from train.evaluation.beam_search import constrained_beam_search, decode_batch, decoding_forward  # noqa: E402
from train.model.build import DTYPES  # noqa: E402
from train.model.shapes import SHAPES, shape_config  # noqa: E402
from train.model.vocab import load_vocab  # noqa: E402

CDS = os.path.join(os.path.dirname(REPO), "shared", "data", "amazon-cds-blocks", "semantic_ids.json")


def catalog(folder: str) -> str:
    """`folder` as a dataset folder of items alone, with the item index the framework's importer
    makes (data_tools/index/build.py `import_index`): the paper's CDs index when the shared data is
    there (item ids in the file's order), else 40,000 items of random codes. One item has a text,
    "a record": the framework trains the tokenizer on the prompt template and the item texts."""
    if os.path.exists(CDS):
        codes = CDS
        with open(CDS) as f:
            sources = list(json.load(f))
    else:
        rng = random.Random(0)
        codes, sources = os.path.join(folder, "codes.json"), [str(i) for i in range(40000)]
        with open(codes, "w") as f:
            json.dump({s: [f"<{'abcd'[k]}_{rng.randrange(256)}>" for k in range(4)] for s in sources}, f)
    with open(os.path.join(folder, ITEMS), "w") as f:
        for i, source in enumerate(sources):
            f.write(json.dumps({"item_id": i, "source_id": source, **({"text": "a record"} if i == 0 else {})}) + "\n")
    import_index(folder, codes, log=io.StringIO())
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--shape", default="tiny", choices=list(SHAPES), help="the random-weight model (train/model/shapes.py)"
    )
    ap.add_argument("--users", type=int, default=256, help="users decoded by each way")
    ap.add_argument("--batch", type=int, default=64, help="users per batch of the batched way")
    ap.add_argument("--beams", type=int, default=10, help="beams of the beam search")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each way (the median counts)")
    ap.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
    ap.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="the model's dtype; auto: as training resolves it"
    )
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch sees no CUDA device here")
    cuda = device.type == "cuda"
    # The framework's defaults otherwise: the paper's prompt template, 20 history items.
    cfg = load_config(None, [f"model.shape={a.shape}", f"model.dtype={a.dtype}", "data.objective=response"])
    dtype = resolve_dtype(cfg, cuda, cuda and torch.cuda.is_bf16_supported())
    with tempfile.TemporaryDirectory() as tmp:
        data = catalog(tmp)
        # The run's vocabulary, as rank 0 of a world of one makes it (no other rank to wait for).
        single = SimpleNamespace(is_rank0=True, barrier=lambda: None)
        vocab = load_vocab(cfg, RunFolder(os.path.join(tmp, "run")), data, single)
    tok, book = vocab.tokenizer, vocab.codebook
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        shape_config(a.shape, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    ).eval()
    model.to(device, DTYPES[dtype])
    book.trie.on(device)  # built once per evaluation: not timed
    rng = random.Random(1)
    n_items = len(book)
    prompts = [vocab.encoder.prompt([rng.randrange(n_items) for _ in range(20)]) for _ in range(a.users)]

    forward = decoding_forward(model)

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def batched(masks: str) -> tuple[float, list]:
        """Training's evaluation path, batch by batch (the last batch padded, as ranks pad it)."""
        t0 = synced()
        out = []
        for k in range(0, len(prompts), a.batch):
            chunk = prompts[k : k + a.batch]
            codes, scores = decode_batch(
                forward,
                chunk + [chunk[0]] * (a.batch - len(chunk)),
                book,
                a.beams,
                tok.pad_token_id,
                device,
                trie_masks=masks,
                users=len(chunk),
            )
            out += list(zip(codes, scores))
        return synced() - t0, out

    def decode(batch: int) -> tuple[float, list]:
        t0 = synced()
        tops = []
        for k in range(0, len(prompts), batch):
            seqs, _ = constrained_beam_search(
                forward, prompts[k : k + batch], book.trie, 4, a.beams, tok.pad_token_id, device
            )
            tops += [tuple(s[0].tolist()) for s in seqs]
        return synced() - t0, tops

    def reference() -> tuple[float, list]:
        t0 = synced()
        tops = []
        for p in prompts:
            ids, n = torch.tensor([p], device=device), len(p)
            allowed = lambda batch_id, sent, n=n: book.trie.allowed(sent[n:].tolist()) or [tok.eos_token_id]
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                num_beams=a.beams,
                num_return_sequences=a.beams,
                max_new_tokens=4,
                min_new_tokens=4,
                do_sample=False,
                early_stopping=True,
                prefix_allowed_tokens_fn=allowed,
                pad_token_id=tok.pad_token_id,
                length_penalty=0.0,
            )
            tops.append(tuple(out[0, len(p) :].tolist()))
        return synced() - t0, tops

    batched("device"), batched("host")  # warm-up
    # Interleaved repeats, medians: this VM's speed drifts by 20-30% from one minute to the next.
    runs = [(batched("device"), batched("host"), decode(1), reference()) for _ in range(a.repeats)]
    (batched_s, batched_out), (host_s, host_out), (single_s, single_top), (reference_s, reference_top) = (
        (statistics.median(r[k][0] for r in runs), runs[0][k][1]) for k in range(4)
    )
    batched_top = [tuple(codes[0]) for codes, _ in batched_out]
    batches = -(-len(prompts) // a.batch)
    agree = sum(x == y for x, y in zip(batched_top, single_top)) / len(prompts)
    agree_ref = sum(x == y for x, y in zip(batched_top, reference_top)) / len(prompts)
    print(
        json.dumps(
            {
                "bench": "eval",
                "shape": a.shape,
                "users": a.users,
                "beams": a.beams,
                "batch": a.batch,
                "catalog_items": n_items,
                "dtype": dtype,
                "vocab": len(tok),
                "batched_users_per_s": round(a.users / batched_s, 2),
                "batched_host_masks_users_per_s": round(a.users / host_s, 2),
                "batch_ms_device_trie": round(1000 * batched_s / batches, 2),
                "batch_ms_host_masks": round(1000 * host_s / batches, 2),
                "ratio_host_masks_to_device_trie": round(host_s / batched_s, 3),
                "device_trie_equals_host_masks": batched_out == host_out,
                # what the host masks copied to the device per decoding step (bool, batch x beams x vocab)
                "host_mask_mb_per_step": round(a.batch * a.beams * len(tok) / 1e6, 2),
                "reference_hf_generate_users_per_s": round(a.users / reference_s, 2),
                "ours_one_at_a_time_users_per_s": round(a.users / single_s, 2),
                "ratio_batched_to_reference": round(reference_s / batched_s, 2),
                "ratio_batched_to_ours_one_at_a_time": round(single_s / batched_s, 2),
                "same_top1_share_vs_reference": round(agree_ref, 4),
                "same_top1_share_vs_ours_one_at_a_time": round(agree, 4),
                "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                "threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
