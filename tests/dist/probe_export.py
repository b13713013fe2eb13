"""Run in a fresh process by test_recommend.py: an exported recommender folder, without DeepSpeed,
scores a window's test users like the training run's evaluation did.

    python tests/dist/probe_export.py EXPORT DATA WINDOW MAX_USERS OUT.json [DEVICE]

Writes {"metrics", "lists", "deepspeed_imported", "generate_top"}: the metrics and per-user lists
of Recommender.from_export(EXPORT).evaluate_window, whether anything imported deepspeed, and
(for a merged export) the first item of Hugging Face `generate` with the TrieLogitsProcessor
for the first 8 users, from the plain folder.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    import torch

    from train.evaluation.users import test_users
    from train.serve.recommender import EXPORT_INFO, Recommender

    export, data, window, max_users, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
    torch.set_num_threads(1)
    rec = Recommender.from_export(export, device=device)
    metrics, lists = rec.evaluate_window(data, window, [5, 10, 20], max_users=max_users)
    result = {"metrics": metrics, "lists": lists}
    with open(os.path.join(export, EXPORT_INFO)) as f:
        merged = json.load(f)["kind"] == "merged"
    if merged:
        from transformers import AutoModelForCausalLM

        from data_tools.dataset import load_manifest
        from train.model import addons

        model = AutoModelForCausalLM.from_pretrained(export).eval()  # the folder alone, as a serving stack loads it
        extras = addons.from_export(export)  # plus its add-ons: the item vectors on the input (train/model/addons/)
        for stage in (addons.BACKBONE, addons.LORA):
            addons.attach(extras, model, stage)
        users = test_users(data, load_manifest(data), window, max_users, 0)[:8]
        top = []
        for u in users:
            prompt = rec.encoder.prompt(u["history"])
            ids = torch.tensor([prompt])
            with torch.no_grad():
                seqs = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    num_beams=20,
                    num_return_sequences=1,
                    max_new_tokens=rec.codebook.levels,
                    do_sample=False,
                    early_stopping=True,
                    logits_processor=[rec.logits_processor(len(prompt))],
                    pad_token_id=rec.tokenizer.pad_token_id,
                )
            top.append({"user": u["user"], "item": rec.codebook.item_of(seqs[0, len(prompt) :].tolist())})
        result["generate_top"] = top
    result["deepspeed_imported"] = "deepspeed" in sys.modules
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
