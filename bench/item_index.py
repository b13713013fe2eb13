"""Time to index 40,000 items on the CPU: text embedding and RQ-VAE, separately.

    python bench/item_index.py [--items 40000] [--cache /tmp/peso-bench] [--machine CPU-2]

Item texts are synthetic, generated deterministically (seed 0) in the shape of Amazon product
metadata: a title (brand, descriptive words, product noun, model or pack size) and a category
path, plus a short feature phrase; about 25 words, nearly all distinct. Their first windows
follow the paper's split: 60% of the items in window 0, the rest spread over windows 1-4.

Two timed stages, in this one process:
(a) embedding every text with the bundled all-MiniLM-L6-v2 (`Embedder("minilm")`, model load
    included), saved as .npy;
(b) `build_index` from that .npy: fit the RQ-VAE on the window-0 items with the default
    settings, code all items window by window, resolve collisions, write item_index.json.
Prints one JSON line: both times, the collision rate before and after resolution, the
per-level perplexity, the reconstruction loss before/after training, date and machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CATEGORIES = {
    "Musical Instruments": [
        "guitar strings",
        "drum sticks",
        "guitar pedal",
        "microphone",
        "keyboard stand",
        "capo",
        "ukulele",
        "tuner",
        "amplifier",
        "audio interface",
        "violin bow",
        "harmonica",
    ],
    "CDs & Vinyl": [
        "vinyl record",
        "live album",
        "box set",
        "greatest hits",
        "soundtrack",
        "remastered CD",
        "jazz collection",
        "EP",
        "double LP",
        "concert recording",
    ],
    "Kitchen": [
        "chef knife",
        "frying pan",
        "coffee grinder",
        "cutting board",
        "mixing bowls",
        "tea kettle",
        "spice rack",
        "blender",
        "dutch oven",
        "measuring cups",
    ],
    "Books": [
        "paperback novel",
        "cookbook",
        "travel guide",
        "biography",
        "graphic novel",
        "poetry collection",
        "history book",
        "workbook",
        "field guide",
        "short stories",
    ],
    "Sports & Outdoors": [
        "yoga mat",
        "camping tent",
        "water bottle",
        "hiking backpack",
        "resistance bands",
        "fishing reel",
        "bike light",
        "sleeping bag",
        "tennis racket",
        "climbing rope",
    ],
    "Toys & Games": [
        "puzzle",
        "board game",
        "building blocks",
        "plush toy",
        "card game",
        "model kit",
        "remote control car",
        "doll house",
        "science kit",
        "marble run",
    ],
    "Electronics": [
        "bluetooth speaker",
        "usb cable",
        "phone case",
        "wireless earbuds",
        "power bank",
        "hdmi adapter",
        "webcam",
        "smart plug",
        "memory card",
        "desk lamp",
    ],
    "Beauty": [
        "face serum",
        "shampoo",
        "lip balm",
        "hair dryer",
        "nail polish",
        "sunscreen",
        "body lotion",
        "makeup brush set",
        "perfume",
        "beard oil",
    ],
}
SUBCATEGORIES = [
    "Accessories",
    "Essentials",
    "Classics",
    "Professional",
    "Beginner",
    "Premium",
    "Travel",
    "Kids",
    "Home",
    "Gifts",
    "Outdoor",
    "Studio",
]
ADJECTIVES = [
    "classic",
    "compact",
    "deluxe",
    "durable",
    "ergonomic",
    "lightweight",
    "portable",
    "premium",
    "professional",
    "rugged",
    "slim",
    "vintage",
    "waterproof",
    "wireless",
    "handmade",
    "organic",
    "stainless",
    "acoustic",
    "electric",
    "heavy-duty",
    "adjustable",
    "foldable",
    "rechargeable",
    "natural",
    "modern",
    "retro",
    "large",
    "small",
    "black",
    "blue",
    "red",
    "green",
    "wooden",
    "bamboo",
    "ceramic",
    "leather",
    "cotton",
    "silicone",
    "steel",
]
FEATURES = (
    "easy to clean",
    "gift ready",
    "for beginners and pros",
    "long lasting",
    "made in USA",
    "limited edition",
    "eco friendly packaging",
    "two year warranty",
    "fits most models",
    "includes carrying case",
    "dishwasher safe",
    "BPA free",
    "hand tuned",
    "studio quality sound",
    "perfect for travel",
    "non-slip grip",
    "batteries included",
    "signed by the artist",
)
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ze",
    "tu",
    "no",
    "vi",
    "sa",
    "pe",
    "dor",
    "lin",
    "mar",
    "ton",
    "bel",
    "fin",
    "gro",
    "hal",
]


def generate_items(n: int, seed: int = 0) -> list[dict]:
    """n items with realistic, deterministic texts; 60% first seen in window 0, the rest in 1-4."""
    rng = np.random.default_rng(seed)
    brands = sorted({"".join(rng.choice(SYLLABLES, rng.integers(2, 4))).capitalize() for _ in range(600)})
    cats = list(CATEGORIES)
    # Popular brands, categories and words recur (Zipf-like), as in real catalogs.
    brand_p = 1.0 / np.arange(1, len(brands) + 1) ** 0.8
    brand_p /= brand_p.sum()
    items = []
    n0 = int(n * 0.6)
    for i in range(n):
        cat = cats[rng.integers(len(cats))]
        noun = CATEGORIES[cat][rng.integers(len(CATEGORIES[cat]))]
        brand = brands[rng.choice(len(brands), p=brand_p)]
        adjs = " ".join(rng.choice(ADJECTIVES, rng.integers(1, 4), replace=False))
        model = (
            f"{rng.choice(['X', 'Pro', 'S', 'Max', 'Mini', 'Series'])}-{rng.integers(10, 999)}"
            if rng.random() < 0.6
            else f"Pack of {rng.integers(2, 13)}"
        )
        title = f"{brand} {adjs} {noun} {model}".replace("  ", " ")
        feats = ", ".join(rng.choice(FEATURES, rng.integers(1, 4), replace=False))
        text = f"{title}; category: {cat} > {SUBCATEGORIES[rng.integers(len(SUBCATEGORIES))]}; {feats}"
        window = 0 if i < n0 else 1 + (i - n0) * 4 // (n - n0)
        items.append({"item_id": i, "source_id": f"B{i:09d}", "title": title, "text": text, "first_window": window})
    return items


def main() -> None:
    from data_tools.help_format import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--items", type=int, default=40000, help="synthetic items to index")
    p.add_argument("--cache", default="/tmp/peso-bench", help="where the items and the index are written")
    p.add_argument("--machine", default=f"CPU-{os.cpu_count()}", help="the machine's name in the JSON line")
    a = p.parse_args()

    import torch

    from data_tools.dataset import ITEMS
    from data_tools.index.build import CodingOptions, build_index
    from data_tools.index.embed import Embedder

    root = os.path.join(a.cache, f"item-index-{a.items}")
    os.makedirs(root, exist_ok=True)
    items = generate_items(a.items)
    with open(os.path.join(root, ITEMS), "w") as f:
        f.writelines(json.dumps(it) + "\n" for it in items)
    texts = [it["text"] for it in items]

    t0 = time.perf_counter()
    x = Embedder("minilm", device="cpu", progress=False)(texts, [it["item_id"] for it in items])
    embed_s = time.perf_counter() - t0
    npy = os.path.join(root, "minilm.npy")
    np.save(npy, x)

    t0 = time.perf_counter()
    doc = build_index(root, CodingOptions(embedder=f"npy:{npy}"), force=True, progress=False, log=io.StringIO())
    index_s = time.perf_counter() - t0

    m = doc["method"]
    c = m["collisions"]
    print(
        json.dumps(
            {
                "bench": "item_index",
                "date": time.strftime("%Y-%m-%d"),
                "machine": a.machine,
                "platform": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
                "items": len(items),
                "distinct_texts": len(set(texts)),
                "fit_items": m["fit"]["items"],
                "embed_s": round(embed_s, 1),
                "embed_items_per_s": round(len(items) / embed_s, 1),
                "rqvae_index_s": round(index_s, 1),
                "rqvae_epochs": m["training"]["epochs"],
                "rqvae_steps": m["training"]["steps"],
                "reconstruction": [m["training"]["start"]["reconstruction"], m["training"]["end"]["reconstruction"]],
                "collision_rate_before": round(c["before"]["items_sharing_a_code"] / len(items), 5),
                "collision_rate_after": round(c["after"]["items_sharing_a_code"] / len(items), 5),
                "reassigned": sum(s["reassigned"] for s in c["steps"]),
                "perplexity": doc["perplexity"],
            }
        )
    )


if __name__ == "__main__":
    main()
