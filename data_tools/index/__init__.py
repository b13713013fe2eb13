"""Item index: semantic IDs (RQ-VAE or imported), item tokens, tokenizers and the code trie."""
