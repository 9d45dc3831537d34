"""The training side of logitstore (installed as ``logitstore.dpo``), in layers, each importing only those below:

- :mod:`.config`: what a build and a training run are asked to do (plain settings).
- :mod:`.inputs`: data readers and tokenization, as TRL reads and tokenizes each kind of data.
- :mod:`.objectives`: the objectives and their losses, as small pure functions.
- :mod:`.model`: loading a causal LM and scoring tokens through it.
- :mod:`.distributed`: the process group, collectives, DDP and FSDP2.
- :mod:`.kinds`: one module per store kind, everything that differs by kind, and their registry.
- :mod:`.reference`: the reference pass that fills a store.
- :mod:`.training`: the training loop.
- :mod:`.demo`: the whole pipeline on a tiny model.
"""
