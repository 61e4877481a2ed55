"""Foreign checkpoints <-> ours: Lightning ``.ckpt``, DCP/FSDP and DeepSpeed in, Lightning ``.ckpt``,
single safetensors files and Hugging Face layouts out.

Owns reading foreign files without running code from them (restricted unpicklers, ``torchfile``,
``dcp_metadata``) and writing the destinations atomically, never over a folder it was not asked to
replace (``destination``). It imports format, store, distributed and saving (``engine``); it must
not import ``lightning/``, ``inspection`` or ``cli/``.
"""
