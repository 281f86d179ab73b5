"""HeadRouter's vocabulary: the names of engine modes, semantics, probe points, attention choices, task groups and
built-in tasks, in one leaf module that imports nothing of the project (so every other module may import it).

Policy names are not here: each policy is an object in :mod:`headrouter_vllm.routing.policies`, whose registry is
the one list of them.
"""

from __future__ import annotations

CONFIG_KEY = "headrouter"  # the section of vLLM's additional_config that turns HeadRouter on
# the per-request report's key: in kv_transfer_params (engine to front end) and in the response's usage (clients)
REPORT_KEY = "headrouter"
# additional_config key of an engine without that section: Qwen2-Audio's encoder on the real audio only
ENCODER_WINDOW_KEY = "headrouter_encoder_window"
# a profile file beside a model's checkpoint: ``serve`` and ``demo`` use it unless told otherwise
MODEL_PROFILES_FILE = "headrouter_profiles.json"

# engine modes: one kept set for every head (the paper's), or each KV head its own
MODES = ("shared", "per_head")
# when pruning applies: from decode on; to the text rows after the audio in the prompt step; to every prompt row
# above the probe layer
SEMANTICS = ("after_prompt", "in_prompt", "prefill")
# which rows the probe reads: the prompt rows after the audio, the first generated token's, or both with the group
# router's choice between them (``routed``: the routed group's own probe point; needs a profile file with a router)
PROBE_POINTS = ("prompt", "first_token", "routed")
# which attention serves the decoder layers (see HeadRouterConfig.attention)
ATTENTION = ("auto", "platform", "triton", "torch")

# task groups, each with a calibrated head profile; ``mixed`` is the group of ``auto`` and unknown tasks
GROUPS = ("semantic", "acoustic", "mixed")
AUTO = "auto"  # the task of a request that names none: routed from the input alone

# Built-in task names and their groups (AudioMarathon's: semantic asr, ser, scr; acoustic the rest).
BUILTIN_TASKS: dict[str, str] = {
    "asr": "semantic",
    "ser": "semantic",
    "scr": "semantic",
    "sed": "acoustic",
    "music_genre": "acoustic",
    "scene": "acoustic",
    "spoof": "acoustic",
    "speaker_age": "acoustic",
    "speaker_gender": "acoustic",
    "emotion": "acoustic",
}
