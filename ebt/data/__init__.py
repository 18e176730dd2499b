"""Data layer: corpus sources, user data, tokenizers, token shards and the deterministic loader.

    sources    registry packages -> Documents        corpus     documents -> train/val/ood jsonl
    user       your files / HF datasets -> texts     tokenizers bpe | neox | gpt2 | saved folder
    shards     texts -> uint16/uint32 shards         loader     shards -> deterministic batches
    cli        `ebt data prepare | info | verify`
"""
