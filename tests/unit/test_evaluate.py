"""Evaluation: metrics against hand-computed ranks; constrained beam search on a memorized
dataset and on adversarial models."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data_tools.index.prompt import PromptTemplate
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer
from train.evaluation.beam_search import NEG, constrained_beam_search, decoding_forward
from train.evaluation.ranking import rank_metrics


def test_rank_metrics_by_hand():
    ranks = [0, 2, None, 9, 4]  # 0-based rank of each user's target (None: not returned)
    m = rank_metrics(ranks, [1, 5, 10])
    assert m["hit@1"] == pytest.approx(1 / 5)
    assert m["hit@5"] == pytest.approx(3 / 5)
    assert m["hit@10"] == pytest.approx(4 / 5)
    assert m["ndcg@1"] == pytest.approx(1 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6)) / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
    assert rank_metrics([], [5]) == {"hit@5": 0.0, "ndcg@5": 0.0}


def test_a_users_beams_make_their_list_and_the_ranks_shares_make_the_windows_metrics():
    from train.evaluation.ranking import averages, catalogue_coverage, group_sums, recommendation_list

    class Book:  # code (i, 0) is item i; (9, 9) is no item's
        @staticmethod
        def item_of(code):
            return None if code == (9, 9) else code[0]

    codes = [[1, 0], [9, 9], [2, 0], [3, 0], [4, 0]]
    scores = [-1.0, -1.5, -2.0000004, -3.0, NEG]  # the last beam is dead
    items, item_scores, rank, invalid = recommendation_list(codes, scores, (3, 0), Book)
    assert (items, item_scores, rank, invalid) == ([1, 2, 3], [-1.0, -2.0, -3.0], 2, 1)
    assert recommendation_list(codes, scores, (4, 0), Book)[2] is None  # a dead beam never ranks
    # Two ranks' shares (round-robin), added up: the window's metrics, overall and per group.
    ranks, groups, ks = [0, None, 4, 12], ["new", "dormant", "new", "continuing"], [5, 10]
    shares = [group_sums(ranks[r::2], groups[r::2], 1 - r, ks) for r in range(2)]
    out = averages([a + b for a, b in zip(*shares)], ks)
    assert list(out) == ["users", "overall", "groups", "invalid_outputs"]
    assert out["users"] == 4 and out["invalid_outputs"] == 1
    assert out["overall"] == pytest.approx(rank_metrics(ranks, ks))
    assert out["groups"]["new"] == pytest.approx({"users": 2, **rank_metrics([0, 4], ks)})
    assert out["groups"]["dormant"] == {"users": 1, **rank_metrics([None], ks)}
    # A list-level metric: over every list of the window at once.
    assert catalogue_coverage([[1, 2, 3], [2, 4, 5]], 2, 10) == pytest.approx(0.3)  # items 1, 2, 4
    assert catalogue_coverage([], 5, 0) == 0.0


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """A SentencePiece tokenizer with 4 x 8 code tokens and a 24-item catalog of random codes."""
    rng = random.Random(0)
    tok = train_sentencepiece_tokenizer(
        [PromptTemplate().text.replace("{history}", "")], str(tmp_path_factory.mktemp("tok"))
    )
    add_code_tokens(tok, 4, 8)
    codes = rng.sample([(a, b, c, d) for a in range(8) for b in range(8) for c in range(8) for d in range(8)], 24)
    index = {
        "levels": 4,
        "codes_per_level": 8,
        "items": {str(i): [f"<{'abcd'[k]}_{c}>" for k, c in enumerate(code)] for i, code in enumerate(codes)},
    }
    return tok, ItemCodebook(index, tok)


def _forward(model):
    return decoding_forward(model)


def _sharp_gqa_model(tok, attn: str = "sdpa"):
    """A seeded 2-layer Llama with GQA (4 heads, 2 key-value heads), its logits sharper than a
    fresh model's near-uniform ones, so ties cannot decide the order of the beams."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            attn_implementation=attn,
        )
    ).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def test_memorized_dataset_scores_hit_at_1(vocab):
    tok, book = vocab
    template = PromptTemplate()
    rng = random.Random(1)
    examples = [([rng.randrange(24) for _ in range(3)], t) for t in range(12)]
    enc = [template.encode(tok, book, h, t) for h, t in examples]
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
        )
    )
    width = max(len(e["input_ids"]) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    labels = torch.full((len(enc), width), -100)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        n = len(e["input_ids"])
        ids[i, width - n :], labels[i, width - n :], mask[i, width - n :] = (
            torch.tensor(e["input_ids"]),
            torch.tensor(e["labels"]),
            1,
        )
    position = (mask.cumsum(1) - 1).clamp(min=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(input_ids=ids, attention_mask=mask, position_ids=position, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    prompts = [template.encode_prompt(tok, book, h) for h, _ in examples]
    seqs, _scores = constrained_beam_search(_forward(model), prompts, book.trie, 4, 5, tok.pad_token_id, "cpu")
    ranks = []
    for i, (_, target) in enumerate(examples):
        top = [book.item_of(tuple(seqs[i, j].tolist())) for j in range(5)]
        assert None not in top  # constrained: every output is a catalog item
        ranks.append(top.index(target) if target in top else None)
    assert rank_metrics(ranks, [1])["hit@1"] == 1.0


def test_every_output_is_in_the_catalog_and_dead_beams_are_guarded(vocab):
    tok, book = vocab
    catalog = {tuple(book.item_token_ids(i)) for i in range(24)}
    g = torch.Generator().manual_seed(0)
    vocab_size = len(tok)

    def random_model(ids, mask, position, cache, keep):
        out = torch.randn(ids.shape[0], keep, vocab_size, generator=g) * 5
        out[0] = float("-inf")  # the first prompt's model gives nothing any probability
        return out

    beams = 30  # more beams than the 24 items: some beams must die
    seqs, scores = constrained_beam_search(
        random_model, [[1, 5, 9], [1, 7], [2, 3, 4, 5]], book.trie, 4, beams, tok.pad_token_id, "cpu"
    )
    assert not torch.isnan(scores).any()
    assert (scores[0] == NEG).all()  # no finite beam for the degenerate prompt
    for i in (1, 2):
        finite = [tuple(seqs[i, j].tolist()) for j in range(beams) if scores[i, j] != NEG]
        assert set(finite) <= catalog and len(finite) == len(set(finite))
        assert 0 < len(finite) <= 24
        assert list(scores[i, : len(finite)]) == sorted(scores[i, : len(finite)].tolist(), reverse=True)


def test_max_users_is_a_seeded_sample_not_the_first_users(ml_dataset):
    """The newest users come last in a window's test split; a first-N cut would drop them."""
    from collections import Counter

    from data_tools.dataset import load_manifest
    from data_tools.reader import window_split
    from train.evaluation.users import test_users

    manifest = load_manifest(ml_dataset)
    everyone = list(window_split(ml_dataset, 1, "test"))
    sample = test_users(ml_dataset, manifest, 1, 40, seed=0)
    users = [s["user"] for s in sample]
    assert users == [s["user"] for s in test_users(ml_dataset, manifest, 1, 40, seed=0)] and len(set(users)) == 40
    assert set(users) != {s["user"] for s in everyone[:40]}
    assert set(users) != {s["user"] for s in test_users(ml_dataset, manifest, 1, 40, seed=1)}
    assert set(users) <= {s["user"] for s in everyone}
    # Drawn from the whole window: new users are in it.
    assert Counter(s["group"] for s in sample)["new"] > 0
    assert len(test_users(ml_dataset, manifest, 1, None, seed=0)) == len(everyone)


def test_transitions_reference_ranks_followers_by_recency_then_popularity():
    from collections import Counter

    from train.evaluation.references import transition_top

    following = {1: Counter({(9,): 1, (8,): 5}), 2: Counter({(7,): 2}), 3: Counter({(9,): 4})}
    popular = [(5,), (7,), (6,)]
    # history [3, 1, 2]: 2 is the last item (weight 1), 1 the one before (1/2), 3 (1/3)
    # scores: (7,) 2, (8,) 2.5, (9,) 0.5 + 4/3; then the popular codes not listed yet
    assert transition_top(following, [4, 3, 1, 2], popular, 5) == [(8,), (7,), (9,), (5,), (6,)]
    assert transition_top(following, [4, 3, 1, 2], popular, 2) == [(8,), (7,)]
    assert transition_top(following, [], popular, 2) == [(5,), (7,)]  # no history: popularity


def test_following_codes_counts_consecutive_training_targets(ml_dataset):
    from collections import Counter

    from data_tools.dataset import load_manifest
    from data_tools.reader import read_split
    from train.evaluation.references import following_codes

    class Codes:  # an item's "code" is the item itself, so counts can be checked by hand
        @staticmethod
        def item_token_ids(item):
            return [item]

    train = read_split(ml_dataset, 1, "train", load_manifest(ml_dataset))
    following = following_codes(ml_dataset, load_manifest(ml_dataset), 1, Codes)
    expected = Counter((s["history"][-1], s["target"]) for s in train if s["history"])
    assert {(item, code[0]): n for item, c in following.items() for code, n in c.items()} == expected
    assert sum(map(sum, (c.values() for c in following.values()))) == sum(1 for s in train if s["history"])


def test_generate_with_the_trie_logits_processor_equals_our_beam_search(vocab):
    """For people who call Hugging Face `generate` themselves: beam search with
    TrieLogitsProcessor returns the same items, in the same order, as constrained_beam_search."""
    from train.serve.recommender import TrieLogitsProcessor

    tok, book = vocab
    model = _sharp_gqa_model(tok)
    beams = 6
    for prompt in ([1, 5, 9, 11], [1, 7, 3]):
        ours, scores = constrained_beam_search(_forward(model), [prompt], book.trie, 4, beams, tok.pad_token_id, "cpu")
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                num_beams=beams,
                num_return_sequences=beams,
                max_new_tokens=4,
                do_sample=False,
                logits_processor=[TrieLogitsProcessor(book.trie, len(prompt))],
                pad_token_id=tok.pad_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
        theirs = [tuple(s[len(prompt) :].tolist()) for s in out.sequences]
        assert all(book.item_of(code) is not None for code in theirs)
        assert theirs == [tuple(s.tolist()) for s in ours[0]]
        # the same cumulative log-probabilities (generate divides by the length, 4, by default)
        assert torch.allclose(out.sequences_scores * 4, scores[0], atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_search_equals_the_search_with_a_cache_per_beam(vocab, attn):
    """The default search (one prompt KV cache per user, shared by its beams through a 4D mask)
    returns the same codes and scores as the search that repeats the cache per beam and reorders
    it (shared_prompt=False, the algorithm before issue 14): a GQA model with RoPE, left-padded
    prompts of different lengths, more beams than items (dead beams), and exact ties."""
    tok, book = vocab
    model = _sharp_gqa_model(tok, attn)
    prompts = [[1, 5, 9, 11], [1, 7, 3], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1], [4, 4, 4, 4, 4, 4]]
    forward = _forward(model)

    def both(beams):
        shared = constrained_beam_search(forward, prompts, book.trie, 4, beams, tok.pad_token_id, "cpu")
        per_beam = constrained_beam_search(
            forward, prompts, book.trie, 4, beams, tok.pad_token_id, "cpu", shared_prompt=False
        )
        return shared, per_beam

    for beams in (6, 30):  # 30 beams, 24 items: some beams die
        (seqs, scores), (ref_seqs, ref_scores) = both(beams)
        assert torch.equal(scores == NEG, ref_scores == NEG)
        if beams == 30:
            assert (scores[:, :24] > NEG).all() and (scores[:, 24:] == NEG).all()
        live = scores > NEG
        assert torch.equal(seqs[live], ref_seqs[live])
        assert torch.allclose(scores[live], ref_scores[live], atol=1e-4)
        for i, prompt in enumerate(prompts):  # left padding changes nothing: each prompt alone
            alone, alone_scores = constrained_beam_search(
                forward, [prompt], book.trie, 4, beams, tok.pad_token_id, "cpu"
            )
            assert torch.equal(alone[0][live[i]], seqs[i][live[i]])
            assert torch.allclose(alone_scores[0][live[i]], scores[i][live[i]], atol=1e-4)
    with torch.no_grad():  # every logit 0: every item ties; both searches break ties the same way
        model.lm_head.weight.zero_()
    (seqs, scores), (ref_seqs, ref_scores) = both(10)
    assert torch.equal(seqs, ref_seqs) and torch.equal(scores, ref_scores)
    assert (scores == scores[0, 0]).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_device_trie_masks_give_the_host_masks_search_exactly(vocab, attn):
    """The masks built on the device from the trie's tensors change nothing: the same codes and
    the same scores, bit for bit, as the masks built on the host from the beams' prefixes (the
    search before), with dead beams (more beams than items), left padding, both searches, ties."""
    tok, book = vocab
    model = _sharp_gqa_model(tok, attn)
    prompts = [[1, 5, 9, 11], [1, 7, 3], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1], [4, 4, 4, 4, 4, 4]]
    forward = _forward(model)
    for beams in (6, 30):
        for shared in (True, False):
            runs = [
                constrained_beam_search(
                    forward, prompts, book.trie, 4, beams, tok.pad_token_id, "cpu", shared, trie_masks=masks
                )
                for masks in ("device", "host")
            ]
            (seqs, scores), (ref_seqs, ref_scores) = runs
            assert torch.equal(seqs, ref_seqs) and torch.equal(scores, ref_scores)
    with torch.no_grad():  # every logit 0: ties everywhere
        model.lm_head.weight.zero_()
    runs = [
        constrained_beam_search(forward, prompts, book.trie, 4, 10, tok.pad_token_id, "cpu", trie_masks=masks)
        for masks in ("device", "host")
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    with pytest.raises(ValueError, match="trie_masks"):
        constrained_beam_search(forward, prompts, book.trie, 4, 10, tok.pad_token_id, "cpu", trie_masks="gpu")


def test_test_indices_pick_the_users_that_sampling_the_samples_picked(ml_dataset):
    """random.sample draws positions from the population's length and k alone: sampling range(n)
    (no sample read) picks the users that sampling the list of every test sample picked, in the
    same order, so results stay comparable with runs before the change."""
    from data_tools.dataset import load_manifest
    from data_tools.reader import read_split
    from train.evaluation.users import test_indices, test_users

    manifest = load_manifest(ml_dataset)
    everyone = read_split(ml_dataset, 1, "test", manifest)
    for seed, k in ((0, 40), (1, 40), (7, len(everyone) - 1), (3, 1)):
        before = random.Random(f"{seed}/1").sample(everyone, k)
        assert [everyone[i] for i in test_indices(len(everyone), k, seed, 1)] == before
        assert test_users(ml_dataset, manifest, 1, k, seed) == before
    assert test_users(ml_dataset, manifest, 1, None, 0) == everyone
    assert test_users(ml_dataset, manifest, 1, len(everyone) + 5, 0) == everyone


class _ItemCodes:
    """An item's "code" is the item itself, so references can be checked by hand."""

    @staticmethod
    def item_token_ids(item):
        return [item]


def _evaluator(root: str, *, world: int = 1, max_users: int | None = None, run=None, period: int = 1):
    """An Evaluator for what needs no model: rank 0 of `world` ranks, items as their own codes."""
    from types import SimpleNamespace

    from data_tools.dataset import load_manifest
    from train.common.config import Config
    from train.evaluation.evaluator import EvalOptions, Evaluator

    cfg = Config()
    cfg.data.path, cfg.eval.max_users = root, max_users
    strategy = SimpleNamespace(rank=0, world_size=world, is_rank0=True, zero_stage=2)
    return Evaluator(
        options=EvalOptions.of(cfg, show_progress=False),
        model_folders=[run.adapter_dir(period)] if run else [],  # method single: the period's adapter alone
        strategy=strategy,
        engine=torch.nn.Linear(1, 1),
        encoder=SimpleNamespace(codebook=_ItemCodes),
        manifest=load_manifest(root),
        period=period,
        run=run,
        logger=None,
    )


def test_rank0_scores_both_references_for_every_rank_as_each_rank_did(ml_dataset):
    """Rank 0 reads the training split once and every evaluated user's test sample, and hands
    each rank the sums that rank computed itself before (when every rank read both splits and
    scored the references on its own users): the window's totals are unchanged, bit for bit."""
    from collections import Counter, defaultdict

    from data_tools.dataset import load_manifest
    from data_tools.reader import read_split
    from train.evaluation.ranking import group_sums
    from train.evaluation.references import transition_top
    from train.evaluation.users import test_indices

    manifest = load_manifest(ml_dataset)
    train = read_split(ml_dataset, 1, "train", manifest)
    counts = Counter((s["target"],) for s in train)  # the code before: popular_codes, following_codes
    popular = [code for code, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]]
    following = defaultdict(Counter)
    for s in train:
        if s["history"]:
            following[s["history"][-1]][(s["target"],)] += 1
    everyone = read_split(ml_dataset, 1, "test", manifest)
    for world, max_users in ((1, None), (3, 50), (2, 7)):
        evaluator = _evaluator(ml_dataset, world=world, max_users=max_users)
        users = random.Random("0/1").sample(everyone, max_users) if max_users else everyone
        samples, sums = evaluator._references(1, test_indices(len(everyone), max_users, 0, 1))
        assert samples == users[0::world]  # rank 0's own users
        for r in range(world):
            mine = users[r::world]
            groups = [s["group"] for s in mine]
            ranks = [popular.index((s["target"],)) if (s["target"],) in popular else None for s in mine]
            assert sums["popularity"][r] == group_sums(ranks, groups, 0, evaluator.settings.ks)
            tops = [transition_top(following, s["history"], popular, 20) for s in mine]
            ranks = [top.index((s["target"],)) if (s["target"],) in top else None for s, top in zip(mine, tops)]
            assert sums["transitions"][r] == group_sums(ranks, groups, 0, evaluator.settings.ks)
        assert sum(sums["popularity"][r][0] for r in range(world)) == len(users)
    assert any(x for x in sums["transitions"][0][1:]), "no hit at all: the comparison above would prove little"


def test_a_window_file_counts_only_for_the_export_and_settings_it_was_computed_with(tmp_path, ml_dataset):
    from train.common.run_folder import RunFolder
    from train.evaluation.windows import FinishedWindows

    run = RunFolder(str(tmp_path / "run"))
    adapter = os.path.join(run.adapter_dir(1), "adapter_model.safetensors")
    os.makedirs(os.path.dirname(adapter))
    with open(adapter, "wb") as f:
        f.write(b"weights")
    evaluator = _evaluator(ml_dataset, run=run)

    def windows():  # as Evaluator.evaluate makes them, with the evaluator's settings now
        return FinishedWindows(run, 1, evaluator.model_folders, evaluator._window_settings())

    finished = windows()
    key = finished.key(torch.float32, 2)
    assert list(key) == [  # what the files held before the evaluator took only its settings
        "export",
        "eval",
        "data",
        "eval_batch_size",
        "attn_implementation",
        "temperature",
        "dtype",
        "world_size",
    ]
    assert list(key["export"]) == [adapter] and key["data"] == os.path.abspath(ml_dataset)
    finished.save(0, key, {"users": 3}, None)
    finished.save(1, key, {"users": 4}, [[{"user": 9}, {"user": 2}], [{"user": 5}]])
    saved = finished.saved(key, [0, 1])
    assert {j: w["result"] for j, w in saved.items()} == {0: {"users": 3}, 1: {"users": 4}}
    assert [r["user"] for r in saved[1]["recommendations"]] == [2, 5, 9]
    evaluator.settings.beams = 30  # another evaluation setting
    assert windows().saved(windows().key(torch.float32, 2), [0, 1]) == {}
    evaluator.settings.beams = 20
    assert windows().key(torch.float32, 2) == key
    assert finished.key(torch.bfloat16, 2) != key and finished.key(torch.float32, 4) != key
    with open(adapter, "wb") as f:  # another export
        f.write(b"other weights")
    assert finished.key(torch.float32, 2) != key and finished.saved(finished.key(torch.float32, 2), [0, 1]) == {}
    with open(os.path.join(finished.folder, "window-0.json"), "w") as f:  # a torn file is ignored
        f.write('{"key": ')
    assert list(finished.saved(key, [0, 1])) == [1]
    finished.clear()
    assert not os.path.exists(finished.folder)


def test_eval_replica_is_auto_always_or_never():
    from train.common.config import ConfigError, load_config

    assert load_config(None, ["model.shape=tiny"]).eval.replica == "auto"
    assert load_config(None, ["model.shape=tiny", "eval.replica=never"]).eval.replica == "never"
    with pytest.raises(ConfigError, match=r"eval\.replica must be auto, always or never"):
        load_config(None, ["model.shape=tiny", "eval.replica=sometimes"])


def test_when_the_evaluation_uses_a_replica(monkeypatch):
    """Only under ZeRO-3; `auto` only on GPUs, where the model takes at most half the free memory
    on every rank (one decision for all: a rank short of memory means the sharded engine)."""
    from types import SimpleNamespace

    import train.evaluation.replica as replica

    engine = torch.nn.Linear(1000, 1000, bias=False)  # 4 MB in fp32
    strategy = SimpleNamespace(cuda=False, device=torch.device("cpu"), any=lambda flag: flag, zero_stage=2)
    for stage, mode, expected in ((2, "always", False), (3, "never", False), (3, "always", True), (3, "auto", False)):
        strategy.zero_stage = stage
        assert replica.use_replica(mode, strategy, engine, torch.float32, 1) is expected, (stage, mode)
    strategy.cuda = True
    assert replica.model_bytes(engine, torch.float32) == 4_000_000
    assert replica.model_bytes(engine, torch.bfloat16) == 2_000_000
    for free, expected in ((8_000_000, True), (7_999_999, False)):
        monkeypatch.setattr(replica, "free_memory", lambda strategy, free=free: free)
        assert replica.use_replica("auto", strategy, engine, torch.float32, 1) is expected, free
    strategy.any = lambda flag: True  # another rank is short
    monkeypatch.setattr(replica, "free_memory", lambda strategy: 10**12)
    assert replica.use_replica("auto", strategy, engine, torch.float32, 1) is False
